"""The PPO, RLOO and DPO math: pure tensor functions, each beside its equation.

    from trainer.ppo_math import gae, policy_loss   # used by trainer/ppo.py; tests/test_ppo.py checks each

Tensor helpers (masked mean, variance, whitening, log-probs, entropy), the k1/k3 KL estimates,
KL-shaped per-token rewards, GAE and RLOO advantages, the clipped policy and value losses, the DPO
loss, explained variance, the adaptive KL controller and the length-neutral score. No model, no engine,
no state beyond the controller's β and the length fit's sums: inputs are tensors, shapes in each
docstring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    # PPO eq. 7: -min(r A, clip(r) A)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask, count=token_count)
    with torch.no_grad():
        clipfrac = masked_mean((pg_losses2 > pg_losses).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)  # Schulman 2020, k3
    return pg_loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, pair_count: int | None = None, *, nll_coef: float = 0.0,
             chosen_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct Preference Optimization (Rafailov et al. 2023, eq. 7), as a loss to minimise.

    All inputs (P,): the summed log-prob of each pair's chosen and rejected answer under the policy
    and the frozen reference. The implicit reward of an answer is β (log π - log π_ref); the loss is
    -log σ(r_chosen - r_rejected), averaged over pairs (over `pair_count`, the whole minibatch's
    pairs, when these are one rank's share of it). Stats: accuracy (share of pairs whose implicit
    rewards already order them as labelled), margin (mean r_chosen - r_rejected) and, given
    `chosen_tokens`, nll (the chosen answers' mean NLL per token).

    With `nll_coef` α > 0 (RPO, Pang et al. 2024) each pair adds α times its chosen answer's
    negative log-likelihood per token, -log π(chosen) / `chosen_tokens` (P,), averaged as the
    DPO term is.
    """
    pairs = pair_count if pair_count is not None else max(1, len(chosen))
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))  # (P,)
    nll = None if chosen_tokens is None else -chosen / chosen_tokens.clamp(min=1)  # (P,)
    loss = -F.logsigmoid(margin).sum() / pairs
    if nll_coef:
        if nll is None:
            raise ValueError("dpo_loss: the NLL term needs chosen_tokens")
        loss = loss + nll_coef * nll.sum() / pairs
    with torch.no_grad():
        stats = {"accuracy": (margin > 0).float().mean(), "margin": margin.mean()}
        if nll is not None:
            stats["nll"] = nll.mean()
    return loss, stats


def raft_loss(logprobs: torch.Tensor, tokens: torch.Tensor,
              count: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RAFT's fine-tuning loss (Dong et al. 2023, "RAFT: Reward rAnked FineTuning"): each chosen
    answer's negative log-likelihood per token, -log π(y) / |y|, averaged over answers (over `count`,
    the whole minibatch's, when these are one rank's share of it).

    logprobs (m,): the policy's summed log-prob of each answer; tokens (m,): its length. Stats: nll,
    the mean per-token NLL of these answers.
    """
    nll = -logprobs / tokens.clamp(min=1)  # (m,)
    loss = nll.sum() / (count if count is not None else max(1, len(nll)))
    return loss, {"nll": nll.detach().mean()}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float,
               token_count: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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


def kl_spent(kls: Sequence[float], stop_kl: float | None, window: int) -> bool:
    """Whether a run whose iterations read `kls` (nats per answer, oldest first) has spent its KL
    budget: the mean of the last `window` passes `stop_kl` (setting ppo_stop_kl; None: never)."""
    if stop_kl is None or len(kls) < window:
        return False
    return sum(kls[-window:]) / window > stop_kl


# -- length-neutral scores ----------------------------------------------------------------------


@dataclass
class LengthFit:
    """Least squares of reward-model score on answer length (tokens), over the ended answers a run
    has scored so far, and the score with `share` of that slope taken out.

    A reward model that pays for length as such lets PPO win by writing longer (or shorter)
    answers rather than better ones (Singhal et al. 2023, "A Long Way to Go": much of RLHF's
    gain was length). Taking out the linear effect of length, as the length-controlled win rate
    does for the evaluation (Dubois et al. 2024), leaves the reward for what differs at equal
    length. The fit reads ended answers only: the step between an answer cut off at the limit
    and one that ends stays in the score (and in the missing-EOS penalty). Measured in the loop
    (bench/README.md, "The loop"): the votes' reward model pays for length among ended answers
    (slope > 0), so on its own votes this setting shortens answers further; it is off by default."""

    n: float = 0.0
    sum_x: float = 0.0
    sum_y: float = 0.0
    sum_xx: float = 0.0
    sum_xy: float = 0.0
    min_answers: int = 8
    """Fewer ended answers than this: slope 0 (a handful of points fits noise)."""

    def add(self, lengths: torch.Tensor, scores: torch.Tensor, ended: torch.Tensor) -> None:
        """lengths, scores, ended (B,): the ended rows join the fit."""
        keep = ended > 0
        x, y = lengths[keep].double(), scores[keep].double()
        self.n += len(x)
        self.sum_x += float(x.sum())
        self.sum_y += float(y.sum())
        self.sum_xx += float((x * x).sum())
        self.sum_xy += float((x * y).sum())

    @property
    def mean_length(self) -> float:
        return self.sum_x / self.n if self.n else 0.0

    @property
    def slope(self) -> float:
        """d score / d token; 0 until min_answers ended answers with some spread in length."""
        if self.n < self.min_answers:
            return 0.0
        var = self.sum_xx / self.n - self.mean_length ** 2
        cov = self.sum_xy / self.n - self.mean_length * self.sum_y / self.n
        return cov / var if var > 1e-9 else 0.0

    def neutral(self, scores: torch.Tensor, lengths: torch.Tensor, share: float) -> torch.Tensor:
        """scores - share * slope * (length - mean length), (B,): at the fit's mean length unchanged."""
        return scores - share * self.slope * (lengths.to(scores.dtype) - self.mean_length)
