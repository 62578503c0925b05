"""The vLLM rollout engine PPO samples from, and the weight sync that keeps it on the policy.

    from trainer.rollout_engine import RolloutEngine, sync_folder, sync_weights

A vLLM `LLM` in the trainer's process generates the rollouts; after each update the policy's
weights are written to a private folder in RAM (/dev/shm, checked for space first) and the
engine reloads them in place. Sync folders are named `kaizen-ppo-<pid>-<random>` so that a
later round can remove the one a killed process left (trainer/upkeep.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kaizen.core.disk import require_free
from kaizen.core.pid_folders import stale_pid_folders
from kaizen.core.settings import Settings
from trainer.distributed import launcher_env_hidden
from trainer.policy import PolicyWithValue


@dataclass
class Sample:
    prompt: int
    """Index of the prompt in the list given to generate."""
    token_ids: list[int]
    text: str
    finished: bool
    """Ended with EOS / a stop token (False: hit max_tokens)."""


class RolloutEngine:
    """A vLLM `LLM` in this process (its engine core in a child process), eager, small KV cache, in
    the serving engine's dtype (`engine_dtype`, `auto`: bf16 where the hardware computes it).

    vLLM generates (≈255 tok/s batched here, against ≈6 tok/s for HF generate); after each
    update the trainer saves the policy to a RAM folder and the engine reloads it in place
    (`Worker.reload_weights`), so the next rollout samples from the new weights.
    """

    def __init__(self, settings: Settings, model_dir: Path, *, max_model_len: int = 1024,
                 seed: int = 0) -> None:
        from vllm import LLM

        from kaizen.core.engine_config import (configure_vllm_env, running_config, scheduling_args,
                                               serving_dtype)

        configure_vllm_env(settings)
        self.model_dir = model_dir
        limit = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
        max_model_len = min(max_model_len, int(limit)) if limit else max_model_len
        started = time.monotonic()
        with launcher_env_hidden():  # under torchrun the engine core is not a member of the training job
            self.llm = LLM(model=str(model_dir), dtype=serving_dtype(settings), enforce_eager=True,
                           max_model_len=max_model_len,
                           gpu_memory_utilization=settings.engine_memory_utilization, seed=seed,
                           max_num_seqs=max(settings.engine_max_num_seqs, 64), disable_log_stats=True,
                           **scheduling_args(settings, max_model_len))  # seeded rollouts: no split prefill
        self.start_seconds = time.monotonic() - started
        self.config = running_config(self.llm.llm_engine)
        """What the engine reports it runs with (read back from vLLM); a published version's
        manifest records it under `training.rollout_engine`."""
        self.weights_version: str = str(model_dir)

    def generate(self, prompts: Sequence[list[int]], *, max_tokens: int, temperature: float, n: int = 1,
                 seed: int | None = None) -> list[Sample]:
        """`n` answers per prompt (token ids); temperature 0 is greedy."""
        from vllm import SamplingParams

        # one seed per request: the same seed on every request would give every prompt the same draws
        params = [SamplingParams(n=n, temperature=temperature, top_p=1.0, top_k=-1 if temperature else 1,
                                 max_tokens=max_tokens, seed=None if seed is None else seed + i)
                  for i in range(len(prompts))]
        requests: Any = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        samples = []
        for i, out in enumerate(outputs):
            for c in out.outputs:
                samples.append(Sample(i, list(c.token_ids), c.text, c.finish_reason == "stop"))
        return samples

    def load_weights(self, folder: Path) -> float:
        """Reload weights from a folder of safetensors in place; returns seconds.

        The prefix cache goes too: vLLM keys a cached KV block (128 tokens on CPU) by its tokens, not
        by the weights that computed it, and `reload_weights` keeps it, so a prompt answered before
        (the gate's held-out prompts by the champion, the evaluation's by v0) would be answered by the
        new weights reading the old weights' keys and values. (The chat API's swap pauses with
        `clear_cache=True`, which resets it.) Nothing runs between calls here, so the reset holds."""
        started = time.monotonic()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM kept its prefix cache after a weight reload")
        self.weights_version = str(folder)
        return time.monotonic() - started

    def shutdown(self) -> None:
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown(timeout=10)


def sync_weights(policy: PolicyWithValue, engine: RolloutEngine, folder: Path) -> dict[str, float]:
    """Write the policy's weights (`save_weights`) into `folder` and reload the engine from it.
    Returns {"save_s", "reload_s"}."""
    started = time.monotonic()
    save_weights(policy, folder)
    save_s = time.monotonic() - started
    return {"save_s": save_s, "reload_s": engine.load_weights(folder)}


def save_weights(policy: PolicyWithValue, folder: Path) -> None:
    """The policy's weights as float32 safetensors in `folder` (renamed into place), for
    `RolloutEngine.load_weights`.

    Only the weights: the engine keeps its config. A tied LM head is written once (vLLM's Llama
    skips `lm_head.weight` when embeddings are tied).
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tied = bool(getattr(policy.lm.config, "tie_word_embeddings", False))
    state = {k: v.detach().cpu().contiguous() for k, v in policy.lm.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    # the new file is written beside the previous one, which stays until the rename: in all about
    # twice the model's size in /dev/shm. Checked first, so a full /dev/shm is a clear error, not a
    # half-written file and a SIGBUS or ENOSPC from deep inside safetensors.
    require_free(folder, sum(t.numel() * t.element_size() for t in state.values()), what="weight_sync",
                 hint="the weight sync writes the policy there (about twice its size with the previous "
                      "copy): raise the trainer's /dev/shm (Helm trainer.shmSize, compose shm_size) or set "
                      "KAIZEN_PPO_SYNC_DIR to a folder on disk")
    tmp = folder / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")


#: Weight-sync folders are `kaizen-ppo-<pid>-<random>`: a later round removes one whose process is gone.
SYNC_PREFIX = "kaizen-ppo-"


def sync_base(sync_dir: Path | None) -> Path | None:
    """Where sync folders are made: `sync_dir`, else /dev/shm (RAM) where it exists, else the temp dir."""
    return sync_dir or (Path("/dev/shm") if Path("/dev/shm").is_dir() else None)


def stale_sync_folders(base: Path | None) -> list[Path]:
    """Sync folders under `base` (default: the temp dir) whose process no longer runs (SIGKILL, OOM)."""
    return stale_pid_folders(base if base is not None else Path(tempfile.gettempdir()), SYNC_PREFIX)


@contextlib.contextmanager
def sync_folder(sync_dir: Path | None) -> Iterator[Path]:
    """A private folder in RAM (/dev/shm; under `sync_dir`, PPOConfig.sync_dir, when set) for
    weight syncs, removed afterwards (after a SIGKILL, by the next round: `stale_sync_folders`)."""
    base = sync_base(sync_dir)
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{SYNC_PREFIX}{os.getpid()}-", dir=base))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
