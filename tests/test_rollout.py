"""Hot-swap, refusal of corrupt versions, on a real chat API with real vLLM engines.

The versions are tiny Llamas whose embeddings are scaled up, so their greedy
answers are sharp (no near-ties between batch shapes) and differ from version
to version: what a response says tells which weights wrote it, and the test
checks that against the response's version label.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kaizen.core.registry import Registry
from kaizen.core.settings import Settings
from tests.conftest import ADMIN_TOKEN, ROOT, USER_KEY, make_settings, stop_group, wait_http

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
USER = {"Authorization": f"Bearer {USER_KEY}"}
PROMPT = [{"role": "user", "content": "Name three colours."}]
ANSWER_TOKENS = 12


def make_version(base: Path, out: Path, seed: int, embed_scale: float = 10.0, mlp_scale: float = 300.0) -> Path:
    """A copy of `base` whose answers are sharp and its own.

    Scaled embeddings (tied to the output head) make the logits peaked; re-drawn,
    large MLP output weights dominate the residual stream, so each seed's model
    says something different instead of repeating the last prompt token."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, out)
    weights = load_file(str(out / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for key, w in weights.items():
        if key.endswith("embed_tokens.weight"):
            weights[key] = (w.float() * embed_scale).to(w.dtype)
        elif key.endswith("mlp.down_proj.weight"):
            weights[key] = (torch.randn(w.shape, generator=gen) * 0.02 * mlp_scale).to(w.dtype)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def greedy_answer(model_dir: Path) -> str:
    """The version's greedy answer to PROMPT, from transformers (float32), as vLLM should give it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=ANSWER_TOKENS, do_sample=False)
    return str(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))


def start_server(settings: Settings) -> subprocess.Popen[bytes]:
    with open(settings.data_dir / "serve.log", "ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "kaizen", "serve"], env=settings.child_env(), cwd=ROOT,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{settings.port}/readyz", 240, proc)
    except Exception:
        stop_group(proc)
        print((settings.data_dir / "serve.log").read_text()[-5000:])
        raise
    return proc


@pytest.fixture(scope="module")
def folders(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model folders for v0..v3 and each one's expected greedy answer."""
    root = tmp_path_factory.mktemp("versions")
    return {f"v{i}": make_version(tiny_model, root / f"m{i}", seed=100 + i) for i in range(4)}


@pytest.fixture(scope="module")
def expected(folders: dict[str, Path]) -> dict[str, str]:
    answers = {v: greedy_answer(p) for v, p in folders.items()}
    assert len(set(answers.values())) == len(answers), f"versions must answer differently: {answers}"
    return answers


@pytest.fixture(scope="module")
def server(folders: dict[str, Path], broker: Settings,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Settings, Registry]]:
    settings = make_settings(tmp_path_factory.mktemp("swap-api"), model=folders["v0"],
                             broker_port=broker.broker_port, api_keys=USER_KEY, admin_token=ADMIN_TOKEN,
                             rate_limit_rps=1000, rate_limit_burst=1000, auto_rollout=False,
                             registry_poll_interval_s=0.5, engine_max_num_seqs=16,
                             swap_drain_timeout_s=60)
    proc = start_server(settings)
    registry = Registry(settings.registry_path)
    for v in ("v1", "v2", "v3"):
        assert registry.publish(folders[v], parent="v0", who="test").version == v
    yield f"http://127.0.0.1:{settings.port}", settings, registry
    stop_group(proc)


def stream_answer(client: httpx.Client, base: str) -> tuple[str, str, str]:
    """(header label, chunk label, text) of one greedy streamed answer."""
    body = {"messages": PROMPT, "max_tokens": ANSWER_TOKENS, "temperature": 0, "stream": True}
    text, labels = "", set()
    with client.stream("POST", f"{base}/v1/chat/completions", json=body, headers=USER) as r:
        assert r.status_code == 200, r.read()
        header = r.headers["x-kaizen-model-version"]
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            labels.add(chunk["model_version"])
            for c in chunk["choices"]:
                text += c["delta"].get("content") or ""
    assert len(labels) == 1, labels
    return header, labels.pop(), text


def serving(base: str) -> str:
    """The champion version this process serves (the operators' route: probes name no versions)."""
    return str(httpx.get(f"{base}/admin/rollout", headers=ADMIN, timeout=60).json()["serving"]["champion"])


def test_swaps_under_streaming_load_fail_nothing_and_label_truthfully(
        server: tuple[str, Settings, Registry], expected: dict[str, str]) -> None:
    base, _, _ = server
    results: list[tuple[str, str, str]] = []
    failures: list[str] = []
    stop = threading.Event()

    def client_loop() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                try:
                    results.append(stream_answer(client, base))
                except Exception as exc:  # noqa: BLE001 - every failure is reported below
                    failures.append(repr(exc))

    threads = [threading.Thread(target=client_loop) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(2)
    swaps = []
    for v in ("v1", "v2", "v3"):
        t0 = time.monotonic()
        r = httpx.post(f"{base}/admin/promote", json={"version": v, "reason": "test"}, headers=ADMIN, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["serving"]["champion"] == v
        swaps.append(time.monotonic() - t0)
        time.sleep(2)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures[:5]
    seen = {}
    for header, label, text in results:
        assert header == label
        assert text == expected[label], f"{label} answered {text!r}, its weights answer {expected[label]!r}"
        seen[label] = seen.get(label, 0) + 1
    assert set(seen) == {"v0", "v1", "v2", "v3"}, seen
    print(f"{len(results)} answers during 3 swaps, by version {seen}; promote calls took {swaps}")


def test_corrupt_versions_are_refused_and_the_old_one_keeps_answering(
        server: tuple[str, Settings, Registry], folders: dict[str, Path], expected: dict[str, str]) -> None:
    base, settings, registry = server
    current = serving(base)
    damaged = {}
    for damage in ("truncate", "checksum", "no_config"):
        m = registry.publish(folders["v1"], parent=current, who="test", why=damage)
        folder = registry.path(m.version)
        weights = folder / "model.safetensors"
        if damage == "truncate":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif damage == "checksum":
            data = bytearray(weights.read_bytes())
            data[len(data) // 2] ^= 0x01
            weights.write_bytes(bytes(data))
        else:
            (folder / "config.json").unlink()
        damaged[damage] = m.version
    for damage, v in damaged.items():
        # through the operator API: refused before anything changes
        r = httpx.post(f"{base}/admin/promote", json={"version": v}, headers=ADMIN, timeout=60)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "corrupt_version"
        # behind the API's back (another replica, a hand edit): the server refuses to load it
        registry.promote(v, who="test", why=f"sneak in a {damage} version")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = httpx.get(f"{base}/admin/rollout", headers=ADMIN).json()
            if v in status["refused"]:
                break
            time.sleep(0.25)
        assert v in status["refused"], status
        assert serving(base) == current
        with httpx.Client(timeout=60) as client:
            header, _, text = stream_answer(client, base)
        assert (header, text) == (current, expected[current])
        registry.rollback(who="test", why="undo")
    metrics_text = httpx.get(f"{base}/metrics/").text
    assert 'kaizen_model_swaps_total{result="refused"}' in metrics_text
