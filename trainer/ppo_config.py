"""One PPO run's hyperparameters: `PPOConfig`, built from the `ppo_*` settings.

    config = PPOConfig.from_settings(settings, batch_size=8)   # a round, a benchmark, the CLI

Every field that is a setting takes its default from `kaizen.core.settings.Settings` (one source:
a bare `PPOConfig()` trains as a round does with no KAIZEN_PPO_* set); the environment's values
come in through `from_settings`. Defaults sit near TRL's and OpenRLHF's; each field says where.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kaizen.core.settings import Settings

log = logging.getLogger(__name__)

#: PPOConfig fields whose value is the setting `ppo_<name>` (kaizen/core/settings.py documents each).
FROM_SETTINGS = ("iterations", "batch_size", "response_length", "max_prompt_length", "epochs", "minibatches",
                 "lr", "kl_coef", "adaptive_kl", "target_kl", "stop_kl", "stop_kl_window", "sanity_every",
                 "guard_halvings", "kl_horizon", "cliprange", "cliprange_value", "vf_coef", "gamma", "lam",
                 "temperature", "missing_eos_penalty", "length_neutral", "train_layers", "threads", "seed",
                 "sync_dir", "dtype", "reference")
#: PPOConfig fields named otherwise in the settings: field -> setting.
RENAMED = {"algorithm": "policy_algorithm", "rloo_k": "rloo_k", "dpo_beta": "dpo_beta",
           "dpo_nll_coef": "dpo_nll_coef", "dpo_vote_pairs": "dpo_vote_pairs", "dpo_samples": "dpo_samples",
           "raft_samples": "raft_samples", "raft_sampler": "raft_sampler"}


def _setting(name: str) -> Any:
    """The default of setting `name` (`ppo_<field>` or a RENAMED one)."""
    return Settings.model_fields[name].default


@dataclass
class PPOConfig:
    """One PPO run. Build it with `from_settings` (the settings, then the caller's overrides);
    the field defaults are the settings' defaults, for tests and tools."""

    iterations: int = _setting("ppo_iterations")
    """Rollout + update cycles."""
    batch_size: int = _setting("ppo_batch_size")
    """Prompts per iteration, one sampled answer each (TRL: per_device_train_batch_size x grad accum)."""
    response_length: int = _setting("ppo_response_length")
    """Most generated tokens per answer (TRL: 53)."""
    max_prompt_length: int = _setting("ppo_max_prompt_length")
    """Prompt tokens kept; the oldest are cut so the latest turn stays."""
    epochs: int = _setting("ppo_epochs")
    """Passes over each batch (TRL num_ppo_epochs: 4). Each pass is a full forward+backward on CPU."""
    minibatches: int = _setting("ppo_minibatches")
    """Optimizer steps per pass (TRL num_mini_batches: 1; 2 here: a CPU round has few samples)."""
    lr: float = _setting("ppo_lr")
    """AdamW learning rate (TRL: 3e-6; see Settings.ppo_lr for what was measured on SmolLM2)."""
    kl_coef: float = _setting("ppo_kl_coef")
    """Initial β of the per-token KL penalty (TRL: 0.05; Ziegler et al.: 0.1-0.2)."""
    adaptive_kl: bool = _setting("ppo_adaptive_kl")
    """Move β toward `target_kl` (Ziegler et al. 2019, sec. 2.2); off: β stays `kl_coef`."""
    target_kl: float = _setting("ppo_target_kl")
    """Target of the controller, nats per answer (Ziegler et al.: 6 for long texts; our answers
    are short and the gate refuses more than gate_max_kl=3)."""
    stop_kl: float | None = _setting("ppo_stop_kl")
    """The update stops once the mean KL of the last `stop_kl_window` iterations passes it
    (`ppo_math.kl_spent`); None: `iterations` always."""
    stop_kl_window: int = _setting("ppo_stop_kl_window")
    sanity_every: int = _setting("ppo_sanity_every")
    """Iterations between the sanity checks of trainer/ppo_loop.py's UpdateGuard; 0: none."""
    guard_halvings: int = _setting("ppo_guard_halvings")
    """Times the guard halves a failing check's step toward the last good weights before it drops it."""
    reference: str = _setting("ppo_reference")
    """"champion" (the round's starting version) or "base" (the root of its lineage): what the KL
    penalty and DPO's log-ratios are measured against (`trainer.round_phases.reference_version`)."""
    kl_horizon: int = _setting("ppo_kl_horizon")
    """Samples over which the controller closes its error (Ziegler et al.: 10000)."""
    cliprange: float = _setting("ppo_cliprange")
    """ε of the clipped surrogate (Schulman et al. 2017; TRL 0.2)."""
    cliprange_value: float = _setting("ppo_cliprange_value")
    """Clip of the value update around the rollout's values (TRL 0.2)."""
    vf_coef: float = _setting("ppo_vf_coef")
    """Weight of the value loss (TRL 0.1)."""
    gamma: float = _setting("ppo_gamma")
    """Discount: 1, an answer is one episode (TRL)."""
    lam: float = _setting("ppo_lam")
    """GAE λ (TRL 0.95)."""
    temperature: float = _setting("ppo_temperature")
    """Sampling temperature; the training model divides its logits by it so both agree."""
    missing_eos_penalty: float = _setting("ppo_missing_eos_penalty")
    """Subtracted from the normalised score of an answer that hit `response_length` without
    ending (TRL: missing_eos_penalty; Huang et al. 2024, detail 4)."""
    length_neutral: float = _setting("ppo_length_neutral")
    """Share (0..1) of the reward model's slope on answer length taken out of each score, fitted on
    the run's ended answers (ppo_math.LengthFit); 0 scores as the reward model does."""
    train_layers: int = _setting("ppo_train_layers")
    """Top decoder layers trained, plus final norm, value head and (when not tied to the input
    embeddings) the LM head; 0 trains all. The frozen layers below run once per batch."""
    threads: int | None = _setting("ppo_threads")
    dtype: str = _setting("ppo_dtype")
    """Autocast dtype of the policy's and reference's passes: auto | bfloat16 | float32 (`resolved`)."""
    seed: int = _setting("ppo_seed")
    sync_dir: Path | None = _setting("ppo_sync_dir")
    """Folder the policy is saved to for vLLM's reload_weights; unset: under /dev/shm."""
    algorithm: str = _setting("policy_algorithm")
    """"ppo" (value head + GAE), "rloo" (leave-one-out baseline over rloo_k answers per prompt) or
    "dpo" (online DPO on the reward model's best and worst of dpo_samples answers per prompt, plus
    users' votes) or "raft" (fine-tuning on the reward model's best of raft_samples answers)."""
    rloo_k: int = _setting("rloo_k")
    """Answers per prompt in RLOO: an iteration samples batch_size / rloo_k prompts x rloo_k."""
    dpo_beta: float = _setting("dpo_beta")
    """β of the DPO loss (Rafailov et al. 2023; TRL 0.1)."""
    dpo_nll_coef: float = _setting("dpo_nll_coef")
    """α of RPO's per-token NLL term on the chosen answers (0: plain DPO)."""
    dpo_vote_pairs: int = _setting("dpo_vote_pairs")
    """Users' decided votes added to each DPO iteration's on-policy pairs."""
    dpo_samples: int = _setting("dpo_samples")
    """Answers per prompt in DPO: the pair is the reward model's best and worst of them."""
    raft_samples: int = _setting("raft_samples")
    """Answers per prompt in RAFT: the reward model's best of them is fine-tuned on."""
    raft_sampler: str = _setting("raft_sampler")
    """RAFT's answers from the policy as trained ("policy") or from the round's starting weights ("start")."""
    # -- not settings: fixed parts of the recipe --
    whiten_rewards: bool = False
    """Whiten per-token rewards before GAE (TRL default off)."""
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.algorithm not in ("ppo", "rloo", "dpo", "raft"):
            raise ValueError(f"algorithm must be ppo, rloo, dpo or raft, got {self.algorithm!r}")
        if self.algorithm == "raft" and (self.raft_samples < 2 or self.batch_size % self.raft_samples):
            raise ValueError(f"raft: batch_size {self.batch_size} must be a multiple of raft_samples "
                             f"{self.raft_samples} >= 2 (answers per prompt)")
        if self.raft_sampler not in ("policy", "start"):
            raise ValueError(f"raft_sampler must be policy or start, got {self.raft_sampler!r}")
        if self.algorithm == "dpo" and (self.dpo_samples < 2 or self.batch_size % self.dpo_samples):
            raise ValueError(f"dpo: batch_size {self.batch_size} must be a multiple of dpo_samples "
                             f"{self.dpo_samples} >= 2 (answers per prompt)")
        if self.algorithm == "rloo" and (self.rloo_k < 2 or self.batch_size % self.rloo_k):
            raise ValueError(f"rloo: batch_size {self.batch_size} must be a multiple of rloo_k "
                             f"{self.rloo_k} >= 2")

    @property
    def prompts_per_iteration(self) -> int:
        return self.batch_size // self.answers_per_prompt

    @property
    def answers_per_prompt(self) -> int:
        return {"rloo": self.rloo_k, "dpo": self.dpo_samples, "raft": self.raft_samples}.get(self.algorithm, 1)

    @property
    def value_head(self) -> bool:
        """Whether the update trains a value head (PPO); RLOO, DPO and RAFT need none."""
        return self.algorithm == "ppo"

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> PPOConfig:
        """The settings' `ppo_*` values (and policy_algorithm, rloo_k); an override that is not
        None replaces one (a benchmark's or a test's options)."""
        values = {name: getattr(settings, f"ppo_{name}") for name in FROM_SETTINGS}
        values.update({name: getattr(settings, setting) for name, setting in RENAMED.items()})
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def resolved_dtype(self) -> torch.dtype:
        """`dtype` for this machine (auto: kaizen/core/hardware.py), logged with the reason."""
        from kaizen.core.hardware import choose_dtype

        choice = choose_dtype(self.dtype)
        log.info("PPO autocast dtype %s", choice)
        return torch.float32 if choice.dtype == "float32" else torch.bfloat16

    def apply_threads(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
