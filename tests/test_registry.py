"""The model registry on real files: atomic publish, checksums, stages, audit, crash leftovers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kaizen.core.registry import Registry
from kaizen.core.registry_schema import CorruptVersion, RegistryError


def fake_model(folder: Path, marker: str) -> Path:
    """A folder shaped like a Hugging Face model (config + safetensors + tokenizer)."""
    from safetensors.torch import save_file
    import torch

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "marker": marker}))
    (folder / "tokenizer.json").write_text("{}")
    save_file({"w": torch.full((64,), float(len(marker)))}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture()
def reg(tmp_path: Path) -> Registry:
    r = Registry(tmp_path / "registry")
    assert r.init_base(fake_model(tmp_path / "base", "base")) == "v0"
    return r


def test_init_base_is_idempotent_and_links(reg: Registry, tmp_path: Path) -> None:
    assert reg.init_base(tmp_path / "base") == "v0"
    assert reg.names() == ["v0"]
    assert reg.state().champion == "v0"
    reg.verify("v0")
    # weights hard-linked, not copied
    assert os.stat(reg.path("v0") / "model.safetensors").st_ino == os.stat(tmp_path / "base/model.safetensors").st_ino
    assert [e.action for e in reg.audit()] == ["init"]


def test_publish_numbers_versions_and_records_lineage(reg: Registry, tmp_path: Path) -> None:
    m1 = reg.publish(fake_model(tmp_path / "a", "a"), parent="v0", who="trainer", reward_model="rm-v1",
                     training={"kl": 0.1}, gate={"win_rate": 0.6, "passed": True})
    m2 = reg.publish(fake_model(tmp_path / "b", "bb"), parent="v1", who="trainer", rejected=True)
    assert (m1.version, m2.version) == ("v1", "v2")
    assert reg.lineage("v2") == ["v2", "v1", "v0"]
    info = {v.version: v for v in reg.all_versions()}
    assert info["v1"].stage == "candidate" and info["v1"].gate["win_rate"] == 0.6
    assert info["v2"].stage == "rejected"
    assert set(reg.manifest("v1").files) == {"config.json", "tokenizer.json", "model.safetensors"}
    assert (tmp_path / "a/config.json").exists()  # the source is left alone


@pytest.mark.parametrize("damage,reason", [
    ("truncate", "bytes"),
    ("flip", "sha256"),
    ("no_config", "config.json"),
    ("manifest", "manifest"),
])
def test_verify_refuses_damaged_versions(reg: Registry, tmp_path: Path, damage: str, reason: str) -> None:
    reg.publish(fake_model(tmp_path / "a", "a"), parent="v0", who="t")
    folder = reg.path("v1")
    weights = folder / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-10])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "no_config":
        (folder / "config.json").unlink()
    else:
        (folder / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptVersion, match=reason):
        reg.verify("v1")
    reg.verify("v0")


def test_stage_changes_and_rollback(reg: Registry, tmp_path: Path) -> None:
    for name in "abc":
        reg.publish(fake_model(tmp_path / name, name * 2), parent="v0", who="trainer")
    reg.set_canary("v1", 0.25, who="ops", why="try it")
    with pytest.raises(RegistryError, match="already on canary"):
        reg.set_canary("v2", 0.5, who="ops")
    reg.set_canary("v1", 0.5, who="ops")  # change the fraction
    assert reg.state().canary_fraction == 0.5
    st = reg.promote(who="auto", why="won")
    assert (st.champion, st.canary, st.previous_champions) == ("v1", None, ["v0"])
    assert st.versions["v0"].stage == "retired"
    reg.set_canary("v2", 0.5, who="ops")
    st = reg.rollback(who="ops", why="bad answers")  # withdraws the canary
    assert (st.champion, st.canary, st.versions["v2"].stage) == ("v1", None, "rejected")
    st = reg.rollback(who="ops", why="v1 is worse after all")  # back to the previous champion
    assert st.champion == "v0" and st.versions["v1"].stage == "rejected"
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback(who="ops")
    with pytest.raises(RegistryError, match="rejected"):
        reg.set_canary("v2", 0.5, who="ops")  # needs a reason
    reg.promote("v3", who="ops", why="direct")
    assert reg.state().champion == "v3"
    actions = [(e.action, e.version, e.who) for e in reg.audit()]
    assert ("rollback", "v2", "ops") in actions and ("restore", "v0", "ops") in actions
    gens = [e.generation for e in reg.audit()]
    assert gens == sorted(gens) and reg.state().generation == gens[-1]
    stages = [reg.state().versions[v].stage for v in reg.names()]
    assert sorted(stages) == ["champion", "rejected", "rejected", "retired"], stages


def test_unknown_and_invalid_versions(reg: Registry) -> None:
    with pytest.raises(RegistryError) as e:
        reg.set_canary("v9", 0.5, who="ops")
    assert e.value.status == 404
    with pytest.raises(RegistryError) as e:
        reg.promote("latest", who="ops")
    assert e.value.status == 400
    with pytest.raises(RegistryError) as e:
        reg.set_canary("v0", 1.5, who="ops")
    assert e.value.status == 400


KILLER = r"""
import sys, time
from pathlib import Path
import kaizen.core.registry as r
orig = r.Registry._publish_staged
def slow(self, staging, fields):
    print("staged", flush=True)
    time.sleep(60)
    return orig(self, staging, fields)
r.Registry._publish_staged = slow
r.Registry(Path(sys.argv[1])).publish(Path(sys.argv[2]), parent="v0", who="t")
"""


def test_sigkill_during_publish_leaves_registry_as_before(reg: Registry, tmp_path: Path) -> None:
    src = fake_model(tmp_path / "big", "big")
    before = (reg.names(), reg.state().model_dump_json(), reg.audit_file.read_text())
    proc = subprocess.Popen([sys.executable, "-c", KILLER, str(reg.root), str(src)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"staged"  # files copied, not yet named
    assert list(reg.versions_dir.glob(".staging-*"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (reg.names(), reg.state().model_dump_json(), reg.audit_file.read_text()) == before
    m = reg.publish(src, parent="v0", who="t")  # the next writer tidies up and numbers on
    assert m.version == "v1" and not list(reg.versions_dir.glob(".staging-*"))
    reg.verify("v1")


def test_a_decision_applies_only_to_the_generation_it_judged(reg: Registry, tmp_path: Path) -> None:
    """Two replicas judging the same canary: the first decision applies, the late one is refused whole."""
    reg.publish(fake_model(tmp_path / "a", "a"), parent="v0", who="trainer")
    judged = reg.set_canary("v1", 0.5, who="auto", expect=reg.state().generation)
    assert judged.canary == "v1"
    promoted = reg.promote("v1", who="auto", why="winning", expect=judged.generation)
    assert promoted.champion == "v1"
    with pytest.raises(RegistryError) as stale:  # judged on the canary state: v1 was promoted meanwhile
        reg.rollback(who="auto", why="losing", expect=judged.generation)
    assert stale.value.code == "stale_decision" and stale.value.status == 409
    assert reg.state().champion == "v1" and reg.state().generation == promoted.generation
    with pytest.raises(RegistryError, match="changed since the decision"):
        reg.set_canary("v0", 0.5, who="auto", why="again", expect=judged.generation)
    assert [e.action for e in reg.audit()].count("rollback") == 0
