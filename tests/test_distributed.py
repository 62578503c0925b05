"""Distributed training (trainer/distributed.py) on real torch.distributed: torchrun, gloo, 2 processes.

The same job runs once in one process and once under torchrun with two (tests/dist_worker.py),
and the numbers are compared. What may differ is float32 rounding: DDP averages the two
ranks' gradients where one process sums its micro-batches' (and sums the sharded scores in
another order), so equal means equal within 1e-4 here (measured: about 1e-6 after the
reward model's 12 steps and after one PPO update). The last test kills a rank mid-round.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import torch

from kaizen.core.registry import Registry
from kaizen.core.settings import Settings
from tests.conftest import ROOT, free_port, stop_group, wait_http
from trainer.daemon import round_command
from trainer.distributed import Dist, resolve_backend, torchrun_command

TOLERANCE = 1e-4


def run_job(job: str, model: Path, out: Path, nproc: int) -> None:
    if nproc == 1:
        cmd = [sys.executable, "-m", "tests.dist_worker", job, str(model), str(out)]
    else:
        cmd = torchrun_command(Settings(train_nproc_per_node=nproc), "tests.dist_worker", job, str(model), str(out))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def test_backend_and_launch_command_follow_the_settings() -> None:
    assert resolve_backend("auto", cuda_available=True) == "nccl"
    assert resolve_backend("auto", cuda_available=False) == "gloo"
    assert resolve_backend("gloo", cuda_available=True) == "gloo"
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_backend("nccl", cuda_available=False)
    one_node = torchrun_command(Settings(train_nproc_per_node=2), "trainer.rounds", "run")
    assert one_node[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in one_node
    assert "--nproc-per-node=2" in one_node and one_node[-3:] == ["-m", "trainer.rounds", "run"]
    node1 = torchrun_command(Settings(train_nproc_per_node=4, train_nnodes=2, train_node_rank=1,
                                      train_master_addr="trainer-0.trainer", train_master_port=29511),
                             "trainer.rounds", "run")
    assert "--standalone" not in node1
    assert {"--nnodes=2", "--node-rank=1", "--master-addr=trainer-0.trainer", "--master-port=29511",
            "--nproc-per-node=4", "--max-restarts=0"} <= set(node1)
    # the daemon's round: plain python for one process, torchrun for more
    assert round_command(Settings()) == [sys.executable, "-m", "trainer.rounds", "run"]
    assert "torch.distributed.run" in round_command(Settings(train_nproc_per_node=2))
    with pytest.raises(ValueError, match="NODE_RANK"):
        Settings(train_nnodes=2, train_node_rank=2)
    # sharding: every item once, interleaved like DistributedSampler
    shards = [Dist(rank=r, world_size=3).shard(list(range(8))) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5]]


@pytest.mark.parametrize("job", ["reward", "reward-top", "reward-ended"])
def test_reward_model_on_two_processes_matches_one(job: str, tiny_model: Path, tmp_path: Path) -> None:
    """Same pairs, global batch and seed: the same loss curve and held-out accuracy on 1 and 2 ranks;
    `reward-top` trains the top layer only, each rank reading the frozen trunk from its own cache;
    `reward-ended` fits the ended term's γ too, which DDP does not average (EndedTerm.sync does)."""
    run_job(job, tiny_model, tmp_path / "one.json", 1)
    run_job(job, tiny_model, tmp_path / "two.json", 2)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["steps"] == two["steps"] == 12  # 2 epochs x ceil(11 micro-batches / 2)
    assert one["pairs_seen"] == two["pairs_seen"] == 88  # every pair once per epoch, whatever the rank count
    assert len(one["losses"]) == len(two["losses"]) == 12
    assert max(abs(a - b) for a, b in zip(one["losses"], two["losses"], strict=True)) < TOLERANCE
    assert one["losses"][-1] < one["losses"][0] - 0.05  # it did learn: the comparison is not of constants
    assert [h["step"] for h in one["history"]] == [h["step"] for h in two["history"]]
    assert all(abs(a["bt_loss"] - b["bt_loss"]) < TOLERANCE and a["accuracy"] == b["accuracy"]
               for a, b in zip(one["history"], two["history"], strict=True))
    assert one["accuracy"] == two["accuracy"] and abs(one["bt_loss"] - two["bt_loss"]) < TOLERANCE
    if job == "reward-ended":  # 22 of the 44 pairs: the ended answer won; γ moved, the same on both
        gamma = [r["ended_term"]["gamma"] for r in (one, two)]
        assert one["ended_term"]["ended_won"] == two["ended_term"]["ended_won"] == 22, one["ended_term"]
        assert gamma[0] > one["ended_term"]["gamma_start"] + 0.01 and abs(gamma[0] - gamma[1]) < 2 * TOLERANCE, \
            (one["ended_term"], two["ended_term"])
    else:
        assert one["ended_term"] is None


@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "dpo"])
def test_one_policy_update_on_two_processes_matches_one(tiny_model: Path, tmp_path: Path, algorithm: str) -> None:
    """One PPO (or RLOO, or DPO with three users' pairs) update (sharded scoring, minibatches split by
    rank, DDP) on a fixed rollout batch."""
    run_job(algorithm, tiny_model, tmp_path / "one.pt", 1)
    run_job(algorithm, tiny_model, tmp_path / "two.pt", 2)
    one, two = (torch.load(tmp_path / f, weights_only=False) for f in ("one.pt", "two.pt"))
    if algorithm != "ppo":  # no value head: it stays at its zero initialisation, untrained
        assert "v_head.weight" not in one["params"] and float(one["v_head"].abs().max()) == 0.0
        assert one["stats"]["vf_loss"] == 0.0
    assert (one["world_size"], two["world_size"]) == (1, 2) and one["trunk_depth"] == 1
    assert torch.allclose(one["advantages"], two["advantages"], atol=TOLERANCE)
    assert one["params"].keys() == two["params"].keys() and len(one["params"]) > 0
    from trainer.policy import load_policy

    start = dict(load_policy(tiny_model)[0].named_parameters())
    moved = max(float((p - start[n].detach()).abs().max()) for n, p in one["params"].items() if n in start)
    assert moved > 1e-3  # the update changed the weights: equal results are not both untouched
    for name, p in one["params"].items():
        assert torch.allclose(p, two["params"][name], atol=TOLERANCE), name
    for key in ("pg_loss", "vf_loss"):
        assert abs(one["stats"][key] - two["stats"][key]) < TOLERANCE, key
    if algorithm == "dpo":  # the loss is DPO's: log 2 where policy and reference still agree
        assert 0.0 < one["stats"]["pg_loss"] < 1.0 and 0.0 <= one["stats"]["pair_accuracy"] <= 1.0


def _rank_process(torchrun: subprocess.Popen[bytes], rank: int) -> psutil.Process | None:
    for child in psutil.Process(torchrun.pid).children(recursive=True):
        try:
            env = child.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if env.get("RANK") == str(rank) and "trainer.rounds" in " ".join(child.cmdline()):
            return child
    return None


@pytest.mark.slow
def test_a_rank_killed_mid_round_fails_the_round_and_publishes_nothing(tmp_path: Path, broker: Settings,
                                                                        tiny_model: Path) -> None:
    """Two ranks run a round under torchrun; rank 1 is SIGKILLed during PPO. The round fails as a
    whole (torchrun exits non-zero), the registry and the reward pointer are as they were, and the
    next round starts from that committed state."""
    from tests.test_rounds import fill_store, round_settings, snapshot
    from kaizen.core.rounds_log import read_rounds
    from trainer.rounds import _recover

    sanity = tmp_path / "sanity.jsonl"
    sanity.write_text(json.dumps({"prompt": "Is the sky blue?", "expect": ""}) + "\n")
    settings = round_settings(tmp_path / "data", tiny_model, broker, sanity, ppo_iterations=200,
                              train_nproc_per_node=2)
    fill_store(settings)
    registry = Registry(settings.registry_path)
    registry.init_base(tiny_model)
    before = snapshot(settings.registry_path)
    state_file = settings.data_dir / "rounds" / "state.json"
    log = (tmp_path / "round.log").open("wb")
    proc = subprocess.Popen(round_command(settings), env={**settings.child_env(), "OMP_NUM_THREADS": "1"},
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    state: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            state = json.loads(state_file.read_text()) if state_file.exists() else {}
            if state.get("phase") == "ppo" and state.get("iterations_done", 0) >= 1:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the round ended before a rank could be killed:\n" + \
            (tmp_path / "round.log").read_text()[-4000:]
        rm_before = (settings.data_dir / "reward" / "current").read_text()
        victim = _rank_process(proc, 1)
        assert victim is not None, "rank 1 not found among torchrun's children"
        victim.send_signal(signal.SIGKILL)  # mid-step: PPO iterations run back to back
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    output = (tmp_path / "round.log").read_text()
    assert code != 0, output[-4000:]
    assert snapshot(settings.registry_path) == before  # no version published, no state change
    assert (settings.data_dir / "reward" / "current").read_text() == rm_before
    assert not list((settings.data_dir / "rounds" / "work").glob("*/candidate"))
    # rank 0 recorded the failure (or, killed by torchrun first, left the state the next round restarts from)
    resume, how = _recover(settings)
    assert resume is None, how
    rounds = read_rounds(settings, 5)
    assert rounds and rounds[0]["outcome"] in ("failed", "interrupted"), rounds[:1]
    if rounds[0]["outcome"] == "failed":
        assert "version" not in rounds[0]
    # the reward model that round refreshed on two ranks says so
    rm = json.loads((settings.data_dir / "reward" / rm_before.strip() / "manifest.json").read_text())
    assert rm["distributed"]["world_size"] == 2 and rm["distributed"]["backend"] == "gloo"

    # The next round starts from the committed state and, with both ranks alive, publishes. This
    # time as two nodes of one process each, as the chart runs them: node 1 is `kaizen train` with
    # KAIZEN_TRAIN_NODE_RANK=1 (a worker that joins every round), node 0 the round the daemon starts.
    two_nodes = dict(ppo_iterations=2, gate_min_win=0.0, train_nnodes=2, train_nproc_per_node=1,
                     train_master_port=free_port())
    settings = round_settings(tmp_path / "data", tiny_model, broker, sanity, **two_nodes)
    node1 = round_settings(tmp_path / "node1", tiny_model, broker, sanity, train_node_rank=1, **two_nodes)
    worker_log = tmp_path / "node1.log"  # kept with the failed test's folder: why a worker exited
    with worker_log.open("wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "kaizen", "train"], cwd=ROOT,
                                  env={**node1.child_env(), "OMP_NUM_THREADS": "1"}, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_http(f"http://127.0.0.1:{node1.trainer_port}/metrics", 60, worker)
        except RuntimeError as exc:
            raise AssertionError(f"{exc}; its log ends:\n{worker_log.read_text()[-3000:]}") from exc
        proc = subprocess.run(round_command(settings), env={**settings.child_env(), "OMP_NUM_THREADS": "1"},
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        # node 1's torchrun exits a moment after node 0's (its agent tears down on its own clock):
        # wait for the worker to record the round it took part in
        deadline, done = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            scraped = httpx.get(f"http://127.0.0.1:{node1.trainer_port}/metrics", timeout=5).text
            done = [float(line.split()[1]) for line in scraped.splitlines()
                    if line.startswith("kaizen_training_last_round_completed_timestamp_seconds ")]
            if done and done[0] > 0:
                break
            time.sleep(0.5)
    finally:
        stop_group(worker)
    assert worker.returncode == 0
    record = read_rounds(settings, 1)[0]
    assert record["outcome"] == "published", record
    assert record["recovery"] == "fresh round" or record["recovery"].startswith("restarting"), record
    info = Registry(settings.registry_path).info(record["version"])
    assert info.training["distributed"] == {"world_size": 2, "backend": "gloo", "device": "cpu"}
    assert "kaizen_trainer_ready 1.0" in scraped
    assert done and done[0] > time.time() - 600, done  # the worker saw the round finish


def test_kaizen_reward_train_launches_torchrun_itself(tiny_model: Path, tmp_path: Path) -> None:
    """`kaizen reward train` with KAIZEN_TRAIN_NPROC_PER_NODE=2 relaunches itself under torchrun
    (no torchrun on the command line), trains on two gloo ranks, and one rank writes the model,
    whose manifest records the world size and backend it was trained with."""
    out = tmp_path / "rm"
    sample = ROOT / "tests" / "data" / "hh_harmless_sample.jsonl"
    env = {**Settings(data_dir=tmp_path / "data", train_nproc_per_node=2).child_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "kaizen", "reward", "train", "--data", str(sample),
                           "--out", str(out), "--model", str(tiny_model), "--epochs", "1", "--max-length", "96",
                           "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "torch.distributed.run" in proc.stderr + proc.stdout  # it relaunched itself
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["distributed"]["world_size"] == 2 and manifest["distributed"]["backend"] == "gloo", manifest
    assert manifest["metrics"]["train"]["steps"] > 0
    assert list(out.glob("*.safetensors")), sorted(p.name for p in out.iterdir())
