"""Training rounds end to end (trainer/rounds.py) on real parts: tiny model, real vLLM engine,
real torch training, real SQLite store, real registry, real broker for the model events.

The synthetic preference: the champion is the tiny random model after a few seconds of SFT to
answer "Yes." or "No." at random; voters always prefer "Yes.". A reward model learns that from
the votes in the round's own refresh, and PPO moves the policy toward "Yes." in a few iterations,
which the gate sees on held-out prompts as a win rate over the champion.

One vLLM engine is shared by the in-process rounds (start-up is ~25 s whatever the model);
the SIGKILL test runs a round in a child process, as the daemon does.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from kaizen.core.events import Answer, Message, PreferenceEvent
from kaizen.core.registry import Registry
from kaizen.core.rounds_log import read_rounds
from kaizen.core.settings import Settings
from tests.conftest import ROOT, make_settings
from tests.yes_no import question
from trainer.rounds import _recover, run_round
from trainer.store import PreferenceStore


def yes_vote(i: int, rng: random.Random) -> PreferenceEvent:
    yes_first = rng.random() < 0.5
    texts = ["Yes.", "No."] if yes_first else ["No.", "Yes."]
    m = question(rng)[0]
    return PreferenceEvent(
        comparison_id=f"cmp-{i}", user=f"u{i % 7}", served_at=datetime.now(UTC),
        messages=[Message(role="user", content=m["content"])],
        answers=[Answer(text=t, model_version="v0") for t in texts], choice=0 if yes_first else 1,
    )


def round_settings(data_dir: Path, champion: Path, broker: Settings, sanity: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        model=champion, broker_port=broker.broker_port,
        reward_max_length=64, reward_batch_size=8, reward_grad_accum=1, reward_lr=1e-3, reward_epochs=2,
        reward_train_layers=0, reward_eval_every=8, reward_patience=50, reward_threads=1,
        reward_holdout_fraction=0.3, reward_min_holdout=10, reward_replay_fraction=0.0,
        ppo_iterations=4, ppo_batch_size=16, ppo_response_length=8, ppo_epochs=2, ppo_minibatches=1, ppo_lr=2e-4,
        ppo_train_layers=0, ppo_threads=1, gate_prompts=16, gate_samples=2, gate_min_win=0.55, gate_max_kl=3.0,
        gate_sanity_file=sanity, min_new_preferences=1)
    values.update(overrides)
    return make_settings(data_dir, **values)


@pytest.fixture(scope="module")
def world(yes_no_model: Path, tmp_path_factory: pytest.TempPathFactory, broker: Settings) -> dict[str, Any]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rounds")
    passing, failing = root / "sanity-pass.jsonl", root / "sanity-fail.jsonl"
    # what a random tiny model can pass: an answer at all, and it is one of the two it knows
    passing.write_text(json.dumps({"prompt": "Is the sky blue?", "expect": r"^(Yes|No)"}) + "\n")
    failing.write_text(json.dumps({"prompt": "What is the capital of France?", "expect": "Paris"}) + "\n")
    # v0 answers "No." about half the time; the votes teach "Yes.", so a round that learns them loses it
    said_no = root / "sanity-no.jsonl"
    rng = random.Random(3)
    said_no.write_text("".join(json.dumps({"prompt": question(rng)[0]["content"], "expect": "^No"}) + "\n"
                               for _ in range(3)))
    return {"root": root, "champion": yes_no_model, "pass": passing, "fail": failing, "no": said_no,
            "broker": broker}


def fill_store(settings: Settings, n: int = 80) -> int:
    rng = random.Random(1)
    store = PreferenceStore(settings.preferences_db)
    try:
        store.add_many([yes_vote(i, rng) for i in range(n)])
        return store.count()
    finally:
        store.close()


@pytest.fixture(scope="module")
def engine(world: dict[str, Any]) -> Iterator[Any]:
    from trainer.rollout_engine import RolloutEngine

    eng = RolloutEngine(make_settings(world["root"], engine_max_model_len=512), world["champion"],
                        max_model_len=512)
    yield eng
    eng.shutdown()


def snapshot(registry: Path) -> dict[str, Any]:
    files = {str(p.relative_to(registry)): p.read_bytes() if p.stat().st_size < 1 << 20 else p.stat().st_size
             for p in sorted(registry.rglob("*")) if p.is_file()}
    return files


def round_events(settings: Settings) -> list[dict[str, Any]]:
    """The rounds' JSON lines: one per PPO iteration, per round and per retention sweep."""
    return [json.loads(x) for x in (settings.data_dir / "rounds" / "events.jsonl").read_text().splitlines()]


def test_round_publishes_a_candidate_that_beats_the_champion(world: dict[str, Any], engine: Any) -> None:
    # in the module's folder, not tmp_path: later tests start from this round's reward model, and a
    # passing test's tmp_path is deleted as it ends (pyproject.toml, tmp_path_retention_policy)
    # lr 4e-4: the candidate is saved in float32 as trained, and four steps at the module's 2e-4 move
    # the yes/no model too little for its gate to tell (30 ties in 32 pairs)
    settings = round_settings(world["root"] / "first-round", world["champion"], world["broker"], world["pass"],
                              ppo_lr=4e-4)
    assert fill_store(settings) == 80
    world["first"] = settings.data_dir
    record = run_round(settings, engine=engine)
    assert record["outcome"] == "published", {k: record.get(k) for k in ("outcome", "reason", "ppo", "gate")}
    assert record["reward_refresh"]["accepted"] and record["reward_model"] == "rm-v1"
    # these votes' answers carry no finish reason: no vote between an ended and a cut-off answer, so
    # nothing asks for the missing-EOS penalty and the round (PPO and gate) ran without it
    assert record["missing_eos"] == {"penalty": 0.0, "ended_won": 0, "ended_lost": 0, "ended_share_low": 0.0}
    assert record["ppo_config"]["missing_eos_penalty"] == 0.0
    gate = record["gate"]
    # PPO raised the RM's reward on prompts it never trained on, and the win rate shows it
    assert gate["reward_candidate"] > gate["reward_champion"] + 0.2, gate
    assert gate["win_rate"] >= 0.55 and gate["passed"] and gate["sanity_passed"]
    # the reading at equal length is recorded beside the raw one (the raw one decides by default)
    assert 0.0 < gate["lc_win_rate"] < 1.0 and not gate["length_controlled"], gate
    assert gate["length_candidate"] > 0 and gate["length_champion"] > 0
    # bounded: the KL penalty holds the policy near v0. The gate's KL is k1 summed per answer, unbiased
    # but not non-negative (ppo_math.kl_per_token): a candidate this near v0 reads either side of 0
    # (-0.20 once, on an AVX2-only EPYC), so its size is what is bounded
    assert abs(gate["kl"]) <= settings.gate_max_kl, gate
    # read at the service's answer length (16 here), longer than the rollouts' 8
    assert gate["kl_max_tokens"] == settings.default_max_tokens > settings.ppo_response_length
    assert "kl_rollout_length" in gate and 0 < gate["kl_answer_tokens"] <= settings.default_max_tokens
    assert {"answers", "kl", "scores", "sanity"} <= set(gate["seconds"]), gate["seconds"]
    # two stages of 16 pairs (gate_samples 2): the second read only when the first did not settle it
    assert gate["pairs_planned"] == 32 and gate["pairs"] == gate["stages"][-1]["pairs"] in (16, 32), gate
    assert ("champion_answers" in gate["seconds"]) == (len(gate["stages"]) == 2), gate
    # the guard's last check read these very weights (saved in float32 as trained): the gate took its KL
    guard = record["ppo"]["sanity_guard"]
    assert gate["kl_read_by"] == "guard", (gate, guard)
    assert gate["kl"] == guard["kl"]["4"] == guard["candidate_kl"]["kl"], (gate, guard)
    print(f"\nheld-out reward champion {gate['reward_champion']:+.3f} -> candidate {gate['reward_candidate']:+.3f}, "
          f"win rate {gate['win_rate']:.3f}, KL {gate['kl']:.3f}; ppo {record['ppo']}")

    registry = Registry(settings.registry_path)
    info = registry.info(record["version"])
    assert (info.version, info.stage, info.parent) == ("v1", "candidate", "v0")
    assert info.training["missing_eos"] == record["missing_eos"]
    assert registry.state().champion == "v0"  # publishing never serves: rollout decides
    registry.verify("v1")
    assert info.training["round_id"] == record["round_id"] and info.gate["passed"]
    # #18: the rollout engine's configuration as vLLM reports it, not as the settings asked
    from kaizen.core.engine_config import serving_dtype

    rollout_engine = info.training["rollout_engine"]
    assert (rollout_engine["dtype"], rollout_engine["max_model_len"], rollout_engine["chunked_prefill"],
            rollout_engine["max_num_seqs"]) == (serving_dtype(settings), "512", "false",
                                                str(max(settings.engine_max_num_seqs, 64))), rollout_engine

    # one JSON line per iteration and per round; read_rounds shows it first
    iterations = [x for x in round_events(settings) if x["kind"] == "iteration"]
    assert len(iterations) == settings.ppo_iterations
    for key in ("reward_mean", "reward_std", "kl", "clipfrac", "vf_loss", "entropy", "approx_kl", "kl_coef",
                "tokens_per_s", "seconds"):
        assert key in iterations[0]
    assert read_rounds(settings, 5)[0]["round_id"] == record["round_id"]
    assert not (settings.data_dir / "rounds" / "state.json").exists()

    # the published folder: float32 as trained (KAIZEN_CANDIDATE_DTYPE), loads in transformers and vLLM
    from transformers import AutoModelForCausalLM

    path = registry.path("v1")
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (path / name).is_file(), name
    lm = AutoModelForCausalLM.from_pretrained(path)
    assert lm.dtype == torch.float32  # the bf16 champion's update, not rounded back to bf16
    engine.load_weights(path)
    from transformers import AutoTokenizer

    from trainer.policy import encode_prompt

    tok = AutoTokenizer.from_pretrained(path)
    answers = engine.generate([encode_prompt(tok, question(random.Random(9)), 64)], max_tokens=8,
                              temperature=0.0)
    assert answers[0].text.startswith("Yes"), answers

    # the model event reached Kafka
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers, consumer_timeout_ms=3000)
    tp = TopicPartition(settings.topic_model_events, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    events = [json.loads(m.value) for m in consumer]
    consumer.close()
    assert any(e["type"] == "published" and e["details"].get("round_id") == record["round_id"] for e in events)


def test_an_rloo_round_publishes_a_candidate_that_beats_the_champion(world: dict[str, Any], engine: Any,
                                                                     tmp_path: Path) -> None:
    """The round with KAIZEN_POLICY_ALGORITHM=rloo (two answers per prompt, the leave-one-out baseline)
    publishes as PPO's does, through the same gate. The short loop (tests/test_loop.py) runs PPO and DPO
    end to end; this is RLOO's round on the same engine, without a loop of its own."""
    settings = round_settings(tmp_path, world["champion"], world["broker"], world["pass"],
                              policy_algorithm="rloo", rloo_k=2, ppo_iterations=8)
    fill_store(settings)  # and its own reward refresh, so the test reads the same alone or after the first
    record = run_round(settings, engine=engine)
    assert record["outcome"] == "published", json.dumps({k: record.get(k) for k in ("gate", "ppo")}, default=str)
    gate = record["gate"]
    assert gate["passed"] and gate["win_rate"] >= 0.55 and gate["reward_candidate"] > gate["reward_champion"], gate
    print(f"\nrloo: win rate {gate['win_rate']:.3f} {gate['win_rate_ci95']}, KL {gate['kl']:.3f}")
    info = Registry(settings.registry_path).info(record["version"])
    assert info.training["config"]["algorithm"] == "rloo" and info.parent == "v0"


def test_a_round_from_v1_measures_its_kl_penalty_against_v0_when_asked(world: dict[str, Any], engine: Any,
                                                                        tmp_path: Path) -> None:
    """KAIZEN_PPO_REFERENCE=base: a round starting from a promoted v1 penalises KL to the root of v1's
    lineage (v0), not to v1, so drift stays bounded over rounds. Its first rollouts, sampled from v1
    before any update, already read a KL above zero; with the champion as reference they read zero.
    That first KL is over a KL budget of 0.05 (KAIZEN_PPO_STOP_KL, a window of one iteration): the
    round stops its update there, after 1 of 4 iterations, and says why. The update's guard and the
    gate read KL against v0 too, so gate_max_kl bounds the drift of all rounds together: a candidate
    one iteration from v1 reads v1's distance from v0 there (in the forty-fourth loop row the gate read
    1.10 nats to v1 for a candidate 4.97 from v0, and passed it), and a bound below that distance
    refuses it, where the same bound passes the same step measured from v1."""
    data = tmp_path / "data"
    shutil.copytree(world["first"], data, symlinks=True)  # the first round's store, reward model, v0, v1
    base = round_settings(data, world["champion"], world["broker"], world["pass"], ppo_iterations=1)
    Registry(base.registry_path).promote("v1", who="test")
    round_kl = 2.5  # under gate_max_kl (3.0), over the step's ~1.9 nats from v0

    def first_kl(settings: Settings) -> tuple[dict[str, Any], float]:
        record = run_round(settings, engine=engine)
        first = next(x for x in round_events(settings)
                     if x["kind"] == "iteration" and x["round_id"] == record["round_id"])
        return record, first["kl"]

    record, kl = first_kl(base.model_copy(update={"ppo_reference": "base", "ppo_iterations": 4,
                                                  "ppo_stop_kl": 0.05, "ppo_stop_kl_window": 1,
                                                  "ppo_round_kl": round_kl}))
    ppo, gate = record["ppo"], record["gate"]
    assert ppo["kl_reference"] == "v0" and kl > 0.05, kl
    assert ppo["iterations"] == 1 and ppo["kl_budget_spent"] is True, ppo
    assert gate["kl_reference"] == "v0", gate
    to_v0 = gate["kl"]
    # KAIZEN_PPO_ROUND_KL: the guard read v1's own distance from v0 first (as v1's gate read it: the same
    # prompts, seeds and weights; on the tiny model a noisy k1 estimate, of either sign), then capped the
    # round at round_kl more. The guard reads the weights the KL budget stopped on (since dfb2371): the
    # cap is above the ~1.9 nats one step from v1 reads to v0 on the tiny model (CI 2026-12-06: a cap of 1
    # sent the weights back and left nothing to gate)
    guard, v1_kl = ppo["sanity_guard"], Registry(base.registry_path).manifest("v1").gate["kl"]
    assert guard["start_kl"] == pytest.approx(v1_kl, abs=1e-4) and guard["start_kl"] != 0.0, (guard, v1_kl)
    assert guard["max_kl"] == pytest.approx(min(base.gate_max_kl, guard["start_kl"] + round_kl)), guard
    record, kl = first_kl(base)
    ppo, gate = record["ppo"], record["gate"]
    assert ppo["kl_reference"] == "v1" and abs(kl) < 0.02, kl
    assert "kl_budget_spent" not in ppo  # no budget set: the key is absent
    print(f"\ngate KL of a step from v1: {to_v0:.3f} to v0, {gate['kl']:.3f} to v1")
    assert gate["kl_reference"] == "v1" and to_v0 > max(0.1, 2 * gate["kl"]), (to_v0, gate)
    # a bound between the two readings: spent from v0 (the guard keeps nothing), not from v1
    bound = {"gate_max_kl": (to_v0 + max(gate["kl"], 0.0)) / 2}
    record, _ = first_kl(base.model_copy(update={"ppo_reference": "base", **bound}))
    assert record["outcome"] == "skipped" and "guard" in record["reason"], record
    guard_kl = record["ppo"]["sanity_guard"]["kl"]["1"]  # after the last iteration: what the gate would read
    assert guard_kl == pytest.approx(to_v0, rel=0.1, abs=0.05), (guard_kl, to_v0)
    record, _ = first_kl(base.model_copy(update=bound))
    gate = record["gate"]
    assert gate["kl"] <= bound["gate_max_kl"] and not any(f.startswith("KL") for f in gate["failed"]), gate
    # KAIZEN_GATE_MAX_KL_PER_TOKEN: the same step from v0 under the same per-answer bound, but judged per
    # token against a budget it is under: the guard keeps it and the gate does not refuse it for KL
    per_token = 2 * guard_kl / record["gate"]["kl_answer_tokens"] + 0.05
    record, _ = first_kl(base.model_copy(update={"ppo_reference": "base", **bound,
                                                 "gate_max_kl_per_token": per_token}))
    assert record["outcome"] != "skipped", record
    guard, gate = record["ppo"]["sanity_guard"], record["gate"]
    assert guard["max_kl"] == pytest.approx(per_token) and guard["failed_at"] is None, guard
    assert gate["kl"] > bound["gate_max_kl"], gate  # over the per-answer bound, which no longer applies
    assert gate["kl_per_token"] == pytest.approx(gate["kl"] / gate["kl_answer_tokens"]), gate
    assert not any(f.startswith("KL") for f in gate["failed"]), gate


#: The tiny champion says "No." to world["no"]'s questions in 19-38% of its 8-token answers, and
#: two iterations towards "Yes." took 12-19 points of it in one run: a finer check than the default's.
SAID_NO = {"gate_sanity_samples": 32, "gate_sanity_max_drop": 0.08}


def test_candidate_failing_the_sanity_prompts_is_rejected(world: dict[str, Any], engine: Any,
                                                          tmp_path: Path) -> None:
    """A candidate that lost what the champion answered (v0 says "No." to these questions half the
    time; votes for "Yes." at a large learning rate teach it to stop) is rejected, never served, by
    the gate (the guard off: KAIZEN_PPO_SANITY_EVERY=0). #19 item 6: retention runs after the round
    and deletes the rejected copy (it used to stay forever: ~540 MB a round)."""
    settings = round_settings(tmp_path, world["champion"], world["broker"], world["no"], ppo_iterations=2,
                              ppo_lr=2e-3, ppo_sanity_every=0, **SAID_NO)
    fill_store(settings)
    record = run_round(settings, engine=engine)
    assert record["outcome"] == "rejected", {k: record.get(k) for k in ("gate", "ppo")}
    gate = record["gate"]
    assert not gate["sanity_passed"] and not gate["passed"]
    assert any("sanity" in f for f in gate["failed"]), gate["failed"]
    champion = {c["prompt"]: c["share"] for c in gate["sanity_champion"]}
    assert min(champion.values()) >= 0.1, champion  # v0 did say "No." to each
    assert any(s["share"] < champion[s["prompt"]] - settings.gate_sanity_max_drop for s in gate["sanity"])
    registry = Registry(settings.registry_path)
    assert registry.state().champion == "v0"  # never served
    # #19 item 6: retention ran after the round: the rejected copy is deleted, its audit trail (with
    # the gate's numbers) stays, and its number is not given out again
    assert registry.names() == ["v0"] and not registry.path(record["version"]).exists()
    trail = registry.audit(version=record["version"])
    assert [(e.action, e.to_stage) for e in trail] == [("publish", "rejected"), ("delete", None)]
    assert trail[1].details["gate"]["sanity_passed"] is False
    assert trail[1].details["round_id"] == record["round_id"]
    assert [e["versions"] for e in round_events(settings) if e["kind"] == "retention"] == [[record["version"]]]


def test_a_round_whose_update_breaks_the_sanity_prompts_before_any_check_passed_is_skipped(
        world: dict[str, Any], engine: Any, tmp_path: Path) -> None:
    """The same update with the guard checking after its last iteration, and not halving its step
    (KAIZEN_PPO_GUARD_HALVINGS=0): the check fails with no earlier one passed, so there is no
    candidate; the round ends `skipped`, publishes nothing, and its record says why, with the PPO
    figures and config a published round keeps."""
    settings = round_settings(tmp_path, world["champion"], world["broker"], world["no"], ppo_iterations=2,
                              ppo_lr=2e-3, ppo_sanity_every=2, ppo_guard_halvings=0, **SAID_NO)
    fill_store(settings)
    record = run_round(settings, engine=engine)
    assert record["outcome"] == "skipped", {k: record.get(k) for k in ("outcome", "reason", "ppo", "gate")}
    assert "failed the guard's checks (sanity prompts, KL) before any passed" in record["reason"]
    guard = record["ppo"]["sanity_guard"]
    assert (guard["every"], guard["failed_at"], guard["kept_iteration"]) == (2, 2, 0), guard
    drop = settings.gate_sanity_max_drop
    assert all(f["share"] < f["reference_share"] - drop for f in guard["failed"]) and guard["failed"]
    assert record["ppo_config"]["sanity_every"] == 2 and record["distributed"]["world_size"] == 1
    assert "gate" not in record and Registry(settings.registry_path).names() == ["v0"]


def test_the_sanity_guard_stops_on_a_broken_answer_and_puts_the_last_good_weights_back(
        world: dict[str, Any], engine: Any, tmp_path: Path) -> None:
    """KAIZEN_PPO_SANITY_EVERY (trainer/ppo_loop.py): the guard reads the sanity check's sampled answers
    (trainer/sanity.py) from the engine holding each iteration's weights. v0 answers these questions
    "Yes." or "No." about half the time each; a small step keeps that share, a policy whose final norm
    is negated (its logits too) loses it at the check, and the guard puts back the weights of the
    last check that passed, whose answers are again the starting weights' share."""
    from types import SimpleNamespace

    from trainer.distributed import ONE_PROCESS
    from trainer.policy import load_policy
    from trainer.ppo_config import PPOConfig
    from trainer.ppo_loop import UpdateGuard
    from trainer.rollout_engine import sync_weights
    from trainer.sanity import SanityCheck

    policy, tok, _ = load_policy(world["champion"])
    rng = random.Random(7)
    items = [{"prompt": question(rng)[0]["content"], "expect": "^(Yes|No)"} for _ in range(3)]
    items.append({"prompt": "What is the capital of France?", "expect": "Paris"})  # v0 never says it
    trainer: Any = SimpleNamespace(engine=engine, tokenizer=tok, policy=policy, dist=ONE_PROCESS,
                                   sync=lambda: sync_weights(policy, engine, tmp_path / "sync"))
    config = PPOConfig(iterations=6, response_length=8, sanity_every=2, guard_halvings=1)
    guard = UpdateGuard(SanityCheck(items, samples=16, max_drop=0.25, seed=11, confirm=16, max_tokens=8))
    engine.load_weights(world["champion"])
    guard.start(trainer, config)
    baseline = {b["prompt"]: b["share"] for b in guard.baseline or []}
    assert baseline.pop("What is the capital of France?") == 0.0 and min(baseline.values()) >= 0.75, baseline
    norm = policy.lm.model.norm.weight
    before = norm.detach().clone()
    with torch.no_grad():
        norm.mul_(1.01)  # a small step: the answers hold
    sync_weights(policy, engine, tmp_path / "sync")
    assert not guard.after(trainer, config, 1) and guard.good_iteration == 0  # not a check iteration
    assert not guard.after(trainer, config, 2) and guard.good_iteration == 2
    kept = norm.detach().clone()
    with torch.no_grad():
        norm.mul_(-1.0)
    sync_weights(policy, engine, tmp_path / "sync")
    assert guard.after(trainer, config, 4), guard.record(config)
    assert guard.record(config)["failed_at"] == 4 and guard.record(config)["kept_iteration"] == 2
    assert guard.failed and {f["prompt"] for f in guard.failed} <= {x["prompt"] for x in items[:3]}
    assert all(f["share"] < f["reference_share"] - 0.25 for f in guard.failed), guard.failed
    assert all(f["samples"] == 32 and "first_share" in f for f in guard.failed), guard.failed  # confirmed
    # halfway back (a zero final norm: every logit 0) fails as well, so the kept step's weights return
    assert "kept_fraction" not in guard.record(config) and not guard.kept_nothing
    assert torch.equal(norm, kept) and not torch.equal(norm, before)
    sync_weights(policy, engine, tmp_path / "sync")
    assert guard.failing(trainer) == []


def test_a_check_that_leaves_no_time_for_another_iteration_is_the_updates_last(
        world: dict[str, Any], engine: Any, tmp_path: Path) -> None:
    """TimeBudget (trainer/ppo_loop.py): before the first check its length is unknown, so the update
    reads the room again after each check. Here (seconds on a clock the test keeps: a step takes 10,
    a check 100, a slow machine's figures, which the tiny model cannot take for real) the budget of
    200 fits iterations 1 and 2; the check after 2 leaves no room for a third and the check after it,
    so the update stops on the weights that check read, within its budget, with one check, not two
    (the slow EPYC's loop row of 2026-12-06 ran iteration 6 after the check at 5 and overran by 185 s).
    The guard, the sanity check, the engine and the weights are real."""
    from types import SimpleNamespace

    from trainer.distributed import ONE_PROCESS
    from trainer.policy import load_policy
    from trainer.ppo import IterationStats
    from trainer.ppo_config import PPOConfig
    from trainer.ppo_loop import TimeBudget, UpdateGuard, run_ppo
    from trainer.rollout_engine import sync_weights
    from trainer.sanity import SanityCheck

    policy, tok, _ = load_policy(world["champion"])
    now = [0.0]
    norm = policy.lm.model.norm.weight

    done: list[int] = []

    def step(prompts: list[Any]) -> IterationStats:
        with torch.no_grad():
            norm.mul_(1.001)  # a small step: the sanity answers hold
        sync_weights(policy, engine, tmp_path / "sync")
        now[0] += 10.0
        done.append(len(done) + 1)
        return IterationStats(done[-1], *[0.0] * 15)  # type: ignore[arg-type]

    trainer: Any = SimpleNamespace(engine=engine, tokenizer=tok, policy=policy, dist=ONE_PROCESS,
                                   rng=random.Random(3), length_fit=SimpleNamespace(slope=0.0), step=step)
    rng = random.Random(7)
    check = SanityCheck([{"prompt": question(rng)[0]["content"], "expect": "^(Yes|No)"}],
                        samples=8, max_drop=0.5, seed=11, confirm=0, max_tokens=8)

    def slow(guard: UpdateGuard) -> UpdateGuard:
        """The guard with its checks taking 100 s on the test's clock."""
        read = guard.failing

        def failing(trainer: Any) -> list[dict[str, Any]]:
            now[0] += 100.0
            return read(trainer)

        guard.failing = failing  # type: ignore[method-assign]
        return guard

    guard = slow(UpdateGuard(check))
    engine.load_weights(world["champion"])
    prompts = [[{"role": "user", "content": "Hi"}]] * 4
    budget = TimeBudget(200.0, clock=lambda: now[0])
    config = PPOConfig(iterations=6, response_length=8, sanity_every=2)
    history = run_ppo(config, trainer, prompts, guard=guard, budget=budget)
    assert [h.iteration for h in history] == [1, 2], budget.record()
    assert budget.checks == [100.0] and budget.spent and now[0] <= budget.ends_at, (budget.record(), now)
    assert guard.good_iteration == 2 and guard.failed_at is None
    assert guard.record(config)["kept_iteration"] == 2
    # checking every 4th, a budget of 125 fits 4 steps but not the check after them, unknown before it
    # runs: an overrun, unless the check's length is known before (the latest round's: check_prior)
    config = PPOConfig(iterations=6, response_length=8, sanity_every=4)
    for prior, iterations in ((0.0, [1, 2, 3, 4]), (100.0, [1, 2])):
        now[0], done[:] = 0.0, []
        budget = TimeBudget(125.0, clock=lambda: now[0], check_prior=prior)
        history = run_ppo(config, trainer, prompts, guard=slow(UpdateGuard(check)), budget=budget)
        assert [h.iteration for h in history] == iterations, budget.record()
        assert budget.spent and (now[0] <= budget.ends_at) == bool(prior), (budget.record(), now)


def test_a_round_out_of_time_stops_its_update_and_checks_the_weights_it_stops_on(
        world: dict[str, Any], engine: Any, tmp_path: Path) -> None:
    """KAIZEN_ROUND_MAX_MINUTES: the update starts an iteration only if it still leaves the gate its
    expected time (the champion's gate answers, measured in the round, x round_gate_factor averaged
    with the latest gated rounds' measured ratios). Here the factor leaves none, so one iteration of the four runs; the guard, which checks every 5th iteration and
    the last, checks that one (it is the candidate the gate reads), and the record says why the
    update stopped. The refresh's share of the budget is the reward training's time limit."""
    from trainer.round_phases import gate_factor, refresh_minutes

    settings = round_settings(tmp_path, world["champion"], world["broker"], world["pass"], ppo_lr=4e-4,
                              round_max_minutes=10.0, round_refresh_share=1.0, round_gate_factor=1e6)
    assert settings.ppo_iterations == 4 and settings.ppo_sanity_every == 5
    fill_store(settings)
    record = run_round(settings, engine=engine)
    assert record["outcome"] in ("published", "rejected"), {k: record.get(k) for k in ("outcome", "reason")}
    ppo = record["ppo"]
    assert ppo["iterations"] == 1, ppo
    assert ppo["time_budget"]["stopped_the_update"] and ppo["time_budget"]["seconds"] < 0, ppo["time_budget"]
    assert ppo["time_budget"]["longest_iteration_s"] > 0 and ppo["time_budget"]["longest_check_s"] > 0
    guard = ppo["sanity_guard"]
    assert (guard["every"], guard["failed_at"], guard["kept_iteration"]) == (5, None, 1), guard
    assert [e["iteration"] for e in round_events(settings) if e["kind"] == "iteration"] == [1]
    # the next round reserves for its gate the mean of the setting's factor and what the latest gated
    # rounds' took, in units of their champion's answers
    timings = record["timings"]
    measured = timings["gate"] / timings["gate_champion"]
    assert gate_factor(settings.model_copy(update={"round_gate_factor": 0.0})) == pytest.approx(measured / 2)
    assert gate_factor(settings) == pytest.approx((1e6 + measured) / 2)
    assert gate_factor(settings.model_copy(update={"round_gate_history": 0})) == 1e6
    fresh = round_settings(tmp_path / "no-rounds", world["champion"], world["broker"], world["pass"])
    assert gate_factor(fresh) == fresh.round_gate_factor == 3.5
    # the refresh's limit: the round's share, or reward_max_minutes where that is less
    shares = [refresh_minutes(settings.model_copy(update=u)) for u in (
        {"round_refresh_share": 0.3}, {"round_refresh_share": 0.3, "reward_max_minutes": 2.0},
        {"round_max_minutes": None}, {"round_max_minutes": None, "reward_max_minutes": 4.0})]
    assert shares == [pytest.approx(3.0), 2.0, None, 4.0], shares


def test_a_sanity_prompt_that_fails_on_its_first_answers_is_decided_on_all_of_them(
        world: dict[str, Any], engine: Any) -> None:
    """KAIZEN_GATE_SANITY_CONFIRM_SAMPLES (trainer/sanity.py): a prompt whose share fails on the first
    answers is read on more, on the seeds after them, and decided on all. The champion is read here
    against its own full reading with no drop allowed: a prompt whose first 16 answers say "Yes" less
    often than all 64 fails that screen by chance alone; its 48 more answers pool to the reference's
    own count (the same weights on the same seeds), and nothing fails."""
    from trainer.sanity import SanityCheck

    tok = AutoTokenizer.from_pretrained(world["champion"])
    rng = random.Random(5)
    items = [{"prompt": question(rng)[0]["content"], "expect": "^Yes"} for _ in range(10)]
    check = SanityCheck(items, samples=16, max_drop=0.0, seed=23, confirm=48, max_tokens=8, temperature=1.0,
                        max_prompt_length=64)
    engine.load_weights(world["champion"])
    reference = check.answers(engine, tok, full=True)
    assert [r["samples"] for r in reference] == [64] * 10 and 0 < reference[0]["share"] < 1, reference
    first = check.answers(engine, tok)
    screened = {f["prompt"] for f in check.failed(reference, first)}
    assert screened, [(f["share"], r["share"]) for f, r in zip(first, reference, strict=True)]
    now, failed = check.read(engine, tok, reference)
    assert failed == [], failed
    for n, f, r in zip(now, first, reference, strict=True):
        if n["prompt"] in screened:
            assert (n["samples"], n["matched"], n["first_share"]) == (64, r["matched"], f["share"]), (n, r)
        else:
            assert n["samples"] == 16 and "first_share" not in n, n


@dataclass
class GuardRig:
    """What the guard's tests drive by hand: a policy (the tiny champion) the engine reads through
    `trainer.sync()`, a second copy as the KL reference, the gate's settings at 24 tokens, six
    held-out prompts, and a stand-in for the PPO trainer with the parts the guard reads."""

    policy: Any
    tok: Any
    reference: Any
    settings: Settings
    config: Any
    held_ids: list[list[int]]
    trainer: Any

    def unpacked(self) -> tuple[Any, Any, Any, Settings, Any, list[list[int]], Any]:
        return (self.policy, self.tok, self.reference, self.settings, self.config, self.held_ids,
                self.trainer)

    def at(self, scale: float) -> torch.Tensor:
        """The policy with its final norm at `scale` x the champion's, synced to the engine; the norm."""
        norm: torch.Tensor = self.policy.lm.model.norm.weight
        with torch.no_grad():
            norm.copy_(self.reference.lm.model.norm.weight * scale)
        self.trainer.sync()
        return norm

    def kl(self) -> float:
        """The guard's (and the gate's) KL reading of what the engine holds, against the champion."""
        from trainer.gate import checked_kl
        from trainer.ppo_loop import KLProbe

        probe = KLProbe(self.reference, self.held_ids, self.settings, max_kl=0.0)
        return checked_kl(probe.read(self.trainer, self.config), self.settings)


def guard_rig(world: dict[str, Any], engine: Any, tmp_path: Path, halvings: int) -> GuardRig:
    from types import SimpleNamespace

    from trainer.distributed import ONE_PROCESS
    from trainer.policy import encode_prompt, load_policy
    from trainer.ppo_config import PPOConfig
    from trainer.rollout_engine import sync_weights

    policy, tok, _ = load_policy(world["champion"])
    reference, _, _ = load_policy(world["champion"])
    settings = round_settings(tmp_path / "data", world["champion"], world["broker"], world["pass"],
                              default_max_tokens=24, gate_samples=2, gate_kl_samples=2)
    config = PPOConfig.from_settings(settings, iterations=6, sanity_every=2, guard_halvings=halvings)
    held_ids = [encode_prompt(tok, question(random.Random(40 + i)), 64) for i in range(6)]
    trainer = SimpleNamespace(engine=engine, tokenizer=tok, policy=policy, dist=ONE_PROCESS,
                              sync=lambda: sync_weights(policy, engine, tmp_path / "sync"))
    return GuardRig(policy, tok, reference, settings, config, held_ids, trainer)


def test_the_guard_keeps_the_last_weights_under_the_gates_kl_and_reads_it_as_the_gate_will(
        world: dict[str, Any], engine: Any, tmp_path: Path) -> None:
    """KAIZEN_PPO_GUARD_KL_FRACTION: at each check the guard reads the policy's KL to the champion as
    the gate does (its held-out prompts and seeds, at the service's answer length). A small step stays
    under the limit; a policy whose final norm is negated (its logits too) is far past it, and the
    guard puts back the small step's weights. The gate's own reading of those weights, saved and
    loaded into the engine as a candidate is, is the guard's: the guard hands over what will pass."""
    from trainer.gate import GateModels, candidate_kl, held_answers
    from trainer.policy import save_policy
    from trainer.ppo_loop import KLProbe, UpdateGuard

    rig = guard_rig(world, engine, tmp_path, halvings=1)  # 8 tokens
    policy, tok, reference, settings, config, held_ids, trainer = rig.unpacked()
    guard = UpdateGuard(probe=KLProbe(reference, held_ids, settings, max_kl=1.0))
    engine.load_weights(world["champion"])
    try:
        guard.start(trainer, config)
        norm = policy.lm.model.norm.weight
        with torch.no_grad():
            norm.mul_(1.02)
        trainer.sync()
        assert not guard.after(trainer, config, 2), guard.record(config)
        small = guard.kls[2]
        assert 0.0 < small < 1.0 and guard.good_iteration == 2, guard.kls
        assert guard.candidate_kl == guard.readings[2] and guard.candidate_kl["kl"] == small
        assert not guard.after(trainer, config, 3) and guard.candidate_kl is None  # moved, not checked
        kept = norm.detach().clone()
        save_policy(policy, tok, tmp_path / "kept", torch.float32)
        with torch.no_grad():
            norm.mul_(-1.0)
        trainer.sync()
        assert guard.after(trainer, config, 4), guard.record(config)
        record = guard.record(config)
        assert record["failed_at"] == 4 and record["kept_iteration"] == 2 and "failed" not in record, record
        assert record["kl"]["4"] > 1.0 and record["max_kl"] == 1.0, record
        assert record["kl"]["x0.5"] > 1.0 and "kept_fraction" not in record, record  # halfway: a zero norm
        assert torch.equal(norm, kept)
        engine.load_weights(tmp_path / "kept")  # as the gate loads the candidate
        models = GateModels(scorer=None, reference=reference, tokenizer=tok)  # type: ignore[arg-type]
        gate = candidate_kl(engine, tmp_path / "kept", models, held_ids,
                            held_answers(engine, held_ids, settings, config), settings, config)
        assert gate["kl_max_tokens"] == 24 and gate["kl"] == pytest.approx(small, abs=1e-3), (gate, small)
        # back on iteration 2's weights, the guard holds their reading: the gate may take it as its own
        assert record["candidate_kl"] == guard.readings[2], record
        taken = candidate_kl(engine, tmp_path / "kept", models, held_ids,
                             held_answers(engine, held_ids, settings, config), settings, config,
                             known=record["candidate_kl"])
        assert (gate["kl_read_by"], taken["kl_read_by"], taken["kl"]) == ("gate", "guard", small), taken
        assert taken["kl_rollout_length"] == pytest.approx(gate["kl_rollout_length"], abs=1e-3), (taken, gate)
    finally:
        engine.load_weights(world["champion"])


def test_the_guard_keeps_half_of_a_step_that_went_too_far_where_half_passes(
        world: dict[str, Any], engine: Any, tmp_path: Path) -> None:
    """KAIZEN_PPO_GUARD_HALVINGS: a check that fails does not throw the whole step since the last good
    weights away: the guard tries halfway between them and keeps that if it passes. The limit is set
    between the KL of the halfway weights and of the far ones, both read first; the guard keeps the
    halfway weights (the round's candidate: not `kept_nothing`, though no check had passed before)
    and its record reads their KL as the probe did."""
    from trainer.ppo_loop import KLProbe, UpdateGuard

    rig = guard_rig(world, engine, tmp_path, halvings=2)
    _, _, reference, settings, config, held_ids, trainer = rig.unpacked()
    start = reference.lm.model.norm.weight

    def kl_at(scale: float) -> float:
        rig.at(scale)
        return rig.kl()

    engine.load_weights(world["champion"])
    try:
        near, far = kl_at(1.25), kl_at(1.5)  # halfway from 1.0 to 1.5, and 1.5
        assert 0.0 < near < far, (near, far)
        rig.at(1.0)
        guard = UpdateGuard(probe=KLProbe(reference, held_ids, settings, max_kl=(near + far) / 2))
        guard.start(trainer, config)
        norm = rig.at(1.5)
        assert guard.after(trainer, config, 2), guard.record(config)
        record = guard.record(config)
        assert (record["failed_at"], record["kept_iteration"], record["kept_fraction"]) == (2, 0, 0.5), record
        assert record["kl"]["2"] == pytest.approx(far, abs=1e-3) and not guard.kept_nothing, record
        assert record["kl"]["x0.5"] == pytest.approx(near, abs=1e-3), record
        assert record["candidate_kl"]["kl"] == record["kl"]["x0.5"], record  # what the gate will take
        assert torch.allclose(norm, start * 1.25), (norm[:4], start[:4])
    finally:
        engine.load_weights(world["champion"])


def test_the_guard_caps_what_one_round_adds_to_its_starting_weights_kl(
        world: dict[str, Any], engine: Any, tmp_path: Path) -> None:
    """KAIZEN_PPO_ROUND_KL: a round that starts away from its reference (ppo_reference=base from a
    later version) reads its starting weights' KL first and may add only round_kl to it, however much
    of the budget (max_kl) is left. A step the budget alone lets through fails the round's cap, and the
    weights go back to the start; a cap above the step passes it."""
    from trainer.ppo_loop import KLProbe, UpdateGuard

    rig = guard_rig(world, engine, tmp_path, halvings=0)
    _, _, reference, settings, config, held_ids, trainer = rig.unpacked()
    v0 = reference.lm.model.norm.weight

    def guarded(round_kl: float) -> UpdateGuard:
        """A round from the weights at 1.25 (a "v1"), stepped to 1.5, under a budget of 100 nats."""
        rig.at(1.25)
        probe = KLProbe(reference, held_ids, settings, max_kl=100.0, round_kl=round_kl, from_start=True)
        guard = UpdateGuard(probe=probe)
        guard.start(trainer, config)
        rig.at(1.5)
        guard.after(trainer, config, 2)
        return guard

    try:
        rig.at(1.25)
        near = rig.kl()
        norm = rig.at(1.5)
        far = rig.kl()
        assert 0.0 < near < far < 100.0, (near, far)
        capped = guarded((far - near) / 2)
        record = capped.record(config)
        assert record["start_kl"] == pytest.approx(near, abs=1e-3), record
        assert record["max_kl"] == pytest.approx(near + (far - near) / 2, abs=1e-3), record
        assert record["failed_at"] == 2 and capped.kept_nothing, record  # the budget alone passes it
        assert torch.allclose(norm, v0 * 1.25), "the weights went back to the round's start"
        roomy = guarded(2 * (far - near)).record(config)
        assert roomy["failed_at"] is None and roomy["kept_iteration"] == 2, roomy
        assert roomy["kl"]["2"] == pytest.approx(far, abs=1e-3) and far < roomy["max_kl"], roomy
    finally:
        engine.load_weights(world["champion"])


def test_new_weights_never_read_the_old_weights_cached_prompt(world: dict[str, Any], engine: Any,
                                                              tiny_model: Path) -> None:
    """vLLM caches full KV blocks (128 tokens on CPU) by their tokens alone, and reloading weights
    kept them: the gate's candidate answered its held-out prompts on the champion's keys and values,
    the evaluation's v1 on v0's. After `load_weights` a long prompt reads the same as from a cache
    emptied by hand."""
    from trainer.policy import encode_prompt

    tok = AutoTokenizer.from_pretrained(world["champion"])
    prompt = encode_prompt(tok, [{"role": "user", "content": " ".join(question(random.Random(3))[0]["content"]
                                                                     for _ in range(40))}], 512)
    assert len(prompt) > 2 * 128, len(prompt)  # two full blocks at least

    def greedy() -> list[int]:
        return list(engine.generate([prompt], max_tokens=8, temperature=0.0)[0].token_ids)

    engine.load_weights(world["champion"])
    champion = greedy()  # its blocks are cached now
    engine.load_weights(tiny_model)
    after_reload = greedy()
    assert engine.llm.reset_prefix_cache()
    assert after_reload == greedy() != champion, (after_reload, champion)


def test_the_gate_reads_kl_at_the_services_answer_length(world: dict[str, Any], engine: Any,
                                                          tiny_model: Path) -> None:
    """The gate's KL is read on answers as long as the service's (default_max_tokens), not cut at the
    rollouts' length: a policy PPO shaped over 64 tokens drifted past them unseen (v2 of the loop's
    twenty-seventh row: 1.46 nats at 64 tokens, 4.88 at 256). The candidate here is the random tiny
    model, whose answers run to any limit, against the yes/no champion as the reference. Either way
    it reads gate_kl_samples answers per prompt."""
    from trainer.gate import GateModels, candidate_kl, held_answers, read_kl
    from trainer.policy import encode_prompt, load_policy
    from trainer.ppo_config import PPOConfig

    reference, tokenizer, _ = load_policy(world["champion"])
    models = GateModels(scorer=None, reference=reference, tokenizer=tokenizer)  # type: ignore[arg-type]
    held_ids = [encode_prompt(tokenizer, question(random.Random(i)), 64) for i in range(4)]
    engine.load_weights(tiny_model)
    try:
        def kl_at(service_tokens: int, kl_samples: int = 1) -> dict[str, Any]:
            settings = round_settings(world["root"] / "kl", world["champion"], world["broker"], world["pass"],
                                      default_max_tokens=service_tokens, gate_kl_samples=kl_samples)
            config = PPOConfig.from_settings(settings)  # rollouts of 8 tokens
            cand = engine.generate(held_ids, max_tokens=config.response_length, temperature=1.0, n=2, seed=3)
            return candidate_kl(engine, tiny_model, models, held_ids, cand, settings, config)

        longer = kl_at(32)
        assert longer["kl_max_tokens"] == 32 and longer["kl_answer_tokens"] > 8, longer
        # KL sums over an answer's tokens: four times the tokens, well over the rollouts' reading
        assert longer["kl"] > 2 * longer["kl_rollout_length"] > 0, longer
        assert longer["kl_answers"] == 4  # gate_kl_samples (1) per prompt
        same = kl_at(8)  # the service no longer than the rollouts: the gate's own answers, no second pass
        assert same["kl_max_tokens"] == 8 and "kl_rollout_length" not in same
        assert same["kl_answer_tokens"] <= 8
        # of the gate's two answers per prompt, the first gate_kl_samples are read, not all of them
        assert same["kl_answers"] == 4 and kl_at(8, kl_samples=2)["kl_answers"] == 8
        # the guard (no answers of the gate's to hand) samples as many on the gate's seeds: the answers
        # the gate will read among its own, so both read the same KL
        settings = round_settings(world["root"] / "kl", world["champion"], world["broker"], world["pass"],
                                  default_max_tokens=8, gate_samples=3)
        config = PPOConfig.from_settings(settings)
        policy, _, _ = load_policy(tiny_model)
        guard = read_kl(engine, policy, reference, tokenizer, held_ids, settings, config)
        own = held_answers(engine, held_ids, settings, config)  # the gate's: gate_samples per prompt
        gate = candidate_kl(engine, tiny_model, models, held_ids, own, settings, config)
        assert guard["kl_answers"] == gate["kl_answers"] == 4
        assert guard["kl"] == pytest.approx(gate["kl"], abs=1e-4) and gate["kl"] != 0.0, (guard, gate)
    finally:
        engine.load_weights(world["champion"])


def test_the_gate_in_stages_reads_the_pairs_all_at_once_would_and_stops_when_settled(
        world: dict[str, Any], engine: Any, tiny_model: Path, tmp_path: Path) -> None:
    """KAIZEN_GATE_STAGES: the gate reads its answers stage by stage, the champion's later ones drawn
    with its weights reloaded, on the seeds all at once would use, so read to the end it compares the
    very pairs of a one-stage gate; and it stops after the first stage when that settles the verdict.
    The candidate is the random tiny model against the yes/no champion; the reward here is a function
    of the answer's text (a CRC, mixed wins and losses; then whether it says yes or no, which the
    random model seldom does):
    the stages are under test, not a reward model."""
    import zlib

    from trainer.gate import ChampionAnswers, GateModels, gate_answers, held_answers, measure_gate
    from trainer.policy import load_policy
    from trainer.ppo_config import PPOConfig
    from trainer.sanity import SanityCheck

    anything = tmp_path / "sanity-any.jsonl"  # a sanity prompt every model passes
    anything.write_text(json.dumps({"prompt": "Is the sky blue?", "expect": ""}) + "\n")
    reference, tok, _ = load_policy(world["champion"])
    prompts = [question(random.Random(60 + i)) for i in range(8)]

    def gate(reward: Any, **overrides: Any) -> dict[str, Any]:
        settings = round_settings(tmp_path / "data", world["champion"], world["broker"], anything,
                                  gate_samples=4, gate_max_kl=1e9, **overrides)
        config = PPOConfig.from_settings(settings, missing_eos_penalty=0.0)
        models = GateModels(reward, reference, tok, reference_version="v0")
        check = SanityCheck.from_settings(settings)
        engine.load_weights(world["champion"])
        first = 4 // settings.gate_stages
        held_ids, held = gate_answers(engine, tok, prompts, settings, config, n=first)
        champ = ChampionAnswers(held, check, check.answers(engine, tok, full=True), world["champion"])
        engine.load_weights(tiny_model)
        record, verdict = measure_gate(engine, tiny_model, models, prompts, held_ids, champ, settings, config)
        assert record["passed"] == verdict.passed and record["pairs"] == record["stages"][-1]["pairs"]
        return record

    def crc(ps: list[Any], texts: list[str]) -> torch.Tensor:
        return torch.tensor([zlib.crc32(t.encode()) % 1000 / 1000 for t in texts])

    def yes_no(ps: list[Any], texts: list[str]) -> torch.Tensor:
        return torch.tensor([float(t.startswith(("Yes", "No"))) for t in texts])

    try:
        # answers 3-4 of each prompt drawn on their own are the same as in a draw of all four
        engine.load_weights(world["champion"])
        settings = round_settings(tmp_path / "data", world["champion"], world["broker"], anything, gate_samples=4)
        config = PPOConfig.from_settings(settings)
        ids, whole = gate_answers(engine, tok, prompts[:3], settings, config, n=4)
        later = held_answers(engine, ids, settings, config, n=2, first=2)
        for p in range(3):
            assert [s.token_ids for s in whole if s.prompt == p][2:] == \
                [s.token_ids for s in later if s.prompt == p], (p, whole, later)

        all_at_once = gate(crc, gate_stages=1)
        read_on = gate(crc, gate_stages=2, gate_settle_z=1e9)  # never settled before the last stage
        assert [s["pairs"] for s in read_on["stages"]] == [16, 32] and read_on["pairs_planned"] == 32
        assert all_at_once["pairs"] == read_on["pairs"] == 32 and len(all_at_once["stages"]) == 1
        for key in ("win_rate", "ties", "reward_candidate", "reward_champion", "length_candidate",
                    "length_champion", "lc_win_rate"):
            assert read_on[key] == pytest.approx(all_at_once[key], abs=1e-6), (key, read_on, all_at_once)
        assert 0.0 < all_at_once["win_rate"] < 1.0, all_at_once  # mixed: the pairs' order matters
        assert read_on["seconds"]["champion_answers"] > 0 and "reloads" in read_on["seconds"], read_on["seconds"]

        full = gate(yes_no, gate_stages=1)
        early = gate(yes_no, gate_stages=2)  # the random model seldom says yes or no: clear at once
        assert not full["passed"] and full["win_rate"] < 0.3, full
        assert not early["passed"] and [s["pairs"] for s in early["stages"]] == [16], early
        assert early["pairs"] == 16 and early["win_rate"] < 0.3, early
        assert "champion_answers" not in early["seconds"], early["seconds"]
    finally:
        engine.load_weights(world["champion"])


def test_sigkill_mid_round_leaves_the_registry_as_it_was(world: dict[str, Any], tmp_path: Path) -> None:
    settings = round_settings(tmp_path, world["champion"], world["broker"], world["pass"], ppo_iterations=50)
    votes = fill_store(settings)
    if "first" in world:  # the same votes and their RM: the child skips the refresh (test time only)
        shutil.copytree(world["first"] / "reward", settings.data_dir / "reward")
    registry = Registry(settings.registry_path)
    registry.init_base(world["champion"])
    before = snapshot(settings.registry_path)
    state_file = settings.data_dir / "rounds" / "state.json"
    proc = subprocess.Popen([sys.executable, "-m", "trainer.rounds", "run"], env=settings.child_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            state = json.loads(state_file.read_text()) if state_file.exists() else {}
            if state.get("phase") == "ppo" and state.get("iterations_done", 0) >= 1:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the round ended before it could be killed"
        assert state.get("phase") == "ppo", state
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the round and its vLLM engine, mid-PPO
        proc.wait()
    assert snapshot(settings.registry_path) == before  # no partial version, no state change
    store = PreferenceStore(settings.preferences_db)
    assert store.count() == votes  # no vote lost
    store.close()
    resume, how = _recover(settings)
    assert resume is None and how.startswith("restarting") and "'ppo'" in how
    assert [(r["outcome"], r["phase"]) for r in read_rounds(settings, 5)] == [("interrupted", "ppo")]


def test_daemon_starts_rounds_on_votes_or_interval_and_never_two_at_once(tmp_path: Path) -> None:
    from datetime import timedelta

    from kaizen.core.rounds_log import RoundBusy, round_lock, round_running
    from trainer.daemon import RoundScheduler
    from trainer.round_record import json_line

    settings = make_settings(tmp_path, min_new_preferences=5, round_interval=timedelta(seconds=3600))
    rng = random.Random(3)
    store = PreferenceStore(settings.preferences_db)
    store.add_many([yes_vote(i, rng) for i in range(3)])
    scheduler = RoundScheduler(settings)
    assert scheduler.due() is None  # 3 < 5 new votes, interval not over
    store.add_many([yes_vote(i, rng) for i in range(3, 6)])
    assert scheduler.due() is not None and "6 new votes" in str(scheduler.due())
    # a finished round started from rowid 6: nothing new since
    json_line(settings.data_dir / "rounds" / "rounds.jsonl", {"round_id": "r1", "outcome": "published",
                                                              "store_mark": 6, "ended_ts": time.time()})
    assert scheduler.due() is None
    store.add_many([yes_vote(6, rng)])
    assert scheduler.due() is None  # one new vote, but the interval has not passed
    json_line(settings.data_dir / "rounds" / "rounds.jsonl", {"round_id": "r2", "outcome": "skipped",
                                                              "store_mark": 6, "ended_ts": time.time() - 7200})
    assert "since the last round" in str(scheduler.due())
    store.close()
    assert [r["round_id"] for r in read_rounds(settings, 5)] == ["r2", "r1"]
    # the lock: while one round holds it, another cannot start, and the scheduler sees it
    with round_lock(settings):
        assert round_running(settings)
        with pytest.raises(RoundBusy):
            run_round(settings)
        # and the operator's `kaizen rounds run` says so and exits 75 (EX_TEMPFAIL), writing nothing
        cli = subprocess.run([sys.executable, "-m", "kaizen", "rounds", "run"], env=settings.child_env(),
                             capture_output=True, text=True, timeout=300)
        assert cli.returncode == 75, (cli.returncode, cli.stdout, cli.stderr)
        assert "another training round is running" in cli.stdout + cli.stderr
        assert [r["round_id"] for r in read_rounds(settings, 5)] == ["r2", "r1"]
    assert not round_running(settings)


# -- #19 item 8: rounds cut off by SIGKILL (out of memory), and /dev/shm ----------------------------


def start_round(settings: Settings) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "trainer.rounds", "run"], env=settings.child_env(),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def kill_in_ppo(settings: Settings, pids: list[int], attempt: int) -> tuple[dict[str, Any], int]:
    """Start a round process, SIGKILL it (and its engine) once this `attempt` of it is in PPO and has
    synced weights; (its state, pid)."""
    state_file = settings.data_dir / "rounds" / "state.json"
    proc = start_round(settings)
    pids.append(proc.pid)
    state: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            state = json.loads(state_file.read_text()) if state_file.exists() else {}
            in_ppo = state.get("phase") == "ppo" and state.get("iterations_done", 0) >= 1
            if state.get("attempt") == attempt and in_ppo:
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"the round ended ({proc.returncode}) before it could be killed: {state}"
        assert state.get("attempt") == attempt, state
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # what the out-of-memory killer does
        proc.wait()
    return state, proc.pid


def test_round_killed_again_and_again_is_capped_backed_off_and_failed(world: dict[str, Any],
                                                                      tmp_path: Path) -> None:
    """#19 item 8: a round killed by SIGKILL (OOM) was restarted forever: its attempt counter was never
    checked (and a restart even began again at attempt 1). Now: the daemon notes how it died and waits
    round_retry_backoff before the next start; each start removes the /dev/shm weight-sync folder the
    killed one left; the start after round_max_attempts records the round failed with its reason, and
    the scheduler does not start it again."""
    from trainer.daemon import RoundScheduler

    settings = round_settings(tmp_path, world["champion"], world["broker"], world["pass"], ppo_iterations=50,
                              round_max_attempts=2, round_retry_backoff=timedelta(seconds=3))
    fill_store(settings)
    if "first" in world:  # the same votes and their RM: the child skips the refresh (test time only)
        shutil.copytree(world["first"] / "reward", settings.data_dir / "reward")
    Registry(settings.registry_path).init_base(world["champion"])
    scheduler = RoundScheduler(settings)
    pids: list[int] = []
    try:
        _killed_again_and_again(settings, scheduler, pids)
    finally:  # what a failing check leaves in /dev/shm: only the folders of the rounds started here
        for pid in pids:
            for folder in Path("/dev/shm").glob(f"kaizen-ppo-{pid}-*"):
                shutil.rmtree(folder, ignore_errors=True)


def _killed_again_and_again(settings: Settings, scheduler: Any, pids: list[int]) -> None:
    first, pid1 = kill_in_ppo(settings, pids, attempt=1)
    left = list(Path(first["sync_dir"]).parent.glob(f"kaizen-ppo-{pid1}-*"))
    assert first["attempt"] == 1 and left == [Path(first["sync_dir"])] and left[0].is_dir()
    scheduler._note_exit(-signal.SIGKILL)  # as tick() does when it sees the child die
    assert scheduler.due() is None  # backing off
    deadline = time.monotonic() + 30
    while (why := scheduler.due()) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert why is not None and "cut off (attempt 1)" in why

    second, _ = kill_in_ppo(settings, pids, attempt=2)
    assert second["round_id"] == first["round_id"]
    assert not left[0].exists()  # the second start removed what the first left in /dev/shm
    assert "SIGKILL" in second["cut_off"][0]["exit"]
    scheduler._note_exit(-signal.SIGKILL)
    assert scheduler.retry_wait(json.loads((settings.data_dir / "rounds" / "state.json").read_text())) > 3

    third = start_round(settings)  # attempt 3 > round_max_attempts: recorded as failed, nothing run
    pids.append(third.pid)
    try:
        assert third.wait(timeout=180) == 1
    finally:
        if third.poll() is None:
            os.killpg(third.pid, signal.SIGKILL)
            third.wait()
    record = read_rounds(settings, 1)[0]
    assert record["outcome"] == "failed" and record["round_id"] == first["round_id"], record
    assert "cut off 2 times" in record["error"] and "KAIZEN_ROUND_MAX_ATTEMPTS=2" in record["error"]
    assert "phase 'ppo'" in record["error"] and "SIGKILL" in record["error"], record["error"]
    assert not Path(second["sync_dir"]).exists()
    assert not (settings.data_dir / "rounds" / "state.json").exists()
    assert scheduler.due() is None  # not restarted: the next round waits for new votes
    assert Registry(settings.registry_path).names() == ["v0"]


@pytest.fixture()
def small_shm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A real 1 MiB tmpfs (a too-small /dev/shm) when this runs as root. Without root a full /dev/shm
    cannot be made here: then (only then) the free-space seam, kaizen.core.disk.free_bytes, says 1 MiB."""
    path = tmp_path / "shm"
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        monkeypatch.setattr("kaizen.core.disk.free_bytes", lambda _path: 1 << 20)
        yield path
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_weight_sync_checks_dev_shm_first(tiny_model: Path, small_shm: Path) -> None:
    """#19 item 8: the weight sync needs about twice the model's size in /dev/shm; on a /dev/shm too
    small (a real 1 MiB tmpfs, the tiny policy is ~16 MB in float32) it refuses before writing, naming
    the setting to change, instead of dying half-way with ENOSPC and a half-written file."""
    from kaizen.core.disk import InsufficientSpace
    from trainer.policy import load_policy
    from trainer.rollout_engine import sync_weights

    policy, _, _ = load_policy(tiny_model)
    folder = small_shm / "kaizen-ppo-1-x"
    with pytest.raises(InsufficientSpace, match=r"weight_sync.*shmSize.*shm_size.*PPO_SYNC_DIR") as exc:
        sync_weights(policy, None, folder)  # type: ignore[arg-type] # refused before the engine is used
    assert exc.value.needed > 8 * exc.value.free
    assert list(folder.iterdir()) == []  # nothing half-written


def test_the_round_summary_compares_the_first_and_last_quarters_of_ppo() -> None:
    """One iteration's batch is 16 answers to 16 prompts (std ~1 on a real run), so the round
    record's reward_first / reward_last are means over a quarter of the iterations, not one each."""
    from trainer.ppo import IterationStats
    from trainer.round_phases import _summary

    def it(i: int, reward: float) -> IterationStats:
        return IterationStats(i, reward, 1.0, reward, 0.1, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 40.0,
                              10.0, 1.0, {"rollout": 1.0})

    # a noisy rise: the ends alone (-0.2 -> -1.6) say it fell; the quarters say it rose by 1
    rewards = [-0.2, -1.4, -0.9, -1.5, 0.1, 0.3, -0.5, 0.4, 0.6, -0.1, 0.5, 0.7, 0.2, 1.0, 0.4, -1.6]
    s = _summary([it(i, r) for i, r in enumerate(rewards)])
    assert s["reward_window"] == 4 and s["iterations"] == 16
    assert s["reward_first"] == pytest.approx(sum(rewards[:4]) / 4)
    assert s["reward_last"] == pytest.approx(sum(rewards[-4:]) / 4)
    assert s["reward_last"] - s["reward_first"] == pytest.approx(1.0)
    assert _summary([it(0, 0.3)])["reward_first"] == pytest.approx(0.3)
    assert s["seconds"] == {"rollout": 16.0}


def test_the_missing_eos_penalty_is_charged_only_when_the_votes_favour_ended_answers(tmp_path: Path) -> None:
    from trainer.round_inputs import VotePair
    from trainer.round_phases import missing_eos_penalty

    def votes(ended_won: int, ended_lost: int, same: int = 5) -> list[VotePair]:
        m = [{"role": "user", "content": "q"}]
        return ([VotePair(m, "ended.", "cut", True, False)] * ended_won
                + [VotePair(m, "cut", "ended.", False, True)] * ended_lost
                + [VotePair(m, "a.", "b.", True, True), VotePair(m, "a", "b", False, False),
                   VotePair(m, "ended.", "unknown", True, None),
                   VotePair(m, "unknown", "cut", None, False)] * same)

    settings = make_settings(tmp_path, ppo_missing_eos_penalty=0.8)
    # rubric-like voters: the ended answer wins 3 in 4 (lower bound 0.61): the setting's penalty
    rubric = missing_eos_penalty(votes(30, 10), settings)
    assert rubric["penalty"] == 0.8 and (rubric["ended_won"], rubric["ended_lost"]) == (30, 10)
    assert 0.5 < rubric["ended_share_low"] < 0.75
    # voters who prefer the longer, cut answer, or too few votes to tell (2 of 2: lower bound 0.34): none
    assert missing_eos_penalty(votes(7, 37), settings)["penalty"] == 0.0
    few = missing_eos_penalty(votes(2, 0), settings)
    assert few["penalty"] == 0.0 and few["ended_share_low"] < 0.5
    assert missing_eos_penalty([], settings)["penalty"] == 0.0
    # the setting off: the penalty whatever the votes say
    always = make_settings(tmp_path, ppo_missing_eos_penalty=0.8, ppo_missing_eos_from_votes=False)
    assert missing_eos_penalty(votes(7, 37), always) == {"penalty": 0.8}


def test_the_budgets_forecasts_read_the_latest_rounds(tmp_path: Path) -> None:
    """KAIZEN_ROUND_GATE_HISTORY: a staged gate takes ~2.3x its champion's answers where its first stage
    settles and ~4.9x where it reads on, so the update reserves the mean of round_gate_factor and the
    latest gated rounds' ratios (rounds.jsonl, newest last), not the latest alone; rounds that did not
    gate (skipped, failed) do not count. The guard's check is as long as the latest round's longest
    until the update has measured its own (`check_prior`)."""
    from kaizen.core.rounds_log import ROUNDS_LOG, rounds_dir
    from trainer.round_phases import check_prior, gate_factor

    settings = Settings(data_dir=tmp_path, round_gate_factor=3.0, round_gate_history=2)
    assert gate_factor(settings) == 3.0 and check_prior(settings) == 0.0  # no rounds yet: the priors
    rounds = [{"timings": {"gate": 100.0, "gate_champion": 10.0}},  # 10x: older than the history
              {"timings": {"gate": 49.0, "gate_champion": 10.0},
               "ppo": {"time_budget": {"longest_check_s": 165.0}}},
              {"outcome": "skipped", "timings": {"refresh": 5.0, "gate_champion": 10.0}},
              {"timings": {"gate": 23.0, "gate_champion": 10.0}, "ppo": {"iterations": 4}}]
    path = rounds_dir(settings) / ROUNDS_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rounds))
    assert gate_factor(settings) == pytest.approx((3.0 + 2.3 + 4.9) / 3)
    assert gate_factor(settings.model_copy(update={"round_gate_history": 3})) == pytest.approx(
        (3.0 + 2.3 + 4.9 + 10.0) / 4)
    assert check_prior(settings) == 165.0  # the newest round ran no budget: the one before it
