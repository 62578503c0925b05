"""A round on several training processes: rank 0 leads, the other ranks follow its commands.

    torchrun --standalone --nproc-per-node 2 -m trainer.rounds run   # what the daemon starts

Rank 0 runs the round (trainer/rounds.py) alone with the lock, the store, the engine, the gate
and the registry; through its `Crew` it orders the other ranks to train beside it ("refresh":
train the reward model on this plan; "ppo": run PPO on these prompts) and dismisses them
("done") when the round is over. Every other rank `follow`s: it waits for rank 0's commands
and runs its share of that training (trainer/distributed.py). A rank that dies fails every
rank's next collective, so the round fails everywhere and nothing is published.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Any

from kaizen.core.settings import Settings
from trainer.distributed import Dist
from trainer.policy import RewardScorer, load_policy
from trainer.dpo import policy_trainer
from trainer.ppo_loop import UpdateGuard, run_ppo
from trainer.reward import train_refresh

log = logging.getLogger(__name__)


@dataclass
class Crew:
    """Rank 0's handle on the other training ranks (none in a one-process round)."""

    dist: Dist | None = None
    """None: one process."""

    @property
    def size(self) -> int:
        return int(self.dist.world_size) if self.dist is not None else 1

    def order(self, command: str, payload: Any) -> None:
        """Every other rank runs `command` on `payload` beside rank 0 (see `follow`)."""
        if self.dist is not None and self.size > 1:
            self.dist.broadcast((command, payload))

    def dismiss(self) -> None:
        """The round is over for the followers; a rank that died already cannot be told."""
        if self.dist is not None and self.size > 1:
            with contextlib.suppress(Exception):
                self.dist.broadcast(("done", None))


def follow(settings: Settings, dist: Dist, stop: threading.Event) -> None:
    """A rank other than 0: run rank 0's training commands until it says "done"."""
    while True:
        command, payload = dist.broadcast()
        log.info("rank %d: %s", dist.rank, command)
        if command == "done":
            return
        if command == "refresh":
            train_refresh(payload, dist=dist)
        elif command == "ppo":
            _follow_ppo(settings, dist, stop, payload)
        else:
            raise ValueError(f"rank {dist.rank}: unknown command {command!r} from rank 0")


def _follow_ppo(settings: Settings, dist: Dist, stop: threading.Event, payload: dict[str, Any]) -> None:
    """This rank's share of rank 0's PPO: the same config, champion, KL reference, reward model and
    prompts; no engine (rank 0 samples the rollouts and broadcasts them)."""
    config = payload["config"]
    model, tokenizer, _ = load_policy(payload["champion"])
    reference, _, _ = load_policy(payload["reference"])
    scorer = RewardScorer.load(payload["reward_model"], settings.reward_max_length, settings.reward_dtype)
    trainer = policy_trainer(config, model, reference, tokenizer, None, scorer, None, dist,
                             vote_pairs=payload.get("vote_pairs", ()))
    # the guard's checks run on rank 0's engine; this rank's guard joins their verdict and, on a
    # failure, puts back the same iteration's weights as rank 0
    run_ppo(config, trainer, payload["prompts"], should_stop=stop.is_set,
            guard=UpdateGuard())
