"""Retention and disk space (#19 item 6) on real files: which versions and reward models are kept,
`kaizen models gc` as a real process, and a round refused by a really full volume (a small tmpfs
when this runs as root; otherwise the real free space against a reserve larger than it)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from kaizen.core import metrics
from kaizen.core.registry import Registry
from kaizen.core.retention import collect
from kaizen.core.settings import Settings
from tests.conftest import ROOT, make_settings
from tests.test_registry import fake_model


def many_versions(settings: Settings, tmp_path: Path) -> Registry:
    """v0 base; v1..v5 each promoted in turn (v1..v4 retired, v5 champion); v6 and v7 rejected by
    the gate; v8 a candidate; v9 on canary."""
    reg = Registry(settings.registry_path)
    reg.init_base(fake_model(tmp_path / "base", "base"))
    for i in range(1, 10):
        rejected = i in (6, 7)
        reg.publish(fake_model(tmp_path / f"m{i}", "x" * i), parent="v0", who="trainer", rejected=rejected,
                    why="failed the gate: win rate 0.2 < 0.55" if rejected else "",
                    gate={"win_rate": 0.2 if rejected else 0.7}, training={"round_id": f"r{i}"})
        if i <= 5:
            reg.promote(f"v{i}", who="op")
    reg.set_canary("v9", 0.5, who="op")
    return reg


def reward_models(root: Path, n: int) -> list[Path]:
    """n reward-model folders rm-v1..rm-vn (as the trainer lays them out), `current` naming rm-v(n-1)."""
    folders = []
    for i in range(1, n + 1):
        folder = root / f"rm-v{i}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
        (folder / "manifest.json").write_text(json.dumps({"version": folder.name}))
        folders.append(folder)
    (root / "current").write_text(f"rm-v{n - 1}\n")
    return folders


def test_gc_keeps_what_serves_or_can_be_rolled_back_to(tmp_path: Path) -> None:
    """#19 item 6: nothing deleted old versions (every round publishes a full copy, rejected ones too).
    Retention keeps the champion, the canary, candidates, v0 and the last K champions; it deletes
    rejected versions (after an audit entry that keeps their gate numbers) and older retired ones;
    version numbers are never reused; rollback still reaches the kept champions."""
    settings = make_settings(tmp_path / "data", retention_keep_champions=2, retention_keep_reward_models=2)
    reg = many_versions(settings, tmp_path)
    rms = reward_models(settings.data_dir / "reward", 5)
    before = sorted(reg.names())

    dry = collect(settings, reward_models=rms, current_reward_model=rms[3], dry_run=True)
    assert sorted(dry.versions) == ["v1", "v2", "v6", "v7"]  # retired beyond 2, and the rejected
    assert sorted(dry.kept) == ["v0", "v3", "v4", "v5", "v8", "v9"]
    assert sorted(dry.reward_models) == ["rm-v1", "rm-v2", "rm-v3"] and dry.bytes_freed > 0
    assert sorted(reg.names()) == before and all(p.is_dir() for p in rms)  # a dry run changes nothing

    plan = collect(settings, reward_models=rms, current_reward_model=rms[3], who="test")
    assert plan.versions == dry.versions and plan.bytes_freed == dry.bytes_freed
    assert reg.names() == ["v0", "v3", "v4", "v5", "v8", "v9"]
    assert sorted(p.name for p in (settings.data_dir / "reward").iterdir()) == ["current", "rm-v4", "rm-v5"]
    assert not list(reg.versions_dir.glob(".deleted-*"))
    state = reg.state()
    assert (state.champion, state.canary) == ("v5", "v9") and "v6" not in state.versions
    deleted = {e.version: e for e in reg.audit() if e.action == "delete"}
    assert sorted(deleted) == ["v1", "v2", "v6", "v7"]
    assert deleted["v6"].details["gate"] == {"win_rate": 0.2} and deleted["v6"].from_stage == "rejected"
    assert "failed the gate" in deleted["v6"].why and deleted["v6"].details["round_id"] == "r6"
    # a new version never takes a deleted one's number, even when the newest was deleted
    collect(settings, reward_models=[], current_reward_model=None)  # idempotent: nothing more to delete
    reg.rollback(who="op")  # ends the canary: v9 rejected
    assert "v9" in collect(settings, reward_models=[], current_reward_model=None).versions
    assert reg.publish(fake_model(tmp_path / "m10", "y"), parent="v5", who="trainer").version == "v10"
    # rollback walks back through the kept champions
    assert reg.rollback(who="op").champion == "v4"
    assert reg.rollback(who="op").champion == "v3"


def test_kaizen_models_gc_cli(tmp_path: Path) -> None:
    """#19 item 6: `kaizen models gc --dry-run` lists what would go and deletes nothing; `kaizen models
    gc` deletes it (real processes, the trainer's reward-model folder layout)."""
    settings = make_settings(tmp_path / "data", retention_keep_champions=1, retention_keep_reward_models=1)
    reg = many_versions(settings, tmp_path)
    reward_models(settings.data_dir / "reward", 3)

    def gc(*args: str) -> dict[str, object]:
        out = subprocess.run([sys.executable, "-m", "kaizen", "models", "gc", "--json", *args], cwd=ROOT,
                             env=settings.child_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        result: dict[str, object] = json.loads(out.stdout)
        return result

    dry = gc("--dry-run")
    assert sorted(dry["versions"]) == ["v1", "v2", "v3", "v6", "v7"]
    # the newest and the current one (rm-v2 here: a newer one is kept too, the pointer may follow)
    assert sorted(dry["reward_models"]) == ["rm-v1"]
    assert len(reg.names()) == 10
    done = gc()
    assert done["versions"] == dry["versions"] and done["dry_run"] is False
    assert reg.names() == ["v0", "v4", "v5", "v8", "v9"]
    assert sorted(p.name for p in (settings.data_dir / "reward").iterdir()) == ["current", "rm-v2", "rm-v3"]


@contextlib.contextmanager
def full_volume(path: Path, size: str) -> Iterator[bool]:
    """A real tmpfs of `size` mounted on `path` (True), unmounted afterwards; False when this process
    may not mount (not root): the caller then makes the volume "full" with a reserve above its free space."""
    path.mkdir(parents=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_round_refused_before_writing_when_the_disk_is_full(tmp_path: Path, tiny_model: Path) -> None:
    """#19 item 6: a round checks the free space first (round_disk_space_factor x the champion's size +
    disk_reserve_bytes on the data dir's and the registry's volumes): on a full volume it fails at once
    with the numbers and the remedy, counts kaizen_disk_space_refusals_total{what="round"}, and writes
    no version. Today's round started regardless (and here ended "skipped": no reward model yet)."""
    from trainer.rounds import run_round

    data = tmp_path / "data"
    with full_volume(data, "8m") as mounted:
        # the tiny model is ~16 MB: 3x that cannot fit in 8 MB; unmounted: a reserve beyond what is free
        reserve = 0 if mounted else (1 << 62)
        settings = make_settings(data, model=tiny_model, disk_reserve_bytes=reserve)
        refusals = metrics.DISK_SPACE_REFUSALS.labels(what="round")._value.get()
        record = run_round(settings)
        assert record["outcome"] == "failed", record
        assert record["space_refused"] == "round"
        assert "not enough free space for the round" in record["error"]
        assert "kaizen models gc" in record["error"]
        assert str(data) in record["error"]
        assert metrics.DISK_SPACE_REFUSALS.labels(what="round")._value.get() == refusals + 1
        assert Registry(settings.registry_path).names() == []  # no version, not even v0
        assert not (data / "rounds" / "state.json").exists() and not (data / "rounds" / "work").exists()
