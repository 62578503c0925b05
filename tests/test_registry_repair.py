"""A damaged registry state.json (#19 item 7): readers recover, `kaizen models repair` writes it back.

Real files: a registry with fake (but well-formed) model folders, damaged the way a disk error or a
hand edit damages it; the CLI runs as a real process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kaizen.core.registry import Registry
from kaizen.core.registry_schema import CorruptState, RegistryState
from kaizen.core.registry_repair import replay, repair
from tests.conftest import ADMIN_TOKEN, ROOT, make_settings, stop_group, wait_http
from tests.test_registry import fake_model


def busy_registry(tmp_path: Path) -> Registry:
    """v0 → v1 promoted → v2 rolled back → v3 canary at 0.3 (fraction changed once): every kind of entry."""
    reg = Registry(tmp_path / "registry")
    reg.init_base(fake_model(tmp_path / "base", "base"))
    for i, name in enumerate(("a", "bb", "ccc"), 1):
        reg.publish(fake_model(tmp_path / name, name), parent=f"v{i - 1}", who="trainer")
    reg.set_canary("v1", 0.5, who="op")
    reg.promote(who="op")
    reg.set_canary("v2", 0.5, who="op")
    reg.rollback(who="auto", why="lost the head-to-head")
    reg.set_canary("v3", 0.2, who="op")
    reg.set_canary("v3", 0.3, who="op")
    return reg


def comparable(state: RegistryState) -> dict[str, object]:
    d = state.model_dump()
    d["versions"] = {v: (s["stage"], s["reason"]) for v, s in d["versions"].items()}
    return d


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong field"])
def test_unreadable_state_is_recovered_not_a_crash(tmp_path: Path, damage: str) -> None:
    """#19 item 7: a corrupt state.json used to raise from Registry.state() (the chat API could not
    start); now readers get the state back (last good copy, else the audit log), and writers heal it."""
    reg = busy_registry(tmp_path)
    before = reg.state()
    text = reg.state_file.read_text()
    damaged = {"garbage": "\x00\x01 not json", "truncated": text[: len(text) // 2],
               "wrong field": text.replace('"generation"', '"generation": "x", "g"', 1)}
    reg.state_file.write_text(damaged[damage])
    assert comparable(reg.state()) == comparable(before)
    # without the last good copy, the audit log alone rebuilds the same state
    reg.good_state_file.unlink()
    assert comparable(reg.state()) == comparable(before)
    assert comparable(replay(reg.audit())) == comparable(before)
    # the next change writes a good state.json again, from the recovered one
    reg.set_canary("v3", 0.4, who="op")
    healed = RegistryState.model_validate_json(reg.state_file.read_text())
    assert (healed.champion, healed.canary, healed.canary_fraction) == ("v1", "v3", 0.4)
    assert healed.generation == before.generation + 1


def test_nothing_to_recover_from_names_the_repair_command(tmp_path: Path) -> None:
    """#19 item 7: with no audit log and no good copy, the error names `kaizen models repair`."""
    reg = busy_registry(tmp_path)
    reg.state_file.write_text("{")
    reg.good_state_file.unlink()
    reg.audit_file.unlink()
    with pytest.raises(CorruptState, match=r"kaizen models repair --champion V"):
        reg.state()
    with pytest.raises(CorruptState, match="kaizen models repair"):
        repair(reg, who="test")
    result = repair(reg, who="test", champion="v1")
    assert result.written and reg.state().champion == "v1"
    assert {v: s.stage for v, s in reg.state().versions.items()} == {
        "v0": "retired", "v1": "champion", "v2": "retired", "v3": "retired"}


def test_kaizen_models_repair_cli(tmp_path: Path) -> None:
    """#19 item 7: `kaizen models repair` (a real process) writes the rebuilt state back, keeps the
    damaged file, and logs the repair; `--dry-run` changes nothing."""
    settings = make_settings(tmp_path / "data", registry_dir=tmp_path / "registry")
    reg = busy_registry(tmp_path)
    before = reg.state()
    reg.state_file.write_text("{ damaged")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kaizen", "models", "repair", *args], cwd=ROOT,
                              env=settings.child_env(), capture_output=True, text=True, timeout=120)

    dry = cli("--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["written"] is False and reg.state_file.read_text() == "{ damaged"
    out = cli()
    assert out.returncode == 0, out.stderr
    assert "champion v1" in out.stdout and "canary v3" in out.stdout
    fixed = RegistryState.model_validate_json(reg.state_file.read_text())
    assert comparable(fixed) | {"generation": 0} == comparable(before) | {"generation": 0}
    assert fixed.generation == before.generation + 1
    assert [p.read_text() for p in reg.root.glob("state.json.damaged-*")] == ["{ damaged"]
    assert reg.audit()[-1].action == "repair"
    again = cli()
    assert again.returncode == 0 and "nothing to repair" in again.stdout


def test_chat_api_starts_on_a_damaged_state(tmp_path: Path, tiny_model: Path) -> None:
    """#19 item 7: the symptom itself. `kaizen serve` (a real process, real engine) on a registry whose
    state.json is damaged used to exit at start with a ValidationError, again at every restart; now it
    starts and serves the champion the registry last recorded (v1 here, not the base model v0)."""
    settings = make_settings(tmp_path / "data", model=tiny_model, admin_token=ADMIN_TOKEN)
    reg = Registry(settings.registry_path)
    reg.init_base(tiny_model)
    reg.publish(tiny_model, parent="v0", who="test")
    reg.promote("v1", who="test")
    reg.state_file.write_text(reg.state_file.read_text()[:40])  # torn
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "kaizen", "serve"], env=settings.child_env(), cwd=ROOT,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{settings.port}"
    try:
        try:
            wait_http(f"{base}/readyz", 240, proc)  # ready: the champion's engine is loaded
        except Exception:
            print(log_path.read_text()[-5000:])
            raise
        served = httpx.get(f"{base}/metrics", timeout=10, follow_redirects=True).text
        assert 'kaizen_served_model_info{model_version="v1"} 1.0' in served
        assert "kaizen models repair" in log_path.read_text()  # the warning names the repair
    finally:
        stop_group(proc)


def test_chat_api_waits_for_a_repair_instead_of_crash_looping(tmp_path: Path, tiny_model: Path) -> None:
    """#19 item 7: with nothing to rebuild the state from (no audit log, no last good copy) the
    API used to exit at start, again at every restart (a crash loop under Kubernetes). Now it
    stays up: alive, not ready, chat answered 503 `registry_damaged` naming the repair; once
    `kaizen models repair --champion v1` runs, it starts serving v1 by itself."""
    settings = make_settings(tmp_path / "data", model=tiny_model, admin_token=ADMIN_TOKEN,
                             registry_poll_interval_s=0.5)
    reg = Registry(settings.registry_path)
    reg.init_base(tiny_model)
    reg.publish(tiny_model, parent="v0", who="test")
    reg.promote("v1", who="test")
    reg.state_file.write_text("{not json")
    reg.audit_file.unlink()
    reg.good_state_file.unlink()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "kaizen", "serve"], env=settings.child_env(), cwd=ROOT,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{settings.port}"
    try:
        wait_http(f"{base}/healthz", 120, proc)  # up and alive, though it serves nothing
        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "registry_damaged", ready.text
        assert "kaizen models repair" in ready.json()["error"]["message"]
        assert str(settings.registry_path) not in ready.text  # no server paths in an unauthenticated probe
        chat = httpx.post(f"{base}/v1/chat/completions", timeout=10,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert chat.status_code == 503 and chat.json()["error"]["code"] == "registry_damaged", chat.text
        assert proc.poll() is None

        fixed = subprocess.run([sys.executable, "-m", "kaizen", "models", "repair", "--champion", "v1"],
                               env=settings.child_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        try:
            wait_http(f"{base}/readyz", 240, proc)
        except Exception:
            print(log_path.read_text()[-5000:])
            raise
        served = httpx.get(f"{base}/metrics", timeout=10).text
        assert 'kaizen_served_model_info{model_version="v1"} 1.0' in served
        chat = httpx.post(f"{base}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert chat.status_code == 200 and chat.json()["model_version"] == "v1", chat.text
    finally:
        stop_group(proc)
