"""What a training round reads before it trains: whether one is due, and its prompts.

    from trainer.round_inputs import last_mark, new_votes_since   # the daemon's schedule
    from trainer.round_inputs import read_round_inputs             # prompts and the users' pairs

The daemon starts a round when enough votes arrived since the store row the last round started
from (`last_mark`, `new_votes_since`). A round's prompts are the users' turns stored with the
votes: the held-out slice (store.held_out, the same the reward model's refresh holds out) goes
to the gate, the rest (plus `ppo_prompt_file`) to PPO, and the decided votes on the rest to DPO.
Votes live in the store, which a round only reads. Light at import (no torch): the daemon imports this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kaizen.core.rounds_log import read_rounds
from kaizen.core.settings import Settings
from trainer.store import PreferenceStore, held_out, prompt_key

Messages = list[dict[str, str]]


# -- when a round is due ----------------------------------------------------------------------


def last_mark(settings: Settings) -> tuple[int, float | None]:
    """(store rowid the last round started from, unix time it ended); (0, None) before any."""
    rounds = [r for r in read_rounds(settings, 1000) if r.get("outcome") not in ("running", "interrupted")]
    if not rounds:
        return 0, None
    return int(rounds[0].get("store_mark", 0)), float(rounds[0].get("ended_ts", 0)) or None


def new_votes_since(settings: Settings, mark: int) -> int:
    """Votes in the store after rowid `mark`."""
    store = PreferenceStore(settings.preferences_db)
    try:
        row = store.db.execute("SELECT COUNT(*) FROM preferences WHERE rowid > ?", (mark,)).fetchone()
        return int(row[0])
    finally:
        store.close()


# -- prompts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class VotePair:
    """A user's decided vote as DPO reads it: the conversation, the chosen and the rejected answer,
    and whether each ended by itself (`Answer.ended`: True ended, False cut at max_tokens, None not
    known, as in imported events without a finish reason; only True puts an end-of-turn token after it)."""

    messages: Messages
    chosen: str
    rejected: str
    chosen_ended: bool | None
    rejected_ended: bool | None


@dataclass(frozen=True)
class RoundInputs:
    """What a round learns from, read from the store in one pass (`read_round_inputs`)."""

    train_prompts: list[Messages]
    """PPO's prompts: the users' turns of every round plus `ppo_prompt_file`, de-duplicated."""
    held_prompts: list[Messages]
    """The gate's: the prompts the reward model's refresh holds out (store.held_out)."""
    vote_pairs: list[VotePair]
    """Decided votes on training prompts, oldest first, every round's: what DPO learns from
    (trainer/dpo.py). Ties and both-bad teach no order and are left out."""


def read_round_inputs(settings: Settings) -> RoundInputs:
    """The round's prompts and the users' pairs. Held out = what the RM refresh holds out, so the
    gate never sees a prompt PPO trained on or a vote DPO learned from; a prompt on both sides
    counts as held out."""
    train: dict[str, Messages] = {}
    held: dict[str, Messages] = {}
    pairs: list[tuple[str, VotePair]] = []
    store = PreferenceStore(settings.preferences_db)
    try:
        for _, ev in store.iter_events(0):  # one row at a time: a round keeps prompts and pairs only
            messages = ev.conversation()
            if messages[-1]["role"] != "user":
                continue
            key = prompt_key(messages)
            is_held = held_out(ev, settings.reward_holdout_fraction)
            (held if is_held else train).setdefault(key, messages)
            ranked = ev.ranked()
            if ranked is not None and not is_held:
                good, bad = ranked
                pairs.append((key, VotePair(messages, good.text, bad.text,
                                            good.ended, bad.ended)))
    finally:
        store.close()
    for k in held:
        train.pop(k, None)
    if settings.ppo_prompt_file is not None:
        for m in read_prompt_file(settings.ppo_prompt_file):
            if (key := prompt_key(m)) not in held:
                train.setdefault(key, m)
    return RoundInputs(list(train.values()), list(held.values()), [p for k, p in pairs if k not in held])


def read_prompt_file(path: Path) -> list[Messages]:
    """JSONL: {"prompt": str} or {"messages": [...]}, one per line."""
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if "messages" in rec:
                out.append([{"role": str(m["role"]), "content": str(m["content"])} for m in rec["messages"]])
            else:
                out.append([{"role": "user", "content": str(rec["prompt"])}])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{lineno}: not a prompt ({exc})") from exc
    return out
