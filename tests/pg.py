"""A private PostgreSQL server for tests: Debian's `postgresql` package, a temp dir, a loopback port.

    with postgres_server() as pg:      # pg.url: postgresql://kaizen@127.0.0.1:PORT/postgres
        ...

`initdb` refuses to run as root, so as root the server runs as the `postgres`
system user (the package creates it). `make test` installs the package
(Makefile, system-deps). About 3 s to start.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import free_port


def pg_bin(name: str) -> str:
    """A PostgreSQL server program: on PATH (some images link them), else Debian's versioned lib dir."""
    found = shutil.which(name)
    if found:
        return found
    try:
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                check=True).stdout.strip()
        if Path(bindir, name).exists():
            return str(Path(bindir, name))
    except (OSError, subprocess.CalledProcessError):
        pass
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not candidates:
        raise FileNotFoundError(f"{name} not found: install Debian's postgresql package (make system-deps)")
    return candidates[-1]


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class PostgresServer:
    """A throwaway server (trust auth, superuser `kaizen`) that can be stopped and started again."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="kaizen-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql://kaizen@127.0.0.1:{self.port}/postgres"
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        subprocess.run(_as_postgres([pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "kaizen",
                                     "--no-sync", "-E", "UTF8"]), check=True, capture_output=True)

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -h 127.0.0.1 -c fsync=off -c max_connections=200"
        try:
            subprocess.run(_as_postgres([pg_bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
                                         str(self.root / "server.log"), "-w", "start"]),
                           check=True, capture_output=True, timeout=60)
        except subprocess.CalledProcessError:
            print((self.root / "server.log").read_text()[-3000:])
            raise

    def stop(self) -> None:
        subprocess.run(_as_postgres([pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                                     "stop"]), capture_output=True, timeout=60)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a throwaway server; yield it (`.url`); stop and delete it."""
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.remove()
