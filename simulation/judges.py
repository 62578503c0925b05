"""Judges for simulated users: `judge(messages, answer_a, answer_b) -> 0 | 1 | "tie" | "both_bad"`.

A judge is any Python function with that signature, named as
`package.module:function` or `path/to/file.py:function` (`load_judge`); a callable object
may add `many(items)`, verdicts on a list of (messages, answer_a, answer_b) at once, which the
loop's evaluation uses (`judge_many`). Two ship here:

* `simulation.judges:rubric` — a transparent rubric: the answer should be in the
  language of the question, on its topic, not repetitive, and complete; an
  adequate length helps a little. Deterministic, no model needed.
* `simulation.judges:reward_model` — a Bradley–Terry reward model trained on the
  human preference pairs (`kaizen reward train --data PAIRS.jsonl --out DIR`), read
  from `KAIZEN_JUDGE_REWARD_MODEL`. It must not be the reward model the trainer
  refreshes from the votes, or the loop would grade its own homework.

Nothing in training imports this module: the loop learns from votes only.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

Messages = list[dict[str, str]]
Verdict = Any  # 0 | 1 | "tie" | "both_bad"
Judge = Callable[[Messages, str, str], Verdict]
VERDICTS = (0, 1, "tie", "both_bad")


def load_judge(spec: str) -> Judge:
    """`package.module:function` or `path/to/file.py:function` → the function."""
    # results recorded before the harness left trainer/ (bench/results/*.json) name trainer.judges
    spec = re.sub(r"^trainer\.judges:", "simulation.judges:", spec)
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"a judge is `module:function` or `file.py:function`, got {spec!r}")
    if target.endswith(".py") or os.sep in target:
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"judge file {path} does not exist")
        mod_name = f"kaizen_judge_{abs(hash(path.resolve()))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(f"cannot import judge module {target!r}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{spec!r}: {name} is not a function of {target}")
    return fn  # type: ignore[no-any-return]


PROBE: Messages = [{"role": "user", "content": "What is the capital of France?"}]


def ready_judge(spec: str) -> Judge:
    """`load_judge`, then one verdict on a probe pair, so that a judge which cannot run (a reward
    model judge without its folder, a function with the wrong signature) stops a benchmark before
    it starts, not at its evaluation an hour later. ValueError names the judge and the cause."""
    judge = load_judge(spec)
    try:
        verdict = judge(PROBE, "The capital of France is Paris.", "I do not know.")
    except Exception as exc:  # noqa: BLE001 - any failure of a user's judge is reported as its own
        raise ValueError(f"judge {spec!r} failed on a probe pair: {type(exc).__name__}: {exc}") from exc
    if verdict not in VERDICTS:
        raise ValueError(f"judge {spec!r} answered {verdict!r}; a judge returns one of {VERDICTS}")
    return judge


# -- the rubric ----------------------------------------------------------------------------

WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
STOPWORDS = {
    "en": set("the and is are you what how why of to in for on with it this that be can i my your a an "
              "do does was were have has not or as at by from".split()),
    "fr": set("le la les et est sont vous que comment pourquoi de des du un une pour dans sur avec ce cette "
              "je mon ton pas ou".split()),
    "es": set("el la los las y es son usted que como por qué de del un una para en sobre con este esta yo "
              "mi no o".split()),
    "de": set("der die das und ist sind sie was wie warum von zu im für auf mit es dies ich mein nicht "
              "oder ein eine".split()),
    "it": set("il lo la gli le e è sono che come perché di del un una per in su con questo io mio "
              "non o".split()),
    "pt": set("o a os as e é são você que como por de do da um uma para em sobre com este eu meu "
              "não ou".split()),
}


@dataclass(frozen=True)
class RubricWeights:
    """How much each quality counts (sums to 1), and the decision margins."""

    language: float = 0.3
    topic: float = 0.25
    repetition: float = 0.25
    complete: float = 0.15
    length: float = 0.05
    tie_margin: float = 0.03
    """Scores closer than this are a tie."""
    bad_below: float = 0.35
    """Both answers under this score: "both_bad"."""


RUBRIC = RubricWeights()


def _words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text)]


def language_of(text: str) -> str:
    """A coarse guess: the script (latin / other), then the Latin language by stopwords."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return "none"
    latin = sum(1 for c in letters if c.isascii() or "\u00c0" <= c <= "\u024f") / len(letters)
    if latin < 0.5:
        return "non-latin"
    words = _words(text)
    counts = {lang: sum(1 for w in words if w in stop) for lang, stop in STOPWORDS.items()}
    best = max(counts, key=lambda k: counts[k])
    return best if counts[best] > 0 else "en"


def _distinct_ratio(words: list[str], n: int = 3) -> float:
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


#: The rubric's qualities, each 0..1, in the order of RubricWeights.
RUBRIC_PARTS = ("language", "topic", "repetition", "complete", "length")


def rubric_parts(question: str, answer: str) -> dict[str, float]:
    """Each quality 0..1: language match, topic overlap, little repetition, a finished last sentence,
    adequate length (`rubric_score` weighs them)."""
    words = _words(answer)
    if not words:
        return dict.fromkeys(RUBRIC_PARTS, 0.0)
    q_content = {x for x in _words(question) if len(x) > 3 and not any(x in s for s in STOPWORDS.values())}
    n = len(words)
    return {
        "language": 1.0 if language_of(answer) == language_of(question) else 0.0,
        "topic": min(1.0, 3 * len(q_content & set(words)) / len(q_content)) if q_content else 1.0,
        "repetition": _distinct_ratio(words) ** 2,
        "complete": 1.0 if answer.rstrip().endswith((".", "!", "?", "```", ")", '"')) else 0.0,
        "length": 1.0 if 8 <= n <= 250 else (n / 8 if n < 8 else max(0.0, 1 - (n - 250) / 250)),
    }


def rubric_score(question: str, answer: str, w: RubricWeights = RUBRIC) -> float:
    """0..1: the weighted sum of `rubric_parts`."""
    return float(sum(getattr(w, k) * v for k, v in rubric_parts(question, answer).items()))


def deciding_part(question: str, answer_a: str, answer_b: str, w: RubricWeights = RUBRIC) -> str:
    """The quality whose weighted difference between two answers is largest: what decided the pair."""
    pa, pb = rubric_parts(question, answer_a), rubric_parts(question, answer_b)
    return max(RUBRIC_PARTS, key=lambda k: abs(getattr(w, k) * (pa[k] - pb[k])))


def _last_user(messages: Messages) -> str:
    return next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")


def decide(score_a: float, score_b: float, tie_margin: float, bad_below: float) -> Verdict:
    if score_a < bad_below and score_b < bad_below:
        return "both_bad"
    if abs(score_a - score_b) < tie_margin:
        return "tie"
    return 0 if score_a > score_b else 1


def rubric(messages: Messages, answer_a: str, answer_b: str) -> Verdict:
    """The rubric judge (see the module docstring)."""
    q = _last_user(messages)
    return decide(rubric_score(q, answer_a), rubric_score(q, answer_b), RUBRIC.tie_margin, RUBRIC.bad_below)


# -- a reward model as judge ---------------------------------------------------------------

#: Reward difference (in the model's units) below which two answers tie.
RM_TIE_MARGIN = 0.1
#: Scores the reward-model judge keeps (one evaluation holds a few thousand).
RM_SCORE_CACHE = 100_000


@lru_cache(maxsize=2)
def _load_rm(path: str) -> tuple[Any, Any]:
    from trainer.reward_model import load_reward_model

    return load_reward_model(Path(path))


class RewardModelJudge:
    """Prefer the answer the judge reward model scores higher (`KAIZEN_JUDGE_REWARD_MODEL`).

    Called on one pair it scores two sequences; `many` scores a whole evaluation's answers in
    length-sorted batches and keeps each (conversation, answer)'s score, so the baseline's answers,
    compared with every version, are scored once (`judge_many`)."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        """The reward model's folder; None: `KAIZEN_JUDGE_REWARD_MODEL`, read at each call."""
        self._scores: dict[tuple[str, str, str], float] = {}

    def __call__(self, messages: Messages, answer_a: str, answer_b: str) -> Verdict:
        return self.many([(messages, answer_a, answer_b)])[0]

    def many(self, items: Sequence[tuple[Messages, str, str]]) -> list[Verdict]:
        scores = self.scores([(m, text) for m, a, b in items for text in (a, b)])
        return [_rm_verdict(scores[2 * k], scores[2 * k + 1]) for k in range(len(items))]

    def scores(self, items: Sequence[tuple[Messages, str]]) -> list[float]:
        """The reward model's score of each (conversation, answer), each distinct one computed once."""
        path = str(self._path) if self._path is not None else os.environ.get("KAIZEN_JUDGE_REWARD_MODEL")
        if not path:
            raise RuntimeError("set KAIZEN_JUDGE_REWARD_MODEL to a reward-model folder trained on human "
                               "preference pairs (kaizen reward train --data PAIRS.jsonl --out DIR)")
        from trainer.store import prompt_key

        keys = [(path, prompt_key(m), text) for m, text in items]
        self._score_missing(path, dict(zip(keys, items, strict=True)))
        return [self._scores[k] for k in keys]

    def _score_missing(self, path: str, texts: dict[tuple[str, str, str], tuple[Messages, str]]) -> None:
        import torch

        from kaizen.core.settings import get_settings
        from trainer.reward_data import encode_conversation
        from trainer.reward_model import RewardConfig, score_texts

        todo = [k for k in texts if k not in self._scores]
        if not todo:
            return
        model, tokenizer = _load_rm(path)
        settings = get_settings()
        seqs = [encode_conversation(tokenizer, texts[k][0], texts[k][1], settings.reward_max_length)[0]
                for k in todo]
        with torch.no_grad():
            scores = score_texts(model, tokenizer, seqs, RewardConfig.from_settings(settings))
        if len(self._scores) + len(todo) > RM_SCORE_CACHE:  # keep what this call still reads
            self._scores = {k: self._scores[k] for k in texts if k in self._scores}
        self._scores.update(zip(todo, (float(x) for x in scores), strict=True))


def _rm_verdict(ra: float, rb: float) -> Verdict:
    if abs(ra - rb) < RM_TIE_MARGIN:
        return "tie"
    return 0 if ra > rb else 1


reward_model = RewardModelJudge()
"""The reward-model judge (see the module docstring)."""


def judge_many(judge: Judge, items: Sequence[tuple[Messages, str, str]]) -> list[Verdict]:
    """Verdicts on many pairs at once: the judge's own batched `many` when it has one (a model
    judge), else one call per pair (any function with the judge signature)."""
    many = getattr(judge, "many", None)
    return list(many(items)) if callable(many) else [judge(m, a, b) for m, a, b in items]
