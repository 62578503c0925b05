"""A private nginx as a round-robin load balancer in front of API replicas (tests and bench).

    proc = start_nginx(Path(dir), port, [8001, 8002, 8003])   # http://127.0.0.1:port → the three

Debian's nginx with `-c CONF -p DIR -e LOG`: its pid, logs and temp files stay
in DIR, so it runs beside any system nginx. Each answer names the replica that
gave it in `X-Kaizen-Upstream`. A replica that refuses connections (killed) is
skipped for the next; a request already sent to one that dies is not retried
(nginx never re-sends a POST it has sent: the client sees 502 and retries).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx

CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream kaizen_api {{
{servers}
        keepalive 32;
        keepalive_timeout 30s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://kaizen_api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_next_upstream error timeout;
            proxy_connect_timeout 2s;
            proxy_read_timeout 300s;
            proxy_buffering off;
            add_header X-Kaizen-Upstream $upstream_addr always;
        }}
    }}
}}
"""


def nginx_bin() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        raise FileNotFoundError("nginx not found: install Debian's nginx package (make system-deps)")
    return found


def start_nginx(root: Path, port: int, upstream_ports: list[int]) -> subprocess.Popen[bytes]:
    root.mkdir(parents=True, exist_ok=True)
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;" for p in upstream_ports)
    conf = root / "nginx.conf"
    conf.write_text(CONF.format(dir=root, port=port, servers=servers))
    proc = subprocess.Popen([nginx_bin(), "-c", str(conf), "-p", str(root), "-e", str(root / "error.log"),
                             "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = (root / "error.log").read_text()[-2000:]
            raise RuntimeError(f"nginx exited with {proc.returncode}: {log}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise TimeoutError("nginx did not start")


def stop_nginx(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
