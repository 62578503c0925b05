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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch

from services.events import Answer, Message, PreferenceEvent
from services.registry import Registry
from services.settings import Settings
from tests.conftest import ROOT, make_settings
from trainer.rounds import _recover, read_rounds, run_round
from trainer.store import PreferenceStore

WORDS = ("apple river stone cloud green quick silent paper window orange music light table summer garden "
         "north copper velvet").split()


def question(rng: random.Random) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Is the {' '.join(rng.choices(WORDS, k=3))}?"}]


def sft_yes_no(src: Path, out: Path, steps: int = 40) -> Path:
    """The tiny model taught to answer "Yes." or "No." (50/50) and stop; saved in bf16 like its source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.reward_data import encode_conversation, pad_sequences

    torch.manual_seed(0)
    rng = random.Random(0)
    tok = AutoTokenizer.from_pretrained(src)
    lm = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    lm.train()
    for _ in range(steps):
        seqs, starts = [], []
        for _ in range(16):
            m = question(rng)
            seqs.append(encode_conversation(tok, m, rng.choice(["Yes.", "No."]), 128)[0])
            starts.append(len(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False)))
        ids, mask = pad_sequences(seqs, tok.pad_token_id)
        labels = ids.masked_fill(mask == 0, -100)
        for i, s in enumerate(starts):
            labels[i, :s] = -100  # learn the answer (and its <|im_end|>) only
        loss = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


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
def world(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, broker: Settings) -> dict[str, Any]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rounds")
    champion = sft_yes_no(tiny_model, root / "yes-no")
    passing, failing = root / "sanity-pass.jsonl", root / "sanity-fail.jsonl"
    # what a random tiny model can pass: an answer at all, and it is one of the two it knows
    passing.write_text(json.dumps({"prompt": "Is the sky blue?", "expect": r"^(Yes|No)"}) + "\n")
    failing.write_text(json.dumps({"prompt": "What is the capital of France?", "expect": "Paris"}) + "\n")
    return {"root": root, "champion": champion, "pass": passing, "fail": failing, "broker": broker}


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
    from trainer.ppo import RolloutEngine

    eng = RolloutEngine(make_settings(world["root"], engine_max_model_len=512), world["champion"],
                        max_model_len=512)
    yield eng
    eng.shutdown()


def snapshot(registry: Path) -> dict[str, Any]:
    files = {str(p.relative_to(registry)): p.read_bytes() if p.stat().st_size < 1 << 20 else p.stat().st_size
             for p in sorted(registry.rglob("*")) if p.is_file()}
    return files


def test_round_publishes_a_candidate_that_beats_the_champion(world: dict[str, Any], engine: Any,
                                                             tmp_path: Path) -> None:
    settings = round_settings(tmp_path, world["champion"], world["broker"], world["pass"])
    assert fill_store(settings) == 80
    world["first"] = settings.data_dir
    record = run_round(settings, engine=engine)
    assert record["outcome"] == "published", record
    assert record["reward_refresh"]["accepted"] and record["reward_model"] == "rm-v1"
    gate = record["gate"]
    # PPO raised the RM's reward on prompts it never trained on, and the win rate shows it
    assert gate["reward_candidate"] > gate["reward_champion"] + 0.2, gate
    assert gate["win_rate"] >= 0.55 and gate["passed"] and gate["sanity_passed"]
    assert 0 <= gate["kl"] <= settings.gate_max_kl  # bounded: the KL penalty holds the policy near v0
    print(f"\nheld-out reward champion {gate['reward_champion']:+.3f} -> candidate {gate['reward_candidate']:+.3f}, "
          f"win rate {gate['win_rate']:.3f}, KL {gate['kl']:.3f}; ppo {record['ppo']}")

    registry = Registry(settings.registry_path)
    info = registry.info(record["version"])
    assert (info.version, info.stage, info.parent) == ("v1", "candidate", "v0")
    assert registry.state().champion == "v0"  # publishing never serves: rollout decides
    registry.verify("v1")
    assert info.training["round_id"] == record["round_id"] and info.gate["passed"]

    # one JSON line per iteration and per round; read_rounds shows it first
    lines = [json.loads(x) for x in (settings.data_dir / "rounds" / "events.jsonl").read_text().splitlines()]
    iterations = [x for x in lines if x["kind"] == "iteration"]
    assert len(iterations) == settings.ppo_iterations
    for key in ("reward_mean", "reward_std", "kl", "clipfrac", "vf_loss", "entropy", "approx_kl", "kl_coef",
                "tokens_per_s", "seconds"):
        assert key in iterations[0]
    assert read_rounds(settings, 5)[0]["round_id"] == record["round_id"]
    assert not (settings.data_dir / "rounds" / "state.json").exists()

    # the published folder: same dtype as the champion, loads in transformers and in vLLM
    from transformers import AutoModelForCausalLM

    path = registry.path("v1")
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (path / name).is_file(), name
    lm = AutoModelForCausalLM.from_pretrained(path)
    assert lm.dtype == torch.bfloat16
    engine.load_weights(path)
    from transformers import AutoTokenizer

    from trainer.ppo import encode_prompt

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


def test_candidate_failing_the_sanity_prompts_is_rejected(world: dict[str, Any], engine: Any,
                                                          tmp_path: Path) -> None:
    settings = round_settings(tmp_path, world["champion"], world["broker"], world["fail"], ppo_iterations=1)
    fill_store(settings)
    record = run_round(settings, engine=engine)
    assert record["outcome"] == "rejected", record
    gate = record["gate"]
    assert not gate["sanity_passed"] and not gate["passed"]
    assert any("sanity" in f for f in gate["failed"]) and "Paris" not in gate["sanity"][0]["answer"]
    registry = Registry(settings.registry_path)
    assert registry.info(record["version"]).stage == "rejected"
    assert registry.state().champion == "v0"  # kept for inspection, never served


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

    from trainer.daemon import RoundScheduler
    from trainer.rounds import RoundBusy, _json_line, round_lock, round_running

    settings = make_settings(tmp_path, min_new_preferences=5, round_interval=timedelta(seconds=3600))
    rng = random.Random(3)
    store = PreferenceStore(settings.preferences_db)
    store.add_many([yes_vote(i, rng) for i in range(3)])
    scheduler = RoundScheduler(settings)
    assert scheduler.due() is None  # 3 < 5 new votes, interval not over
    store.add_many([yes_vote(i, rng) for i in range(3, 6)])
    assert scheduler.due() is not None and "6 new votes" in str(scheduler.due())
    # a finished round started from rowid 6: nothing new since
    _json_line(settings.data_dir / "rounds" / "rounds.jsonl", {"round_id": "r1", "outcome": "published",
                                                               "store_mark": 6, "ended_ts": time.time()})
    assert scheduler.due() is None
    store.add_many([yes_vote(6, rng)])
    assert scheduler.due() is None  # one new vote, but the interval has not passed
    _json_line(settings.data_dir / "rounds" / "rounds.jsonl", {"round_id": "r2", "outcome": "skipped",
                                                               "store_mark": 6, "ended_ts": time.time() - 7200})
    assert "since the last round" in str(scheduler.due())
    store.close()
    assert [r["round_id"] for r in read_rounds(settings, 5)] == ["r2", "r1"]
    # the lock: while one round holds it, another cannot start, and the scheduler sees it
    with round_lock(settings):
        assert round_running(settings)
        with pytest.raises(RoundBusy):
            run_round(settings)
    assert not round_running(settings)
