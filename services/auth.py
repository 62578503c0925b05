"""Who is calling, and how much they may ask: API keys, admin token, user ids, limits.

Keys are compared in constant time. Downstream (comparisons, votes, Kafka)
a caller is a pseudonymous id, a keyed hash of their key; the key itself is
never stored or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import threading
import time
from collections import Counter
from pathlib import Path

from kaizen.core.settings import Settings

ANONYMOUS = "anonymous"
#: Random bytes of a generated admin token (hex: twice as many characters).
ADMIN_TOKEN_BYTES = 24


class AuthError(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def bearer(header: str | None) -> str | None:
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def check_api_key(settings: Settings, header: str | None) -> str | None:
    """The caller's key if it is one of ours; None when the API runs open. Raises AuthError."""
    if not settings.api_keys:
        return None
    token = bearer(header)
    if token is not None:
        ok = False
        for key in settings.api_keys:  # no early exit: time does not depend on which key matched
            ok |= hmac.compare_digest(token.encode(), key.get_secret_value().encode())
        if ok:
            return token
    raise AuthError(401, "missing or invalid API key: send `Authorization: Bearer <key>`", "invalid_api_key")


def check_admin(admin: str | None, header: str | None) -> None:
    """Accept `Authorization: Bearer <admin>`; `admin` is the one token of this server
    (`admin_token(settings)`, resolved once at start), None when admin routes are off."""
    token = bearer(header)
    if admin and token and hmac.compare_digest(token.encode(), admin.encode()):
        return
    if token is None:
        raise AuthError(401, "admin routes need `Authorization: Bearer <admin token>`", "invalid_api_key")
    raise AuthError(403, "this key may not use admin routes", "forbidden")


def _secret_file(path: Path, nbytes: int) -> str:
    """A random secret created once at `path` (mode 0600 from the start), then read back."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(nbytes))
        try:
            os.link(tmp, path)  # never replaces one another process created meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def load_user_id_secret(settings: Settings) -> bytes:
    """The hashing key: from settings, else created once (mode 0600) in the data dir."""
    if settings.user_id_secret is not None:
        return settings.user_id_secret.get_secret_value().encode()
    return _secret_file(settings.data_dir / "user-id.secret", 32).encode()


def local_admin_allowed(settings: Settings) -> bool:
    """A generated admin token is only for a development server on loopback with none set."""
    return settings.admin_token is None and settings.environment != "production" and settings.binds_loopback


def admin_token(settings: Settings, *, create: bool = True) -> str | None:
    """The admin token of a server with these settings: `KAIZEN_ADMIN_TOKEN` if set; else, on a
    development server bound to loopback, a random one kept in `<data_dir>/admin.token` (mode 0600,
    created on first use, like the user-id secret); else None (admin routes refuse everyone).
    Production and non-loopback servers never get a generated token."""
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value() or None
    if not local_admin_allowed(settings):
        return None
    path = settings.admin_token_path
    if not create and not path.exists():
        return None
    return _secret_file(path, ADMIN_TOKEN_BYTES)


def token_entropy_bits(token: str) -> float:
    """An estimate of a token's entropy: its length times the Shannon entropy of its own characters.

    Counts what the token shows, not how it was made, so it is an upper bound: `aaaa...` scores 0,
    `abab...` 1 bit a character, 48 random hex digits (a generated token) about 180 bits, while a
    dictionary phrase scores like random letters. Hence a floor on length as well."""
    counts = Counter(token)
    n = len(token)
    return n * -sum(c / n * math.log2(c / n) for c in counts.values()) if n else 0.0


def weak_admin_token(settings: Settings) -> str | None:
    """Why `KAIZEN_ADMIN_TOKEN` is too weak to guard a server (None: it is not, or none is set)."""
    if settings.admin_token is None:
        return None  # a generated token (ADMIN_TOKEN_BYTES random bytes), or admin routes off
    token = settings.admin_token.get_secret_value()
    if len(token) < settings.admin_token_min_length:
        return f"it is {len(token)} characters; at least {settings.admin_token_min_length} are needed"
    bits = token_entropy_bits(token)
    if bits < settings.admin_token_min_entropy_bits:
        return (f"its characters carry about {bits:.0f} bits; at least "
                f"{settings.admin_token_min_entropy_bits:.0f} are needed (it repeats too few characters)")
    return None


def admin_url(settings: Settings, token: str) -> str:
    """The operator page's address that signs in: the token rides in the fragment, which
    browsers never send to the server, so it stays out of access logs and Referer headers."""
    return f"{settings.public_url}/admin#token={token}"


def user_id(secret: bytes, key: str | None) -> str:
    if key is None:
        return ANONYMOUS
    return "u-" + hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:24]


class RateLimiter:
    """A token bucket per user: `rate` tokens a second, at most `burst` saved up."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, user: str) -> float:
        """Take one token; return 0 if allowed, else seconds until one is available."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(user, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[user] = (tokens - 1.0, now)
                return 0.0
            self._buckets[user] = (tokens, now)
            return (1.0 - tokens) / self.rate


class AuthFailures:
    """Failed authentications per client address, as a token bucket of allowed failures.

    An address may present `limit` wrong API keys or admin tokens per `window_s` (refilled
    evenly); past that, every authenticated request from it is refused (429) until a failure
    refills, and refused before its key is checked, so a right guess is not confirmed either.
    A wrong token repeated is one guess, counted once: a page that loads six admin routes with a
    mistyped token, or a client retrying, does not lock its operator out.
    At most `max_clients` addresses are remembered: past that, the least recently failing
    are forgotten (an attack from many addresses costs memory, never more than that)."""

    def __init__(self, limit: int, window_s: float, max_clients: int) -> None:
        self.limit, self.rate, self.max_clients = float(limit), limit / window_s, max_clients
        # address -> (failures left, when, digest of the last wrong token)
        self._buckets: dict[str, tuple[float, float, bytes]] = {}
        self._lock = threading.Lock()

    def _left(self, client: str, now: float) -> float:
        left, last, _ = self._buckets.get(client, (self.limit, now, b""))
        return min(self.limit, left + (now - last) * self.rate)

    def wait(self, client: str) -> float:
        """Seconds until `client` may try again; 0 when it may now."""
        with self._lock:
            left = self._left(client, time.monotonic())
        return 0.0 if left >= 1.0 else (1.0 - left) / self.rate

    def failed(self, client: str, token: str) -> None:
        """`client` presented `token`, which is wrong."""
        now = time.monotonic()
        digest = hashlib.sha256(token.encode()).digest()
        with self._lock:
            repeated = self._buckets.get(client, (0.0, 0.0, b""))[2] == digest
            left = self._left(client, now) - (0.0 if repeated else 1.0)
            self._buckets.pop(client, None)  # re-inserted last: the dict is ordered by last failure
            self._buckets[client] = (left, now, digest)
            while len(self._buckets) > self.max_clients:
                del self._buckets[next(iter(self._buckets))]


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))

