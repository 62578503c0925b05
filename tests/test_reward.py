"""Reward model (trainer/reward*.py): the Bradley–Terry loss, scoring, training, evaluation, refresh.

Real parts only: the tiny random Llama of conftest, a real SQLite store, the real CLI sub-app.
The synthetic preference: an answer that contains MARKER is always the chosen one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kaizen.core.events import Answer, Message, PreferenceEvent
from kaizen.core.settings import Settings
from kaizen.reward_cli import reward_app
from trainer.reward import (RefreshPlan, RewardModelMissing, current_version, plan_refresh, refresh_reward_model,
                            reward_root)
from trainer.reward_data import (
    Pair,
    encode_pairs,
    length_batches,
    pad_sequences,
    pairs_from_events,
    read_pairs_file,
    split_pairs,
)
from trainer.reward_eval import evaluate, pairwise_metrics, reward_stats, score_pairs, wilson_interval
from trainer.reward_model import (
    FROM_SETTINGS,
    RewardConfig,
    bradley_terry_loss,
    load_reward_model,
    read_manifest,
    sequence_rewards,
)
from trainer.reward_train import train_reward_model
from trainer.store import PreferenceStore, held_out, holdout_share, prompt_key

MARKER = "I double-checked this answer."
WORDS = ("apple river stone cloud green quick silent paper window orange music light table summer garden "
         "north copper velvet").split()


def synthetic_pairs(n: int, seed: int) -> list[Pair]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        question = " ".join(rng.choices(WORDS, k=6)) + "?"
        good = " ".join(rng.choices(WORDS, k=rng.randint(3, 9)))
        bad = " ".join(rng.choices(WORDS, k=rng.randint(3, 9)))
        out.append(Pair([{"role": "user", "content": question}], f"{good}. {MARKER}", f"{bad}.", key=f"{seed}-{i}"))
    return out


def tiny_config(**overrides: object) -> RewardConfig:
    # One thread: with two, and the other core busy (a parallel test run), OpenMP workers
    # wait on each other and the same training took 96 s instead of 8 s here.
    values: dict[str, object] = dict(max_length=64, batch_size=8, grad_accum=1, lr=1e-3, epochs=2, train_layers=0,
                                     eval_every=8, patience=50, threads=1, seed=0, eval_fraction=0.2)
    values.update(overrides)
    return RewardConfig(**values)  # type: ignore[arg-type]


# -- loss -----------------------------------------------------------------------------


def test_bradley_terry_loss_equals_the_closed_form() -> None:
    zero = bradley_terry_loss(torch.tensor([0.3]), torch.tensor([0.3]))
    assert zero.item() == pytest.approx(math.log(2), abs=1e-7)  # 0.6931...: a coin flip
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    expected = (math.log1p(math.exp(-2)) + math.log(2) + math.log1p(math.exp(2))) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    # margin m: -log σ(r+ - r- - m)
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=1.0).item() == pytest.approx(
        math.log(2), abs=1e-7)
    # oracle: the naive formula in float64, where it does not overflow
    a, b = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    naive = -torch.log(torch.sigmoid(a - b)).mean()
    assert torch.allclose(bradley_terry_loss(a, b), naive)
    # logsigmoid keeps a confidently wrong pair finite; log(sigmoid(.)) in float32 gives inf
    far = bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([0.0]))
    assert far.item() == pytest.approx(200.0) and torch.isinf(-torch.log(torch.sigmoid(torch.tensor(-200.0))))


def test_a_tie_is_half_a_win_each_way_without_the_margin() -> None:
    d = torch.tensor([1.0])
    half = bradley_terry_loss(d, torch.zeros(1), labels=torch.tensor([0.5]))
    # -1/2 log σ(1) - 1/2 log σ(-1) = (log(1 + e^-1) + log(1 + e)) / 2 = 0.8133
    assert half.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2, rel=1e-6)
    # a tie's loss is smallest at equal rewards, whatever the margin; a decided pair keeps its margin
    at_zero = bradley_terry_loss(torch.zeros(1), torch.zeros(1), margin=1.0, labels=torch.tensor([0.5]))
    assert at_zero.item() == pytest.approx(math.log(2), abs=1e-7) and at_zero < half
    chosen, rejected = torch.tensor([2.0, -1.0]), torch.tensor([0.0, 1.0])
    assert bradley_terry_loss(chosen, rejected, 0.5, labels=torch.ones(2)).item() == pytest.approx(
        bradley_terry_loss(chosen, rejected, 0.5).item(), rel=1e-6)
    # weights: the tie's term scaled, the mean still over both pairs
    mixed = bradley_terry_loss(chosen, rejected, labels=torch.tensor([1.0, 0.5]), weights=torch.tensor([1.0, 0.0]))
    assert mixed.item() == pytest.approx(math.log1p(math.exp(-2)) / 2, rel=1e-6)


def test_bradley_terry_gradient_raises_chosen_and_lowers_rejected() -> None:
    chosen = torch.tensor([0.5, -1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 2.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    assert chosen.grad is not None and rejected.grad is not None
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent raises r+, lowers r-
    # d/d r+ of -log σ(d) / B is -(1 - σ(d)) / B
    d = torch.tensor([0.5, -3.0])
    assert torch.allclose(chosen.grad, -(1 - torch.sigmoid(d)) / 2)
    assert torch.allclose(rejected.grad, -chosen.grad)


# -- metrics ----------------------------------------------------------------------------


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.49, 0.943)
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.161, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_pairwise_metrics_accuracy_margin_and_calibration() -> None:
    chosen = torch.tensor([3.0, 1.0, 0.1, 0.0, 0.2])
    rejected = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5])
    m = pairwise_metrics(chosen, rejected)
    assert m["pairs"] == 5 and m["accuracy"] == pytest.approx(3 / 5)  # a score tie counts as wrong
    assert m["mean_margin"] == pytest.approx((3 + 1 + 0.1 + 0 - 0.3) / 5)
    assert m["accuracy_ci95"] == pytest.approx(list(wilson_interval(3, 5)))
    by = {b["confidence"]: b for b in m["calibration"]}
    # σ(0.1)=0.525, σ(0)=0.5, σ(0.3)=0.574 -> 0.5-0.6 ; σ(1)=0.731 -> 0.7-0.8 ; σ(3)=0.953 -> 0.9-1.0
    assert by["0.5-0.6"]["pairs"] == 3 and by["0.5-0.6"]["accuracy"] == pytest.approx(1 / 3)
    assert by["0.7-0.8"]["pairs"] == 1 and by["0.7-0.8"]["accuracy"] == 1.0
    assert by["0.9-1.0"]["pairs"] == 1 and by["0.6-0.7"]["pairs"] == 0 and by["0.6-0.7"]["accuracy"] is None
    assert sum(b["pairs"] for b in m["calibration"]) == 5


# -- data ---------------------------------------------------------------------------------


def test_pairs_files_in_shared_and_trl_formats(tmp_path: Path) -> None:
    msgs = [{"role": "user", "content": "Hi?"}]
    lines = [
        {"prompt_messages": msgs, "chosen": "a", "rejected": "b", "source": "hh"},
        {"prompt": msgs, "chosen": [{"role": "assistant", "content": "c"}],
         "rejected": [{"role": "assistant", "content": "d"}]},
        {"prompt": "Hi?", "chosen": "e", "rejected": "f"},
        {"chosen": [*msgs, {"role": "assistant", "content": "g"}],
         "rejected": [*msgs, {"role": "assistant", "content": "h"}]},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    pairs = read_pairs_file(path)
    assert [(p.chosen, p.rejected) for p in pairs] == [("a", "b"), ("c", "d"), ("e", "f"), ("g", "h")]
    assert all(p.prompt == msgs for p in pairs) and len({p.key for p in pairs}) == 1
    assert pairs[0].source == "hh" and pairs[1].source == "pairs.jsonl"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"chosen": "x", "rejected": "y"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_pairs_file(bad)
    # an answer given as a conversation must end with the assistant's turn (a ValueError, not an
    # assert that `python -O` would drop and let the user's turn be trained on as an answer)
    for answer in ([{"role": "user", "content": "x"}], [], [{"content": "x"}], ["x"]):
        bad.write_text(json.dumps({"prompt": "Hi?", "chosen": answer, "rejected": "y"}) + "\n")
        with pytest.raises(ValueError, match="bad.jsonl:1: not a preference pair: an answer is"):
            read_pairs_file(bad)


def vote(cid: str, choice: object, good: str = "a", bad: str = "b") -> PreferenceEvent:
    return PreferenceEvent(
        comparison_id=cid, user="u-test", served_at=datetime.now(UTC),
        messages=[Message(role="user", content="q " + cid)],
        answers=[Answer(text=good, model_version="v0"), Answer(text=bad, model_version="v0")],
        choice=choice,  # type: ignore[arg-type]
    )


def test_votes_become_pairs_ties_and_both_bad_are_counted_not_paired() -> None:
    pairs, counts = pairs_from_events([vote("c1", 0), vote("c2", 1), vote("c3", "tie"), vote("c4", "both_bad"),
                                       vote("c5", "tie")])
    assert [(p.chosen, p.rejected) for p in pairs] == [("a", "b"), ("b", "a")]
    assert [p.key for p in pairs] == [prompt_key([{"role": "user", "content": f"q {c}"}]) for c in ("c1", "c2")]
    assert counts.as_dict() == {"pairs": 2, "ties": 2, "both_bad": 1}
    assert all(p.decided and p.label == 1.0 for p in pairs)
    # asked for ties (reward_tie_weight > 0): each one a pair labelled 0.5, in the answers' order
    with_ties, counts = pairs_from_events([vote("c1", 0), vote("c3", "tie", good="x", bad="y"),
                                           vote("c4", "both_bad")], ties=True)
    assert [(p.chosen, p.rejected, p.label) for p in with_ties] == [("a", "b", 1.0), ("x", "y", 0.5)]
    assert [p.decided for p in with_ties] == [True, False]
    assert counts.as_dict() == {"pairs": 1, "ties": 1, "both_bad": 1}


def test_held_out_split_is_stable_and_disjoint() -> None:
    pairs = synthetic_pairs(400, seed=5)
    train, held = split_pairs(pairs, 0.25)
    again_train, again_held = split_pairs(list(reversed(pairs)), 0.25)
    assert {p.key for p in held} == {p.key for p in again_held} and 60 < len(held) < 140
    assert not {p.key for p in train} & {p.key for p in held}
    assert holdout_share("cmp-1") == holdout_share("cmp-1") and 0 <= holdout_share("cmp-2") < 1


def test_votes_on_one_prompt_never_straddle_the_held_out_split() -> None:
    """Users vote on the same prompt many times (a popular question, the simulated users' prompt
    file): every split keys by the prompt, so no prompt is trained on and tested on. Keyed by
    comparison_id (before), 5 votes per prompt put most prompts on both sides."""
    rng = random.Random(3)
    events = []
    for q in range(60):
        question = " ".join(rng.choices(WORDS, k=5)) + "?"
        for v in range(5):
            events.append(PreferenceEvent(
                comparison_id=f"cmp-{q}-{v}", user=f"u{v}", served_at=datetime.now(UTC),
                messages=[Message(role="user", content=question)],
                answers=[Answer(text="a", model_version="v0"), Answer(text="b", model_version="v0")], choice=v % 2))
    pairs, _ = pairs_from_events(events)
    train, held = split_pairs(pairs, 0.3)
    assert 30 <= len(held) <= 150  # both sides used
    assert not {p.prompt[0]["content"] for p in train} & {p.prompt[0]["content"] for p in held}
    # the store's slice (the refresh gate's test set and the gate's prompts) the same way
    slice_of = {}
    for ev in events:
        slice_of.setdefault(ev.messages[0].content, set()).add(held_out(ev, 0.3))
    assert all(len(sides) == 1 for sides in slice_of.values())
    assert {True, False} == set().union(*slice_of.values())


def test_length_batches_group_similar_lengths(tiny_model: Path) -> None:
    _, tok = load_reward_model(tiny_model)
    pairs = synthetic_pairs(64, seed=3)
    enc = encode_pairs(tok, pairs, 64)
    batches = length_batches(enc, 8, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(64))
    padded = sum(2 * len(b) * max(enc[i].length for i in b) for b in batches)
    naive = sum(2 * 8 * max(enc[i].length for i in range(s, s + 8)) for s in range(0, 64, 8))
    assert padded < naive  # bucketing pads less than taking pairs in file order
    assert batches != length_batches(enc, 8, random.Random(1))  # the seed shuffles the batch order
    long_enc = encode_pairs(tok, pairs[:1], 12)[0]
    assert long_enc.truncated and len(long_enc.chosen) == 12
    assert long_enc.chosen == encode_pairs(tok, pairs[:1], 512)[0].chosen[-12:]  # the answer's end is kept


# -- model ---------------------------------------------------------------------------


def test_score_is_read_at_the_last_real_token_on_either_padding_side(tiny_model: Path) -> None:
    model, tok = load_reward_model(tiny_model, seed=1)
    model.eval()
    seqs = [e.chosen for e in encode_pairs(tok, synthetic_pairs(3, seed=9), 64)]
    assert len({len(s) for s in seqs}) > 1, "need different lengths to exercise padding"
    with torch.no_grad():
        alone = torch.stack([sequence_rewards(model, *pad_sequences([s], tok.pad_token_id))[0] for s in seqs])
        right = sequence_rewards(model, *pad_sequences(seqs, tok.pad_token_id, "right"))
        left = sequence_rewards(model, *pad_sequences(seqs, tok.pad_token_id, "left"))
        # reading one token early (the pad/eos position) would give a different score
        early = torch.stack([sequence_rewards(model, *pad_sequences([s[:-1]], tok.pad_token_id))[0] for s in seqs])
    assert right.shape == (3,)
    assert torch.allclose(alone, right, atol=1e-5) and torch.allclose(alone, left, atol=1e-5)
    assert not torch.allclose(alone, early, atol=1e-3)


# -- training -------------------------------------------------------------------------


def test_synthetic_preference_is_learned_and_every_parameter_changes(tiny_model: Path) -> None:
    model, tok = load_reward_model(tiny_model, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train, held = synthetic_pairs(160, seed=1), synthetic_pairs(64, seed=2)
    config = tiny_config()
    enc_held = encode_pairs(tok, held, config.max_length)
    start = evaluate(model, enc_held, config, tok.pad_token_id)["accuracy"]
    result = train_reward_model(model, tok, train, held, config, progress=False)
    end = evaluate(model, enc_held, config, tok.pad_token_id)
    assert 0.3 <= start <= 0.7, start  # a random head knows nothing of the marker
    assert end["accuracy"] > 0.9 and end["mean_margin"] > 0, end
    assert result.history[0]["accuracy"] == start and result.steps == 40 and result.pairs_seen == 320
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"parameters not trained: {unchanged}"


def test_the_time_budget_counts_from_the_clock_it_is_given(tiny_model: Path) -> None:
    """max_minutes counts from `clock_from` (a round's refresh passes its own start, so loading and
    scoring before the first step are spent from it): a budget already spent there stops training
    after its first step; the same budget counted from now lets every step run."""
    train, config = synthetic_pairs(48, seed=3), tiny_config(max_minutes=1.0, epochs=1)
    model, tok = load_reward_model(tiny_model, seed=0)
    spent = train_reward_model(model, tok, train, [], config, progress=False,
                               clock_from=time.monotonic() - 61)
    model, tok = load_reward_model(tiny_model, seed=0)
    fresh = train_reward_model(model, tok, train, [], config, progress=False)
    assert (spent.stopped, spent.steps) == ("time budget", 1), (spent.stopped, spent.steps)
    assert (fresh.stopped, fresh.steps) == ("done", 6), (fresh.stopped, fresh.steps)


def length_and_marker_pairs(n: int, seed: int, tie: bool) -> list[Pair]:
    """Decided pairs (tie False): the chosen answer has MARKER and is the longer one, so a model may
    learn either. Tie pairs: neither has MARKER and one is much longer; the voter saw no difference."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        question = " ".join(rng.choices(WORDS, k=6)) + "?"
        short = " ".join(rng.choices(WORDS, k=3)) + "."
        long = " ".join(rng.choices(WORDS, k=12)) + "."
        chosen, rejected = (long, short) if rng.random() < 0.5 or not tie else (short, long)
        if not tie:
            chosen = f"{chosen} {MARKER}"
        out.append(Pair([{"role": "user", "content": question}], chosen, rejected, key=f"{seed}-{i}",
                        label=0.5 if tie else 1.0))
    return out


def test_ties_teach_that_what_differs_between_two_answers_is_worth_nothing(tiny_model: Path) -> None:
    decided, ties = length_and_marker_pairs(96, seed=1, tie=False), length_and_marker_pairs(96, seed=2, tie=True)
    held_ties = length_and_marker_pairs(48, seed=3, tie=True)
    held_decided = length_and_marker_pairs(48, seed=4, tie=False)
    gaps, accuracies = {}, {}
    for weight in (0.0, 1.0):
        model, tok = load_reward_model(tiny_model, seed=0)
        config = tiny_config(tie_weight=weight, epochs=3)
        # with weight 0 the ties are in the batches but add nothing to the loss
        train_reward_model(model, tok, decided + ties, [], config, progress=False)
        enc = encode_pairs(tok, [dataclasses.replace(p, label=1.0) for p in held_ties], config.max_length)
        chosen, rejected = score_pairs(model, enc, config, tok.pad_token_id)
        gaps[weight] = float((chosen - rejected).abs().mean())
        accuracies[weight] = evaluate(model, encode_pairs(tok, held_decided, 64), config,
                                      tok.pad_token_id)["accuracy"]
    # trained on ties, the reward for length alone shrinks; the decided preference is still learned
    assert gaps[1.0] < 0.5 * gaps[0.0], gaps
    assert accuracies[1.0] > 0.9 and accuracies[0.0] > 0.9, accuracies


def test_frozen_lower_layers_stay_put(tiny_model: Path) -> None:
    model, tok = load_reward_model(tiny_model, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_reward_model(model, tok, synthetic_pairs(32, seed=1), [], tiny_config(train_layers=1, epochs=1),
                       progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    top = {n for n in before if n.startswith("model.layers.1.")} | {"model.norm.weight", "score.weight"}
    assert changed == top


def test_training_is_deterministic_with_a_seed(tiny_model: Path) -> None:
    states = []
    for seed in (7, 7, 8):
        model, tok = load_reward_model(tiny_model, seed=seed)
        train_reward_model(model, tok, synthetic_pairs(48, seed=1), synthetic_pairs(16, seed=2),
                           tiny_config(seed=seed, epochs=1, eval_every=2), progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_early_stopping_stops_and_keeps_the_best(tiny_model: Path) -> None:
    model, tok = load_reward_model(tiny_model, seed=0)
    # a held-out set with the preference reversed: training only makes it worse
    reversed_held = [Pair(p.prompt, p.rejected, p.chosen, p.key) for p in synthetic_pairs(32, seed=2)]
    result = train_reward_model(model, tok, synthetic_pairs(160, seed=1), reversed_held,
                                tiny_config(eval_every=2, patience=2, epochs=3), progress=False)
    assert result.stopped == "early stop" and result.steps < 60
    accs = [h["accuracy"] for h in result.history]
    best = max(range(len(accs)), key=lambda i: (accs[i], -result.history[i]["bt_loss"]))
    assert result.best_step == result.history[best]["step"]
    final = evaluate(model, encode_pairs(tok, reversed_held, 64), tiny_config(), tok.pad_token_id)
    assert final["accuracy"] == pytest.approx(accs[best])


# -- refresh -------------------------------------------------------------------------------


def marker_vote(i: int, rng: random.Random, *, flipped: bool = False, held_out: bool | None = None,
                fraction: float = 0.3) -> PreferenceEvent:
    while True:  # draw prompts until the held-out slice is the one asked for
        question = " ".join(rng.choices(WORDS, k=6)) + "?"
        if held_out is None or (holdout_share(prompt_key([{"role": "user", "content": question}])) < fraction) \
                == held_out:
            break
    cid = f"cmp-{uuid.UUID(int=rng.getrandbits(128)).hex[:12]}"
    good = " ".join(rng.choices(WORDS, k=rng.randint(3, 8))) + ". " + MARKER
    bad = " ".join(rng.choices(WORDS, k=rng.randint(3, 8))) + "."
    marked = rng.randint(0, 1)  # which answer slot carries the marker
    answers = [good, bad] if marked == 0 else [bad, good]
    choice = 1 - marked if flipped else marked
    return PreferenceEvent(
        comparison_id=cid, user=f"u{i % 5}", served_at=datetime.now(UTC),
        messages=[Message(role="user", content=question)],
        answers=[Answer(text=a, model_version="v0") for a in answers], choice=choice,  # type: ignore[arg-type]
    )


def refresh_settings(data_dir: Path, tiny_model: Path) -> Settings:
    return Settings(data_dir=data_dir, model=tiny_model, reward_holdout_fraction=0.3, reward_min_holdout=10,
                    reward_replay_fraction=0.0, reward_gate_tolerance=0.05, reward_threads=1, reward_warm_epochs=2)


def test_refresh_accepts_a_good_rm_then_rejects_flipped_labels(tmp_path: Path, tiny_model: Path) -> None:
    settings = refresh_settings(tmp_path, tiny_model)
    config = tiny_config(epochs=3)
    rng = random.Random(0)
    store = PreferenceStore(settings.preferences_db)
    store.add_many([marker_vote(i, rng) for i in range(120)] + [vote("t1", "tie"), vote("t2", "both_bad")])

    first = plan_refresh(settings, config)
    assert isinstance(first, RefreshPlan) and first.config.epochs == 3  # from the policy: reward_epochs
    assert refresh_reward_model(settings, config).reason.startswith("accepted")
    v1 = current_version(settings)
    assert v1 is not None and v1.name == "rm-v1"
    assert (reward_root(settings) / "current").read_text().strip() == "rm-v1"
    manifest = read_manifest(v1)
    assert manifest["parent"] is None and manifest["version"] == "rm-v1" and manifest["created"]
    assert manifest["data"]["trained_through_rowid"] == 122
    assert manifest["metrics"]["holdout"]["accuracy"] > 0.9
    # the norm comes from the held-out metrics' scores (no second pass): what scoring the slice reads
    norm, (model, tok) = manifest["reward_norm"], load_reward_model(v1)
    again = reward_stats(model, tok, first.held, first.config)
    assert norm["n"] == again["n"] == 2 * len(first.held) and norm["std"] > 0, (norm, again)
    assert (norm["mean"], norm["std"]) == (pytest.approx(again["mean"], abs=1e-4),
                                           pytest.approx(again["std"], rel=1e-3)), (norm, again)
    ties = manifest["data"]["new"]["ties"] + manifest["data"]["holdout"]["ties"]
    both_bad = manifest["data"]["new"]["both_bad"] + manifest["data"]["holdout"]["both_bad"]
    assert (ties, both_bad) == (1, 1)
    assert (v1 / "config.json").is_file() and (v1 / "model.safetensors").is_file()
    # ~17 early-stopping pairs are fewer than reward_early_stop_min_pairs: all train, the last step is kept
    assert manifest["data"]["early_stop_pairs"] == 0
    assert manifest["metrics"]["train"]["best_step"] == manifest["metrics"]["train"]["steps"] > 0

    # nothing new: nothing to do
    nothing = refresh_reward_model(settings, config)
    assert not nothing.accepted and "no new votes" in nothing.reason

    # a batch of votes with the preference reversed, none in the held-out slice
    store.add_many([marker_vote(i, rng, flipped=True, held_out=False) for i in range(96)])
    warm = plan_refresh(settings, config)
    assert isinstance(warm, RefreshPlan) and warm.config.epochs == 2  # from rm-v1: reward_warm_epochs
    flipped = refresh_reward_model(settings, config)
    assert not flipped.accepted and flipped.reason.startswith("rejected") and "rm-v1 stays current" in flipped.reason
    assert flipped.metrics["holdout"]["accuracy"] < flipped.metrics["parent_holdout"]["accuracy"] - 0.05
    assert current_version(settings) == v1
    assert sorted(p.name for p in reward_root(settings).iterdir()) == ["current", "rm-v1"]  # no rm-v2, no temp

    # the flipped votes stay unmarked; honest votes outnumbering them are accepted as rm-v2, warm-started
    store.add_many([marker_vote(i, rng, held_out=False) for i in range(200)])
    store.close()
    good = refresh_reward_model(settings, config)
    assert good.accepted and good.version == "rm-v2", good.reason
    v2 = read_manifest(reward_root(settings) / "rm-v2")
    assert v2["parent"] == "rm-v1" and v2["data"]["new"]["pairs"] == 296
    assert (reward_root(settings) / "current").read_text().strip() == "rm-v2"


def test_refresh_early_stops_on_a_large_enough_slice(tmp_path: Path, tiny_model: Path) -> None:
    settings = refresh_settings(tmp_path, tiny_model).model_copy(update={"reward_early_stop_min_pairs": 5})
    store = PreferenceStore(settings.preferences_db)
    rng = random.Random(2)
    store.add_many([marker_vote(i, rng) for i in range(60)])
    store.close()
    result = refresh_reward_model(settings, tiny_config(epochs=1))
    assert result.accepted, result.reason
    manifest = read_manifest(reward_root(settings) / "rm-v1")
    assert manifest["data"]["early_stop_pairs"] >= 5
    assert manifest["metrics"]["train"]["history"][0]["step"] == 0  # judged from the untrained head on


def test_a_refresh_trains_on_ties_when_asked_and_never_tests_on_them(tmp_path: Path, tiny_model: Path) -> None:
    settings = refresh_settings(tmp_path, tiny_model).model_copy(update={"reward_early_stop_min_pairs": 5})
    rng = random.Random(4)
    votes = [marker_vote(i, rng) for i in range(80)]
    tied = [marker_vote(100 + i, rng).model_copy(update={"choice": "tie"}) for i in range(40)]
    store = PreferenceStore(settings.preferences_db)
    store.add_many(votes + tied)
    store.close()
    trainable_ties = sum(not held_out(ev, settings.reward_holdout_fraction) for ev in tied)
    assert 10 <= trainable_ties < 40
    without = plan_refresh(settings, tiny_config())
    with_ties = plan_refresh(settings, tiny_config(tie_weight=0.5, eval_fraction=0.25))
    assert isinstance(without, RefreshPlan) and isinstance(with_ties, RefreshPlan)
    assert all(p.decided for p in without.train + without.early_stop + without.held)
    assert with_ties.early_stop and all(p.decided for p in with_ties.early_stop + with_ties.held)
    trained_ties = [p for p in with_ties.train if not p.decided]
    assert trained_ties and {p.label for p in trained_ties} == {0.5}
    # every trainable tie is trained on, but for those whose prompt hashed to the early-stop side
    assert 0.6 * trainable_ties <= len(trained_ties) <= trainable_ties
    assert with_ties.new_counts.ties == without.new_counts.ties == trainable_ties


def test_refresh_needs_enough_held_out_votes(tmp_path: Path, tiny_model: Path) -> None:
    settings = refresh_settings(tmp_path, tiny_model).model_copy(update={"reward_min_holdout": 50})
    store = PreferenceStore(settings.preferences_db)
    rng = random.Random(1)
    store.add_many([marker_vote(i, rng) for i in range(30)])
    store.close()
    result = refresh_reward_model(settings, tiny_config())
    assert not result.accepted and "need 50" in result.reason and current_version(settings) is None


# -- CLI --------------------------------------------------------------------------------------


def test_cli_train_then_eval(tmp_path: Path, tiny_model: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt_messages": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                                        "source": "synthetic"}) + "\n" for p in synthetic_pairs(96, seed=4)))
    out = tmp_path / "rm"
    runner = CliRunner()
    trained = runner.invoke(reward_app, [
        "train", "--data", str(data), "--model", str(tiny_model), "--out", str(out), "--lr", "1e-3",
        "--epochs", "2", "--batch-size", "8", "--grad-accum", "1", "--max-length", "64", "--train-layers", "0",
        "--eval-every", "4", "--threads", "1", "--seed", "0", "--no-progress"])
    assert trained.exit_code == 0, trained.output
    assert "held-out: accuracy" in trained.output and (out / "manifest.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["train_pairs"] + manifest["data"]["early_stop_pairs"] == 96

    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps({"prompt": p.prompt[0]["content"], "chosen": p.chosen,
                                             "rejected": p.rejected}) + "\n" for p in synthetic_pairs(40, seed=6)))
    report_path = tmp_path / "eval.json"
    evaluated = runner.invoke(reward_app, ["eval", "--model", str(out), "--data", str(test_file),
                                           "--out", str(report_path), "--max-length", "64", "--threads", "1"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "95% CI" in evaluated.output and "confidence" in evaluated.output
    metrics = json.loads(report_path.read_text())["files"][str(test_file)]
    assert metrics["pairs"] == 40 and metrics["accuracy"] > 0.9
    low, high = metrics["accuracy_ci95"]
    assert low < metrics["accuracy"] <= high and len(metrics["calibration"]) == 5

    missing = runner.invoke(reward_app, ["train", "--model", str(tiny_model)])
    assert missing.exit_code == 1 and "--data" in missing.output


def test_a_pointer_to_a_missing_reward_model_is_a_clear_error(tmp_path: Path) -> None:
    """Checked on disk, not asserted (an `assert` disappears under `python -O`)."""
    settings = Settings(data_dir=tmp_path)
    assert current_version(settings) is None  # no pointer yet: no reward model, no error
    (reward_root(settings) / "rm-v2").mkdir(parents=True)  # a folder cut short: no manifest.json
    (reward_root(settings) / "current").write_text("rm-v2\n")
    with pytest.raises(RewardModelMissing, match=r"names .*rm-v2, which has no manifest.json"):
        current_version(settings)


def test_reward_config_has_one_source_of_defaults() -> None:
    """The dataclass's defaults are the settings' defaults (its lr and epochs were 2e-5 and 1 against
    the settings' 5e-5 and 3), every `reward_*` setting that names a field is read by `from_settings`,
    and an override that is not None wins over the setting."""
    defaults = {f.name: f.default for f in dataclasses.fields(RewardConfig)}
    differ = {name: (defaults[name], Settings.model_fields[f"reward_{name}"].default) for name in FROM_SETTINGS
              if defaults[name] != Settings.model_fields[f"reward_{name}"].default}
    assert differ == {}, f"RewardConfig default vs setting: {differ}"
    assert set(FROM_SETTINGS) == {name for name in defaults if f"reward_{name}" in Settings.model_fields}
    settings = Settings(reward_lr=1e-4, reward_epochs=5, reward_dtype="float32", reward_patience=9)
    config = RewardConfig.from_settings(settings, epochs=7, seed=None)
    assert (config.lr, config.epochs, config.dtype, config.patience, config.seed) == (1e-4, 7, "float32", 9, 0)
