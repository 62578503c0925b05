"""PPO for a chat policy against the reward model, rollouts on vLLM.

    python -m trainer.rounds          # a training round runs this (see trainer/rounds.py)
    python bench/ppo.py               # one iteration timed against TRL's PPO trainer

One iteration, in paper order (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences"; Ouyang et al. 2022, InstructGPT; Huang et al. 2024, "The N+ Implementation
Details of RLHF with PPO"):

  1. rollout: sample one answer per prompt from the current policy on a vLLM engine;
  2. score: the reward model reads prompt + answer; answers that never end are penalised;
  3. recompute log-probs of the sampled tokens with the training model (policy and frozen
     reference) and the value head's estimates; sampling and training never disagree on
     which weights produced a log-prob;
  4. per-token reward = -β·KL_t, plus the score at the answer's last token;
  5. advantages by GAE (γ, λ), whitened; returns = advantages + values;
  6. `epochs` passes of clipped policy loss + clipped value loss;
  7. adapt β toward the target KL; write the weights where vLLM reloads them.

The value head sits on the policy's own last hidden state (one forward gives logits and
values), a shared-trunk design (Stiennon et al. 2020 used a separate value network; TRL's
PPO trainer does too, which costs a second model's forward and backward per step).

Order of the file: config, tensor helpers, KL, rewards, GAE, losses, KL controller,
model, rollout engine, the iteration loop.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.disk import require_free
from services.registry import atomic_folder
from services.settings import Settings
from trainer.distributed import ONE_PROCESS, Dist, launcher_env_hidden, wrap_ddp

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


# -- config -------------------------------------------------------------------------


@dataclass
class PPOConfig:
    """One PPO run. Defaults come from Settings (`ppo_*`); near TRL's / OpenRLHF's."""

    iterations: int = 16
    """Rollout + update cycles."""
    batch_size: int = 16
    """Prompts per iteration, one sampled answer each (TRL: per_device_train_batch_size x grad accum)."""
    response_length: int = 64
    """Most generated tokens per answer (TRL: 53)."""
    max_prompt_length: int = 256
    """Prompt tokens kept; the oldest are cut so the latest turn stays."""
    epochs: int = 2
    """Passes over each batch (TRL num_ppo_epochs: 4). Each pass is a full forward+backward on CPU."""
    minibatches: int = 2
    """Optimizer steps per pass (TRL num_mini_batches: 1; 2 here: a CPU round has few samples)."""
    lr: float = 2e-5
    """AdamW learning rate (TRL: 3e-6; see Settings.ppo_lr for what was measured on SmolLM2)."""
    kl_coef: float = 0.05
    """Initial β of the per-token KL penalty (TRL: 0.05; Ziegler et al.: 0.1-0.2)."""
    adaptive_kl: bool = True
    """Move β toward `target_kl` (Ziegler et al. 2019, sec. 2.2); off: β stays `kl_coef`."""
    target_kl: float = 1.0
    """Target of the controller, nats per answer (Ziegler et al.: 6 for long texts; our answers
    are short and the gate refuses more than gate_max_kl=3)."""
    kl_horizon: int = 1000
    """Samples over which the controller closes its error (Ziegler et al.: 10000)."""
    cliprange: float = 0.2
    """ε of the clipped surrogate (Schulman et al. 2017; TRL 0.2)."""
    cliprange_value: float = 0.2
    """Clip of the value update around the rollout's values (TRL 0.2)."""
    vf_coef: float = 0.1
    """Weight of the value loss (TRL 0.1)."""
    gamma: float = 1.0
    """Discount: 1, an answer is one episode (TRL)."""
    lam: float = 0.95
    """GAE λ (TRL 0.95)."""
    whiten_rewards: bool = False
    """Whiten per-token rewards before GAE (TRL default off)."""
    temperature: float = 1.0
    """Sampling temperature; the training model divides its logits by it so both agree."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the normalised score of an answer that hit `response_length` without
    ending (TRL: missing_eos_penalty; Huang et al. 2024, detail 4)."""
    max_grad_norm: float = 1.0
    train_layers: int = 8
    """Top decoder layers trained, plus final norm, value head and (when not tied to the input
    embeddings) the LM head; 0 trains all. The frozen layers below run once per batch."""
    threads: int | None = 1
    seed: int = 0
    sync_dir: Path | None = None
    """Folder the policy is saved to for vLLM's reload_weights; unset: under /dev/shm."""
    algorithm: str = "ppo"
    """"ppo" (value head + GAE) or "rloo" (leave-one-out baseline over rloo_k answers per prompt)."""
    rloo_k: int = 2
    """Answers per prompt in RLOO: an iteration samples batch_size / rloo_k prompts x rloo_k."""

    def __post_init__(self) -> None:
        if self.algorithm not in ("ppo", "rloo"):
            raise ValueError(f"algorithm must be ppo or rloo, got {self.algorithm!r}")
        if self.algorithm == "rloo" and (self.rloo_k < 2 or self.batch_size % self.rloo_k):
            raise ValueError(f"rloo: batch_size {self.batch_size} must be a multiple of rloo_k "
                             f"{self.rloo_k} >= 2")

    @property
    def prompts_per_iteration(self) -> int:
        return self.batch_size // self.rloo_k if self.algorithm == "rloo" else self.batch_size

    @property
    def answers_per_prompt(self) -> int:
        return self.rloo_k if self.algorithm == "rloo" else 1

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> PPOConfig:
        names = ("iterations", "batch_size", "response_length", "max_prompt_length", "epochs", "minibatches",
                 "lr", "kl_coef", "adaptive_kl", "target_kl", "kl_horizon", "cliprange", "cliprange_value",
                 "vf_coef", "gamma", "lam", "temperature", "missing_eos_penalty", "train_layers", "threads",
                 "seed", "sync_dir")
        values = {n: getattr(settings, f"ppo_{n}") for n in names}
        values.update(algorithm=settings.policy_algorithm, rloo_k=settings.rloo_k)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def apply_threads(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)


# -- tensor helpers -------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None,
                count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of x over entries where mask is 1. x, mask: same shape; dim None: over all.

    count: the denominator to use instead of mask.sum() (dim None only): a rank holding part of
    a minibatch divides its share by the whole minibatch's token count."""
    if dim is None:
        return (x * mask).sum() / (mask.sum().clamp(min=1) if count is None else count)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over mask (Bessel-corrected when unbiased, as TRL and OpenRLHF do)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries; shift_mean=False keeps the mean (reward whitening)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(label) per position. logits (B, T, V), labels (B, T) -> (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return torch.gather(logp, 2, labels.unsqueeze(-1)).squeeze(-1)  # (B, T, 1) -> (B, T)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H(π) per position = logsumexp(z) - Σ softmax(z)·z. logits (B, T, V) -> (B, T)."""
    logits = logits.float()
    p = F.softmax(logits, dim=-1)  # (B, T, V)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


# -- KL to the reference ----------------------------------------------------------------


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from tokens sampled from π. (B, T) -> (B, T).

    k1 = log π - log π_ref (unbiased, can be negative); k3 = (r - 1) - log r with r = π_ref/π
    (unbiased, never negative). J. Schulman, "Approximating KL divergence", 2020,
    http://joschu.net/blog/kl-approx.html
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio  # Schulman 2020, k1
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # Schulman 2020, k3: (r - 1) - log r, r = exp(-log_ratio)
    raise ValueError(f"kind must be k1 or k3, got {kind!r}")


# -- rewards ----------------------------------------------------------------------------


def shaped_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                   mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -β·KL_t, plus the score at each answer's last token.

    scores (B,), logprobs / ref_logprobs / mask (B, T) -> rewards (B, T), kl (B, T).
    Ziegler et al. 2019 eq. 2: R(x, y) = r(x, y) - β log(π(y|x) / π_ref(y|x)), spread per token.
    """
    kl = kl_per_token(logprobs, ref_logprobs, "k1") * mask  # (B, T)
    rewards = -kl_coef * kl  # Ziegler et al. 2019, eq. 2 (the KL part, per token)
    last = (mask.cumsum(-1) * mask).argmax(-1)  # (B,) index of each row's last answer token
    rewards[torch.arange(len(scores)), last] += scores  # the score lands on the final token
    return rewards, kl


# -- generalised advantage estimation ------------------------------------------------------


def gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns by GAE (Schulman et al. 2016, eq. 16).

    values, rewards, mask: (B, T), answers right-padded (mask is 1 on a prefix of each row).
    δ_t = r_t + γ V_{t+1} - V_t;  A_t = δ_t + γλ A_{t+1};  returns_t = A_t + V_t.
    Beyond an answer's end V and r are 0, so the last token bootstraps from 0.
    Returns advantages (B, T), returns (B, T).
    """
    values, rewards = values * mask, rewards * mask
    T = rewards.shape[1]
    lastgaelam = torch.zeros_like(rewards[:, 0])  # (B,)
    advantages_reversed = []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]  # Schulman et al. 2016, eq. 10
        lastgaelam = delta + gamma * lam * lastgaelam  # eq. 16, recursively
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask  # (B, T)
    returns = advantages + values
    return advantages, returns


def rloo_advantages(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """REINFORCE Leave-One-Out advantages (Kool et al. 2019; Ahmadian et al. 2024, eq. 5).

    rewards (B,): one sequence-level reward per answer; groups (B,): which prompt each answer is
    for (every group has at least 2 answers). A_i = R_i - mean of R_j over the other answers j
    of the same prompt: the siblings are the baseline, no value network needed. Returns (B,).
    """
    ids = torch.unique(groups, return_inverse=True)[1]  # (B,) 0..G-1
    G = int(ids.max()) + 1
    sums = torch.zeros(G, dtype=rewards.dtype, device=rewards.device).index_add_(0, ids, rewards)  # (G,)
    counts = torch.zeros_like(sums).index_add_(0, ids, torch.ones_like(rewards))  # (G,)
    if bool((counts < 2).any()):
        raise ValueError("rloo_advantages: every prompt needs at least two answers")
    baseline = (sums[ids] - rewards) / (counts[ids] - 1)  # mean of the siblings
    return rewards - baseline


# -- losses -------------------------------------------------------------------------------


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float,
                token_count: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate (Schulman et al. 2017, PPO, eq. 7), as a loss to minimise.

    All inputs (B, T). Returns pg_loss () and stats: clipfrac (share of tokens where the clip
    was active) and approx_kl (k3 of old vs new policy, Schulman 2020; CleanRL's diagnostic).
    token_count: tokens of the whole minibatch when these rows are one rank's share of it.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask, count=token_count)  # PPO eq. 7: -min(r A, clip(r) A)
    with torch.no_grad():
        clipfrac = masked_mean((pg_losses2 > pg_losses).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)  # Schulman 2020, k3
    return pg_loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float, token_count: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ½·max((V - R)², (V_clip - R)²), V_clip = V_old + clip(V - V_old, ±c).

    All inputs (B, T). From OpenAI baselines' ppo2, kept by TRL and OpenRLHF (Huang et al. 2024).
    """
    vpredclipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask, count=token_count)
    with torch.no_grad():
        vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), mask)
    return vf_loss, {"vf_clipfrac": vf_clipfrac}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over the mask (CleanRL's diagnostic): 1 is perfect, <= 0 useless."""
    var_r = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var_r) if var_r > 0 else float("nan")


# -- adaptive KL controller -------------------------------------------------------------------


@dataclass
class AdaptiveKLController:
    """β_{t+1} = β_t (1 + K e_t), e_t = clip(KL_t / KL_target - 1, ±0.2), K = n / horizon.

    Ziegler et al. 2019, sec. 2.2 (K_β = 0.1 there, with n/horizon as the step size).
    `fixed` keeps β constant (TRL's current PPO trainer).
    """

    value: float
    target: float
    horizon: int
    fixed: bool = False

    def update(self, current_kl: float, n_steps: int) -> float:
        if not self.fixed:
            proportional_error = max(-0.2, min(0.2, current_kl / self.target - 1))  # Ziegler et al. 2019
            self.value *= 1 + proportional_error * n_steps / self.horizon
        return self.value


# -- model -------------------------------------------------------------------------------------


class PolicyWithValue(nn.Module):
    """A causal LM plus a scalar value head on its last hidden state (shared trunk)."""

    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.lm = lm
        self.v_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.v_head.weight)  # V ≡ 0 at the start: the first advantages are the rewards
        nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int,
                temperature: float = 1.0, with_values: bool = True, trunk: torch.Tensor | None = None,
                depth: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and values at the positions that predict tokens start.. of each row.

        input_ids, attention_mask: (B, S) with the answer in columns start..S-1.
        trunk: the hidden states after the first `depth` decoder layers (`self.trunk`), so only
        the layers above run; None runs the whole model.
        Returns logits (B, S - start, V) (divided by temperature) and values (B, S - start).
        """
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, S): left padding ignored
        if trunk is None:
            hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids).last_hidden_state  # (B, S, H)
        else:
            top = self._part(self.lm.model.layers[depth:], self.lm.model.norm)
            hidden = top(inputs_embeds=trunk, attention_mask=attention_mask,
                         position_ids=position_ids).last_hidden_state  # (B, S, H)
        h = hidden[:, start - 1: -1]  # (B, R, H): position t predicts token t+1
        logits = self.lm.lm_head(h) / temperature  # (B, R, V)
        values = self.v_head(h).squeeze(-1).float() if with_values else None  # (B, R)
        return logits, values

    @torch.no_grad()
    def trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, depth: int) -> torch.Tensor:
        """Hidden states (B, S, H) after the embeddings and the first `depth` decoder layers."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        bottom = self._part(self.lm.model.layers[:depth], nn.Identity())
        out: torch.Tensor = bottom(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids).last_hidden_state
        return out

    def _part(self, layers: Any, norm: nn.Module) -> Any:
        """The decoder with only `layers` and `norm`, sharing every weight with the whole model.

        A shallow copy with its own module table: the model class's own forward (embeddings or
        `inputs_embeds`, causal mask, rotary positions) runs over a slice of the layers.
        """
        part = copy.copy(self.lm.model)
        part._modules = {**self.lm.model._modules, "layers": nn.ModuleList(layers), "norm": norm}
        return part


def shared_trunk_depth(policy: PolicyWithValue, reference: PolicyWithValue) -> int:
    """How many lower decoder layers (with the embeddings) are frozen in `policy` and equal to
    `reference`'s: their outputs are computed once per batch and serve both models and every
    minibatch pass (0: none can be shared)."""
    mine, ref = policy.lm.model, reference.lm.model

    def frozen_and_equal(a: nn.Module, b: nn.Module) -> bool:
        pa, pb = list(a.parameters()), list(b.parameters())
        return (len(pa) == len(pb) and not any(p.requires_grad for p in pa)
                and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(pa, pb, strict=True)))

    if not frozen_and_equal(mine.embed_tokens, ref.embed_tokens):
        return 0
    depth = 0
    for a, b in zip(mine.layers, ref.layers, strict=False):
        if not frozen_and_equal(a, b):
            break
        depth += 1
    return depth if depth < len(mine.layers) else 0


def load_policy(path: Path) -> tuple[PolicyWithValue, Any, torch.dtype]:
    """(policy with a fresh value head, tokenizer, the folder's saved dtype). Weights in float32."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    saved = AutoConfig.from_pretrained(path).dtype or torch.float32
    saved = getattr(torch, saved) if isinstance(saved, str) else saved
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return PolicyWithValue(lm), tokenizer, saved


def freeze_lower_layers(policy: PolicyWithValue, train_layers: int) -> int:
    """Train the top `train_layers` decoder layers, final norm, LM head, value head (0: all).

    When the LM head is tied to the input embeddings (SmolLM2), training it would also move the
    embeddings under every frozen layer: the head stays frozen then, so the lower layers' outputs
    do not change during PPO and are computed once per batch (`shared_trunk_depth`).
    """
    layers = policy.lm.model.layers
    partial = 0 < train_layers < len(layers)
    for p in policy.parameters():
        p.requires_grad_(not partial)
    if partial:
        head = policy.lm.lm_head
        tied = any(p is q for p in head.parameters() for q in policy.lm.model.embed_tokens.parameters())
        for module in [*layers[-train_layers:], policy.lm.model.norm, policy.v_head, *([] if tied else [head])]:
            for p in module.parameters():
                p.requires_grad_(True)
    return sum(p.numel() for p in policy.parameters() if p.requires_grad)


def save_policy(policy: PolicyWithValue, tokenizer: Any, out: Path, dtype: torch.dtype) -> Path:
    """A Hugging Face folder (safetensors, config, generation config, tokenizer) in `dtype`,
    written under a temporary name and renamed when complete."""
    with atomic_folder(out) as tmp:
        lm = policy.lm
        state = {k: v.detach().to("cpu", dtype) for k, v in lm.state_dict().items()}
        lm.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        config = lm.config.to_dict()
        config["dtype"] = str(dtype).removeprefix("torch.")  # save_pretrained records the float32 we train in
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if lm.generation_config is not None and not (tmp / "generation_config.json").exists():
            lm.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out.resolve()


# -- rollout engine ---------------------------------------------------------------------------


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
    the serving engine's dtype (float32 on CPU, where vLLM garbles bf16; bf16 on a capable GPU).

    vLLM generates (≈255 tok/s batched here, against ≈6 tok/s for HF generate); after each
    update the trainer saves the policy to a RAM folder and the engine reloads it in place
    (`Worker.reload_weights`), so the next rollout samples from the new weights.
    """

    def __init__(self, settings: Settings, model_dir: Path, *, max_model_len: int = 1024, seed: int = 0) -> None:
        from vllm import LLM

        from services.engine import configure_vllm_env, scheduling_args, serving_dtype

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
        """Reload weights from a folder of safetensors in place; returns seconds."""
        started = time.monotonic()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
        self.weights_version = str(folder)
        return time.monotonic() - started

    def shutdown(self) -> None:
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown(timeout=10)


def sync_weights(policy: PolicyWithValue, engine: RolloutEngine, folder: Path) -> dict[str, float]:
    """Write the policy's weights (float32 safetensors) into `folder` and reload the engine from it.

    Only the weights: the engine keeps its config. A tied LM head is written once (vLLM's Llama
    skips `lm_head.weight` when embeddings are tied). Returns {"save_s", "reload_s"}.
    """
    from safetensors.torch import save_file

    started = time.monotonic()
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
    save_s = time.monotonic() - started
    return {"save_s": save_s, "reload_s": engine.load_weights(folder)}


#: Weight-sync folders are `kaizen-ppo-<pid>-<random>`: a later round removes one whose process is gone.
SYNC_PREFIX = "kaizen-ppo-"


def sync_base(sync_dir: Path | None) -> Path | None:
    """Where sync folders are made: `sync_dir`, else /dev/shm (RAM) where it exists, else the temp dir."""
    return sync_dir or (Path("/dev/shm") if Path("/dev/shm").is_dir() else None)


def stale_sync_folders(base: Path | None) -> list[Path]:
    """Sync folders under `base` (default: the temp dir) whose process no longer runs (SIGKILL, OOM)."""
    root = base if base is not None else Path(tempfile.gettempdir())
    stale = []
    for folder in root.glob(f"{SYNC_PREFIX}*"):
        pid, dash, _ = folder.name[len(SYNC_PREFIX):].partition("-")
        if not (dash and pid.isdigit()):
            continue  # not ours to judge: an older name without the pid (mkdtemp's suffix has no "-")
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            stale.append(folder)
        except PermissionError:
            pass  # alive, someone else's
    return stale


@contextlib.contextmanager
def sync_folder(config: PPOConfig) -> Iterator[Path]:
    """A private folder in RAM (/dev/shm) for weight syncs, removed afterwards (after a SIGKILL,
    by the next round: `stale_sync_folders`)."""
    base = sync_base(config.sync_dir)
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{SYNC_PREFIX}{os.getpid()}-", dir=base))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- prompts and scoring ---------------------------------------------------------------------


def encode_prompt(tokenizer: Any, messages: Messages, max_length: int) -> list[int]:
    """Chat-template tokens ending with the assistant's turn prompt; the oldest cut past max_length."""
    ids: Any = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    out: list[int] = [int(i) for i in ids]
    return out[-max_length:]


@dataclass
class RewardScorer:
    """The reward model, scoring (conversation, answer) as it was trained to: whole chat template,
    normalised by the mean and std the RM's manifest recorded on its held-out slice."""

    model: Any
    tokenizer: Any
    max_length: int = 384
    mean: float = 0.0
    std: float = 1.0
    version: str | None = None

    @classmethod
    def load(cls, path: Path, max_length: int = 384) -> RewardScorer:
        reward = importlib.import_module("trainer.reward")  # see trainer/rounds.py `_heavy`
        load_reward_model, read_manifest = reward.load_reward_model, reward.read_manifest
        model, tokenizer = load_reward_model(path)
        norm = read_manifest(path).get("reward_norm", {}) if (path / "manifest.json").is_file() else {}
        return cls(model, tokenizer, max_length, float(norm.get("mean", 0.0)),
                   float(norm.get("std", 1.0)) or 1.0, path.name)

    def __call__(self, prompts: Sequence[Messages], answers: Sequence[str]) -> torch.Tensor:
        """Normalised scores (N,) of answers[i] to prompts[i]."""
        reward = importlib.import_module("trainer.reward")
        RewardConfig, score_texts = reward.RewardConfig, reward.score_texts
        encode_conversation = importlib.import_module("trainer.reward_data").encode_conversation

        seqs = [encode_conversation(self.tokenizer, p, a, self.max_length)[0]
                for p, a in zip(prompts, answers, strict=True)]
        raw = score_texts(self.model, self.tokenizer, seqs, RewardConfig(max_length=self.max_length,
                                                                           dtype="float32"))
        return (raw - self.mean) / self.std


# -- the iteration loop -------------------------------------------------------------------------


@dataclass
class Batch:
    """One iteration's rollouts as tensors; answers in columns `start`.. of input_ids."""

    input_ids: torch.Tensor  # (B, S) prompts left-padded, answers right-padded
    attention_mask: torch.Tensor  # (B, S)
    response_mask: torch.Tensor  # (B, R) 1 on answer tokens
    start: int

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device),
                     self.start)

    def rows(self, index: torch.Tensor) -> Batch:
        """The batch of rows `index` (same columns)."""
        return Batch(self.input_ids[index], self.attention_mask[index], self.response_mask[index], self.start)


def collate(prompt_ids: Sequence[list[int]], answers: Sequence[list[int]], pad_id: int) -> Batch:
    P = max(len(p) for p in prompt_ids)
    R = max(max(len(a) for a in answers), 1)
    B = len(answers)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)  # (B, P + R)
    mask = torch.zeros((B, P + R), dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompt_ids, answers, strict=True)):
        ids[i, P - len(p): P] = torch.tensor(p)
        mask[i, P - len(p): P] = 1
        if a:
            ids[i, P: P + len(a)] = torch.tensor(a)
            mask[i, P: P + len(a)] = 1
    return Batch(ids, mask, mask[:, P:].float(), P)


@torch.no_grad()
def sequence_logprobs(model: PolicyWithValue, batch: Batch, temperature: float, with_values: bool = True,
                      trunk: torch.Tensor | None = None, depth: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the answer tokens (B, R) and values (B, R) without gradients."""
    batch = batch.to(model.v_head.weight.device)
    logits, values = model(batch.input_ids, batch.attention_mask, batch.start, temperature, with_values,
                           trunk=trunk, depth=depth)
    labels = batch.input_ids[:, batch.start:]  # (B, R)
    return logprobs_from_logits(logits, labels), values


@dataclass
class IterationStats:
    iteration: int
    reward_mean: float
    reward_std: float
    score_mean: float
    """Reward-model score before the EOS penalty and KL (normalised units)."""
    kl: float
    """Mean over answers of Σ_t k1: nats per answer."""
    kl_coef: float
    pg_loss: float
    vf_loss: float
    clipfrac: float
    approx_kl: float
    entropy: float
    explained_variance: float
    ended_share: float
    answer_tokens: float
    tokens_per_s: float
    samples_per_s: float
    seconds: dict[str, float] = field(default_factory=dict)
    """Time split: rollout, scoring (RM + log-probs of policy and reference), training, sync."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PhaseTimer:
    """Seconds per named phase: `with timer("rollout"): ...`; `timer.seconds` maps name -> s."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - started


@dataclass
class Scored:
    """A rollout batch made ready for the update: rewards, old log-probs and values, advantages.

    Every tensor covers the whole batch on every rank; `own` are the rows this rank scored (and
    trains on) and `trunk` their frozen lower layers' hidden states (None when none are shared)."""

    batch: Batch
    scores: torch.Tensor  # (B,) reward-model scores
    penalised: torch.Tensor  # (B,) after the missing-EOS penalty
    ended: torch.Tensor  # (B,)
    old_logprobs: torch.Tensor  # (B, R)
    old_values: torch.Tensor  # (B, R)
    kl: torch.Tensor  # (B, R) per-token k1 to the reference
    advantages: torch.Tensor  # (B, R)
    returns: torch.Tensor  # (B, R)
    own: torch.Tensor  # (b,) row indices
    trunk: torch.Tensor | None  # (b, S, H)


@dataclass
class PPOTrainer:
    """State of one PPO run: policy, frozen reference, optimizer, KL controller, engine.

    One iteration (`step`) reads rollout -> score -> advantages -> update -> sync. On N ranks
    (trainer/distributed.py) rank 0 holds the engine and broadcasts the rollouts; each rank
    scores every N-th row (reward model, policy and reference log-probs, values) and a sum
    over ranks completes the batch, so advantages and the KL controller are the same
    everywhere; each minibatch is split by those rows and DDP averages the gradients, weighted
    so that N ranks take the step one process would.
    """

    config: PPOConfig
    policy: PolicyWithValue
    reference: PolicyWithValue
    tokenizer: Any
    engine: RolloutEngine | None
    """None on every rank but rank 0."""
    scorer: RewardScorer
    sync_dir: Path | None
    dist: Dist = ONE_PROCESS
    kl_ctl: AdaptiveKLController = field(init=False)
    optimizer: torch.optim.Optimizer = field(init=False)
    rng: random.Random = field(init=False)
    iteration: int = 0
    trunk_depth: int = field(init=False)
    """Lower layers shared by policy and reference and frozen: run once per batch."""
    model: nn.Module = field(init=False)
    """The policy as trained: wrapped in DistributedDataParallel on several ranks."""

    def __post_init__(self) -> None:
        c = self.config
        if c.batch_size < self.dist.world_size:
            raise ValueError(f"ppo batch_size {c.batch_size} is smaller than the {self.dist.world_size} "
                             "training processes: every rank needs at least one rollout")
        c.apply_threads()
        torch.manual_seed(c.seed)
        self.rng = random.Random(c.seed)
        self.kl_ctl = AdaptiveKLController(c.kl_coef, c.target_kl, c.kl_horizon, fixed=not c.adaptive_kl)
        device = self.dist.device
        self.policy.to(device)
        self.reference.to(device)
        self.scorer.model.to(device)
        self.reference.eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        freeze_lower_layers(self.policy, c.train_layers)
        if c.algorithm == "rloo":
            self.policy.v_head.requires_grad_(False)  # unused: DDP must not wait for its gradient
        self.trunk_depth = shared_trunk_depth(self.policy, self.reference)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=c.lr, eps=1e-5, weight_decay=0.0)
        self.model = wrap_ddp(self.policy, self.dist)

    def step(self, prompts: Sequence[Messages]) -> IterationStats:
        """One PPO iteration on `prompts` (one answer each); the engine then holds the new weights."""
        c, timer = self.config, PhaseTimer()
        prompt_ids = [encode_prompt(self.tokenizer, m, c.max_prompt_length) for m in prompts]
        with timer("rollout"):
            samples = self.rollout(prompt_ids)
        with timer("scoring"):
            scored = self.score(prompts, prompt_ids, samples)
        with timer("training"):
            stats = self.update(scored)
        with timer("sync"):
            sync = self.sync()
        mean_kl = float(scored.kl.sum(-1).mean())  # nats per answer
        kl_coef_used = self.kl_ctl.value
        B = len(samples)
        self.kl_ctl.update(mean_kl, B)
        seconds = {**timer.seconds, "sync_save": sync["save_s"], "sync_reload": sync["reload_s"]}
        total = seconds["total"] = sum(timer.seconds.values())
        tokens = float(scored.batch.response_mask.sum())
        self.iteration += 1
        return IterationStats(
            iteration=self.iteration, reward_mean=float(scored.penalised.mean()),
            reward_std=float(scored.penalised.std()) if B > 1 else 0.0, score_mean=float(scored.scores.mean()),
            kl=mean_kl, kl_coef=kl_coef_used, **stats,
            explained_variance=explained_variance(scored.old_values, scored.returns, scored.batch.response_mask),
            ended_share=float(scored.ended.mean()), answer_tokens=tokens / B, tokens_per_s=tokens / total,
            samples_per_s=B / total, seconds=seconds,
        )

    def rollout(self, prompt_ids: Sequence[list[int]]) -> list[Sample]:
        """One sampled answer per prompt from the engine (rank 0), the same list on every rank."""
        c = self.config
        samples = None
        if self.dist.is_main and self.engine is None:
            raise RuntimeError("rank 0 samples the rollouts and has no engine")
        if self.engine is not None:
            samples = self.engine.generate(prompt_ids, max_tokens=c.response_length, temperature=c.temperature,
                                           n=c.answers_per_prompt,
                                           seed=(c.seed * 1_000 + self.iteration) * 100_003)
        out: list[Sample] = self.dist.broadcast(samples)
        return out

    @torch.no_grad()
    def score(self, prompts: Sequence[Messages], prompt_ids: Sequence[list[int]],
              samples: Sequence[Sample]) -> Scored:
        """Reward-model scores, old log-probs and values, KL-shaped rewards and GAE advantages."""
        c, tok, dist = self.config, self.tokenizer, self.dist
        batch = collate([prompt_ids[s.prompt] for s in samples], [s.token_ids for s in samples],
                        tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id).to(dist.device)
        B, R = batch.response_mask.shape
        own = torch.arange(dist.rank, B, dist.world_size)  # (b,) this rank's rows
        mine = batch.rows(own.to(dist.device))
        self.policy.eval()
        depth = self.trunk_depth
        # the frozen lower layers, once: the same for policy, reference and every minibatch pass
        trunk = self.policy.trunk(mine.input_ids, mine.attention_mask, depth) if depth else None  # (b, S, H)
        scores = self.scorer([prompts[samples[i].prompt] for i in own.tolist()],
                             [samples[i].text for i in own.tolist()]).to(dist.device)  # (b,)
        logprobs, values = sequence_logprobs(self.policy, mine, c.temperature, trunk=trunk, depth=depth)
        ref_logprobs, _ = sequence_logprobs(self.reference, mine, c.temperature, with_values=False, trunk=trunk,
                                            depth=depth)
        assert values is not None
        full = torch.zeros(B, 1 + 3 * R, device=dist.device)  # each row filled by the one rank that owns it
        full[own.to(dist.device)] = torch.cat([scores[:, None], logprobs, values, ref_logprobs], dim=1)
        full = dist.all_reduce_sum(full)
        scores, old_logprobs = full[:, 0], full[:, 1:1 + R]
        old_values, ref_logprobs = full[:, 1 + R:1 + 2 * R], full[:, 1 + 2 * R:]
        ended = torch.tensor([s.finished for s in samples], dtype=torch.float32, device=dist.device)  # (B,)
        penalised = scores - c.missing_eos_penalty * (1 - ended)  # Huang et al. 2024: no EOS, lower score
        mask = batch.response_mask  # (B, R)
        if c.algorithm == "rloo":
            kl = kl_per_token(old_logprobs, ref_logprobs, "k1") * mask  # (B, R)
            reward = penalised - self.kl_ctl.value * kl.sum(-1)  # (B,) R(x, y) - β KL (TRL's RLOO)
            groups = torch.tensor([s.prompt for s in samples], device=dist.device)
            advantages = rloo_advantages(reward, groups)[:, None] * mask  # (B, R): each token its answer's A
            return Scored(batch, scores, penalised, ended, old_logprobs, torch.zeros_like(old_values), kl,
                          advantages, torch.zeros_like(old_values), own, trunk)
        rewards, kl = shaped_rewards(penalised, old_logprobs, ref_logprobs, mask, self.kl_ctl.value)
        if c.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(old_values, rewards, mask, c.gamma, c.lam)
        advantages = masked_whiten(advantages, mask) * mask  # per batch, as TRL/OpenRLHF
        return Scored(batch, scores, penalised, ended, old_logprobs, old_values, kl, advantages, returns, own, trunk)

    def update(self, sc: Scored) -> dict[str, float]:
        """`epochs` passes of `minibatches` clipped-PPO steps over the batch; mean loss stats."""
        c, dist, batch = self.config, self.dist, sc.batch
        mask, B = batch.response_mask, len(sc.penalised)
        local_index = {int(row): k for k, row in enumerate(sc.own)}  # row -> its place in sc.trunk
        # the same minibatches on every rank and in one process: a generator of the run's own
        order_rng = torch.Generator().manual_seed(c.seed * 1_000_003 + self.iteration)
        self.policy.train()
        keys = ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "entropy")
        sums, steps = torch.zeros(len(keys)), 0
        for _epoch in range(c.epochs):
            for mb in torch.randperm(B, generator=order_rng).chunk(c.minibatches):
                rows = [int(i) for i in mb if int(i) in local_index]
                weight = 1.0
                if not rows:  # none of this minibatch is ours: a zero-weighted step keeps DDP in step
                    rows, weight = [int(sc.own[0])], 0.0
                idx = torch.tensor(rows, device=dist.device)
                trunk = None if sc.trunk is None else sc.trunk[torch.tensor([local_index[r] for r in rows])]
                rloo = c.algorithm == "rloo"  # no value head: the siblings are the baseline
                logits, values = self.model(batch.input_ids[idx], batch.attention_mask[idx], batch.start,
                                            c.temperature, with_values=not rloo, trunk=trunk,
                                            depth=self.trunk_depth)  # (b, R, V), (b, R)
                logprobs = logprobs_from_logits(logits, batch.input_ids[idx, batch.start:])  # (b, R)
                tokens = mask[mb.to(dist.device)].sum().clamp(min=1)  # the whole minibatch's answer tokens
                pg_loss, pg_stats = policy_loss(logprobs, sc.old_logprobs[idx], sc.advantages[idx], mask[idx],
                                                c.cliprange, token_count=tokens)
                vf_loss = torch.zeros(())
                if values is not None:
                    vf_loss, _ = value_loss(values, sc.old_values[idx], sc.returns[idx], mask[idx],
                                            c.cliprange_value, token_count=tokens)
                loss = (pg_loss + c.vf_coef * vf_loss) * (weight * dist.world_size)  # DDP divides by N
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                torch.nn.utils.clip_grad_norm_(
                    [p for p in self.policy.parameters() if p.requires_grad], c.max_grad_norm)
                self.optimizer.step()
                with torch.no_grad():
                    entropy = masked_mean(entropy_from_logits(logits), mask[idx])
                sums += weight * torch.tensor([float(pg_loss.detach()), float(vf_loss.detach()), float(pg_stats["clipfrac"]),
                                               float(pg_stats["approx_kl"]), float(entropy)])
                steps += 1
        # losses are already shares of the global mean (summing ranks gives it); the diagnostics
        # are per-rank means: averaged over ranks
        sums = dist.all_reduce_sum(sums) / max(1, steps)
        sums[2:] /= dist.world_size
        return {k: float(v) for k, v in zip(keys, sums, strict=True)}

    def sync(self) -> dict[str, float]:
        """The new weights into the rollout engine (rank 0; the others have none)."""
        if self.engine is None:
            return {"save_s": 0.0, "reload_s": 0.0}
        assert self.sync_dir is not None
        return sync_weights(self.policy, self.engine, self.sync_dir)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def run_ppo(config: PPOConfig, trainer: PPOTrainer, prompts: Sequence[Messages], *,
            on_iteration: Callable[[IterationStats], None] | None = None,
            should_stop: Callable[[], bool] | None = None, progress: bool = False) -> list[IterationStats]:
    """`config.iterations` iterations, each on `prompts_per_iteration` prompts drawn from `prompts`
    (shuffled, cycling; batch_size answers in all). Stops early, between iterations, when
    `should_stop()` says so."""
    if not prompts:
        raise ValueError("prompts: PPO needs at least one prompt")
    order: list[int] = []
    history: list[IterationStats] = []
    with _progress(progress and trainer.dist.is_main) as bar:
        task = bar.add_task("PPO", total=config.iterations, reward=float("nan"), kl=float("nan"))
        for _ in range(config.iterations):
            if trainer.dist.any(should_stop is not None and should_stop()):  # SIGTERM on any rank stops all
                break
            picked: list[Messages] = []
            while len(picked) < config.prompts_per_iteration:
                if not order:
                    order = list(range(len(prompts)))
                    trainer.rng.shuffle(order)
                picked.append(prompts[order.pop()])
            stats = trainer.step(picked)
            history.append(stats)
            log.info("ppo iteration %d: reward %.3f kl %.3f beta %.4f clipfrac %.3f %.1f samples/s",
                     stats.iteration, stats.reward_mean, stats.kl, stats.kl_coef, stats.clipfrac,
                     stats.samples_per_s)
            if on_iteration is not None:
                on_iteration(stats)
            bar.update(task, advance=1, reward=stats.reward_mean, kl=stats.kl)
    return history


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("reward {task.fields[reward]:+.3f} KL {task.fields[kl]:.3f}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled)


def kl_to_reference(policy: PolicyWithValue, reference: PolicyWithValue, tokenizer: Any,
                    prompt_ids: Sequence[list[int]], answers: Sequence[list[int]], temperature: float = 1.0,
                    batch_size: int = 16) -> list[float]:
    """Σ_t k1 per answer (nats) of answers sampled from `policy`: an estimate of KL(π || π_ref)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[float] = []
    policy.eval()
    for i in range(0, len(answers), batch_size):
        batch = collate(prompt_ids[i:i + batch_size], answers[i:i + batch_size], pad)
        lp, _ = sequence_logprobs(policy, batch, temperature, with_values=False)
        ref, _ = sequence_logprobs(reference, batch, temperature, with_values=False)
        out += (kl_per_token(lp, ref) * batch.response_mask).sum(-1).tolist()
    return out


def json_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it (the round log survives a crash up to its last line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


__all__ = [
    "AdaptiveKLController", "PPOConfig", "PPOTrainer", "PolicyWithValue", "RewardScorer", "RolloutEngine",
    "entropy_from_logits", "gae", "kl_per_token", "logprobs_from_logits", "masked_mean", "masked_whiten",
    "policy_loss", "run_ppo", "shaped_rewards", "value_loss",
]

