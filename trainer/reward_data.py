"""Preference pairs for the reward model: reading, splitting, tokenizing, batching.

    from trainer.reward_data import read_pairs_file
    pairs = read_pairs_file(Path("../shared/data/hh_harmless_train.jsonl"))

Two file formats are read, one JSON object per line:
  - the shared data format: {"prompt_messages": [...], "chosen": str, "rejected": str, "source": str}
  - TRL preference JSONL (`kaizen prefs export`): {"prompt": str | [messages], "chosen": str |
    [messages], "rejected": str | [messages]}; with no "prompt", the conversation is the chosen
    list's messages before its last (TRL's "implicit prompt" form).

Votes from the store become pairs here, and only here (ARCHITECTURE.md: a pair is derived,
never stored). Choice 0/1 gives one pair. A "tie" gives a pair with label 0.5 when the caller asks
for ties (`reward_tie_weight` above 0): half a win each way, as Chatbot Arena's Bradley–Terry fit
counts a tie; its loss −½ log σ(d) − ½ log σ(−d) is smallest at equal rewards, so a tie teaches
the model that what differs between the two answers (often their length) is worth nothing. No
tie model with its own parameter (Rao–Kupper): a few hundred ties cannot pin one down. "both_bad"
gives none: treating it as a pair would invent an order. Both are counted, so the manifest and
`kaizen prefs stats` can show how often they happen.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kaizen.core.events import PreferenceEvent, ended_gap
from trainer.store import holdout_share, prompt_key

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Pair:
    """One judgement: `chosen` was preferred to `rejected` as the next assistant turn of `prompt`."""

    prompt: Messages
    chosen: str
    rejected: str
    key: str
    """What the held-out split hashes: the comparison_id for votes, the prompt text for files
    (so two pairs on one prompt always land on the same side)."""
    source: str = ""
    label: float = 1.0
    """P(chosen ≻ rejected) the judgement says: 1 for a decided vote, 0.5 for a tie (no order)."""
    ended_gap: int = 0
    """ended(chosen) − ended(rejected), 1 ended, 0 cut off at the vote's max_tokens: +1, −1, or 0
    when both ended, both were cut or either is not known (files; votes before finish_reason)."""

    @property
    def decided(self) -> bool:
        return self.label == 1.0


@dataclass
class PairCounts:
    """What a set of votes held, pairs and the votes that make no pair."""

    pairs: int = 0
    ties: int = 0
    both_bad: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"pairs": self.pairs, "ties": self.ties, "both_bad": self.both_bad}


def _prompt_key(prompt: Messages) -> str:
    return prompt_key(prompt)


def _as_messages(value: Any) -> Messages:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


def _answer_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value or not isinstance(value[-1], dict) \
            or value[-1].get("role") != "assistant":
        raise ValueError("an answer is a string or a conversation ending with an assistant turn: "
                         f"{value!r:.200}")
    return str(value[-1]["content"])


def pair_from_record(record: dict[str, Any], source: str = "") -> Pair:
    """One line of either file format (module docstring) as a Pair."""
    if "prompt_messages" in record:
        prompt = _as_messages(record["prompt_messages"])
    elif "prompt" in record:
        prompt = _as_messages(record["prompt"])
    elif isinstance(record.get("chosen"), list):
        prompt = _as_messages(record["chosen"][:-1])  # implicit prompt: shared history
    else:
        raise ValueError(f"a pair needs prompt_messages or prompt: keys {sorted(record)}")
    if not prompt:
        raise ValueError("a pair needs a non-empty conversation before the answers")
    return Pair(prompt, _answer_text(record["chosen"]), _answer_text(record["rejected"]),
                key=_prompt_key(prompt), source=str(record.get("source", source)))


def read_pairs_file(path: Path) -> list[Pair]:
    """All pairs of a JSONL file; a bad line raises ValueError naming its line number."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                pairs.append(pair_from_record(json.loads(line), source=path.name))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a preference pair: {exc}") from exc
    return pairs


def pairs_from_events(events: Iterable[PreferenceEvent], ties: bool = False) -> tuple[list[Pair], PairCounts]:
    """Votes 0/1 as pairs; with `ties`, each tie as a pair labelled 0.5; both-bad (and ties without
    `ties`) counted, not paired (module docstring). `counts.pairs` counts the decided pairs."""
    pairs, counts = [], PairCounts()
    for ev in events:
        if ev.choice == "both_bad":
            counts.both_bad += 1
            continue
        prompt = ev.conversation()
        ranked = ev.ranked()
        if ranked is None:  # a tie
            counts.ties += 1
            if ties:
                a, b = ev.answers
                pairs.append(Pair(prompt, a.text, b.text, key=prompt_key(prompt), source="store", label=0.5,
                                  ended_gap=ended_gap(a.ended, b.ended)))
            continue
        chosen, rejected = ranked
        pairs.append(Pair(prompt, chosen.text, rejected.text, key=prompt_key(prompt), source="store",
                          ended_gap=ended_gap(chosen.ended, rejected.ended)))
        counts.pairs += 1
    return pairs, counts


def split_pairs(pairs: Sequence[Pair], fraction: float, salt: str = "") -> tuple[list[Pair], list[Pair]]:
    """(train, held_out) by a stable hash of each pair's key, its prompt: deterministic, no prompt
    on both sides (two votes on one prompt always land together)."""
    train: list[Pair] = []
    held: list[Pair] = []
    for p in pairs:
        (held if holdout_share(salt + p.key) < fraction else train).append(p)
    return train, held


def relevance_pairs(pairs: Sequence[Pair], share: float, seed: int = 0) -> list[Pair]:
    """Extra pairs that teach the reward model whether an answer is about the question.

    For `share` of the decided pairs (drawn at random, reproducibly from `seed`, so every rank of a
    distributed run builds the same), one more pair on the same prompt: its chosen answer against
    the chosen answer of a pair on another prompt. Both were preferred, so both tend to be fluent
    and ended; what differs is relevance (the "irrelevant answer" negatives of reward-model
    training). Such a rejected answer is only rarely good for this prompt too (two prompts about the
    same thing), noise that a few hundred real votes outweigh. No pairs when fewer than two prompts.
    """
    decided = [p for p in pairs if p.decided]
    if share <= 0 or len({p.key for p in decided}) < 2:
        return []
    rng = random.Random(f"relevance:{seed}")
    out = []
    for p in rng.sample(decided, round(share * len(decided))):
        other = rng.choice(decided)
        while other.key == p.key:
            other = rng.choice(decided)
        out.append(Pair(p.prompt, p.chosen, other.chosen, key=p.key, source="relevance"))
    return out


# -- tokens ---------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedPair:
    chosen: list[int]
    rejected: list[int]
    truncated: bool = field(default=False)
    label: float = 1.0
    """The pair's label (Pair.label): 1 decided, 0.5 a tie."""
    ended_gap: int = 0
    """Pair.ended_gap."""

    @property
    def length(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def encode_conversation(tokenizer: Any, prompt: Messages, answer: str,
                        max_length: int) -> tuple[list[int], bool]:
    """Chat-template tokens of prompt + answer, and whether the front was cut to fit max_length.

    Cut from the left: the score is read at the last token, so the answer's end must stay,
    and the most recent turns matter more than the first ones.
    """
    text = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=False)
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_length:
        return ids, False
    return ids[-max_length:], True


def encode_pairs(tokenizer: Any, pairs: Sequence[Pair], max_length: int) -> list[EncodedPair]:
    out = []
    for p in pairs:
        c, ct = encode_conversation(tokenizer, p.prompt, p.chosen, max_length)
        r, rt = encode_conversation(tokenizer, p.prompt, p.rejected, max_length)
        out.append(EncodedPair(c, r, ct or rt, p.label, p.ended_gap))
    return out


def length_batches(encoded: Sequence[EncodedPair], batch_size: int,
                   rng: random.Random | None) -> list[list[int]]:
    """Indices of `encoded` in batches of similar length, so padding stays small.

    Pairs are sorted by length (ties broken at random when `rng` is given) and cut into
    batches; with `rng` the batch order is shuffled, so an epoch does not run short to long.
    """
    jitter = [rng.random() if rng else 0.0 for _ in encoded]
    order = sorted(range(len(encoded)), key=lambda i: (encoded[i].length, jitter[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


def pad_sequences(seqs: Sequence[list[int]], pad_id: int,
                  side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest in this batch (dynamic padding).

    Returns input_ids (B, T) and attention_mask (B, T), 1 on real tokens.
    """
    assert side in ("left", "right"), side
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for row, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[row, span] = torch.tensor(s, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def collate_pairs(batch: Sequence[EncodedPair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows, one forward for both.

    Returns input_ids (2B, T) and attention_mask (2B, T); rows [:B] chosen, [B:] rejected.
    """
    return pad_sequences([p.chosen for p in batch] + [p.rejected for p in batch], pad_id)
