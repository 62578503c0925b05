"""The reward model's ended-vs-cut-off term (setting reward_ended_term, trainer/reward_train.EndedTerm):
votes know whether each answer ended or was cut at the vote's max_tokens, and a model fitted with
that step as its own coefficient γ keeps r for what the answers say.

    python -m pytest tests/test_reward_ended.py -q
"""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime
from pathlib import Path

from kaizen.core.events import Answer, Message, PreferenceEvent
from kaizen.core.settings import Settings
from trainer.reward_data import Pair, encode_pairs, pairs_from_events
from trainer.reward_eval import evaluate, score_pairs
from trainer.reward_model import RewardConfig, load_reward_model
from trainer.reward_train import train_reward_model
from tests.test_reward import MARKER, WORDS, tiny_config


def vote(choice: object, finish: tuple[str | None, str | None]) -> PreferenceEvent:
    return PreferenceEvent(
        comparison_id=f"c-{choice}-{finish}", user="u-test", served_at=datetime.now(UTC),
        messages=[Message(role="user", content="q")],
        answers=[Answer(text="a", model_version="v0", finish_reason=finish[0]),
                 Answer(text="b", model_version="v0", finish_reason=finish[1])],
        choice=choice,  # type: ignore[arg-type]
    )


def test_a_votes_pair_knows_which_answer_ended() -> None:
    pairs, _ = pairs_from_events([vote(0, ("stop", "length")), vote(1, ("stop", "length")),
                                  vote(0, ("stop", "stop")), vote(0, ("length", "length")),
                                  vote(0, (None, "length")), vote(1, ("stop", "abort"))])
    # chosen ended and rejected cut: +1; the vote for the cut one: -1; same or unknown: 0
    assert [p.ended_gap for p in pairs] == [1, -1, 0, 0, 0, 0]
    ties, _ = pairs_from_events([vote("tie", ("length", "stop"))], ties=True)
    assert [(p.label, p.ended_gap) for p in ties] == [(0.5, -1)]


def confounded_pairs(n: int, seed: int) -> list[Pair]:
    """Half the votes: an answer that ended (closes with a full stop) against one cut off (stops
    mid-sentence), the ended one always chosen whatever it says. The other half: both ended, the
    chosen one has MARKER. A model may learn "ended" from the text; only MARKER is content."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [{"role": "user", "content": " ".join(rng.choices(WORDS, k=6)) + "?"}]
        a, b = (" ".join(rng.choices(WORDS, k=rng.randint(4, 9))) for _ in range(2))
        if i % 2:
            out.append(Pair(prompt, f"{a}.", f"{b} and the", key=f"{seed}-{i}", ended_gap=1))
        else:
            out.append(Pair(prompt, f"{a}. {MARKER}", f"{b}.", key=f"{seed}-{i}"))
    return out


def test_the_ended_term_takes_the_cut_off_step_out_of_r_and_keeps_the_content(tiny_model: Path) -> None:
    train, held = confounded_pairs(128, seed=1), confounded_pairs(64, seed=2)
    mixed = [p for p in held if p.ended_gap]
    content = [dataclasses.replace(p, ended_gap=0) for p in held if not p.ended_gap]
    gaps, accuracies, terms = {}, {}, {}
    for on in (False, True):
        model, tok = load_reward_model(tiny_model, seed=0)
        config = tiny_config(epochs=3, ended_term=on)
        result = train_reward_model(model, tok, train, [], config, progress=False)
        chosen, rejected = score_pairs(model, encode_pairs(tok, mixed, 64), config, tok.pad_token_id)
        gaps[on] = float((chosen - rejected).mean())  # r(ended) - r(cut), content at random
        accuracies[on] = evaluate(model, encode_pairs(tok, content, 64), config, tok.pad_token_id)["accuracy"]
        terms[on] = result.ended_term
    assert terms[False] is None
    term = terms[True]
    assert term is not None and term["ended_won"] == 64 and term["ended_lost"] == 0, term
    assert term["gamma"] >= term["gamma_start"] > 0, term  # all the step went to γ
    # without the term r learns the step from the text; with it, r pays for it far less
    assert gaps[False] > 1.0 and gaps[True] < 0.5 * gaps[False], gaps
    assert accuracies[False] > 0.9 and accuracies[True] > 0.9, accuracies  # MARKER learned either way


def test_the_setting_reaches_the_reward_config() -> None:
    assert RewardConfig.from_settings(Settings(reward_ended_term=True)).ended_term is True
    assert RewardConfig().ended_term is False


def test_a_refresh_from_votes_fits_the_term_and_records_it(tmp_path: Path, tiny_model: Path) -> None:
    from trainer.reward import current_version, refresh_reward_model
    from trainer.reward_model import read_manifest
    from trainer.store import PreferenceStore

    rng = random.Random(0)
    events = []
    for i, pair in enumerate(confounded_pairs(120, seed=3)):
        cut = pair.ended_gap == 1  # the rejected answer was cut off at the vote's max_tokens
        events.append(PreferenceEvent(
            comparison_id=f"cmp-{i}-{rng.getrandbits(32)}", user=f"u{i % 5}", served_at=datetime.now(UTC),
            messages=[Message(**pair.prompt[0])],
            answers=[Answer(text=pair.chosen, model_version="v0", finish_reason="stop"),
                     Answer(text=pair.rejected, model_version="v0", finish_reason="length" if cut else "stop")],
            choice=0))
    settings = Settings(data_dir=tmp_path, model=tiny_model, reward_holdout_fraction=0.3, reward_min_holdout=10,
                        reward_threads=1, reward_ended_term=True)
    store = PreferenceStore(settings.preferences_db)
    store.add_many(events)
    store.close()
    config = RewardConfig.from_settings(settings, max_length=64, lr=1e-3, train_layers=0, eval_every=8)
    result = refresh_reward_model(settings, config)
    assert result.accepted, result.reason
    version = current_version(settings)
    assert version is not None
    term = read_manifest(version)["metrics"]["train"]["ended_term"]
    # the training slice's votes with one answer cut: all won by the ended one
    assert term["ended_lost"] == 0 and term["ended_won"] > 20 and term["gamma"] > 0, term
