"""The reward model itself: config, architecture (the policy with a scalar head), loss, scoring, load/save.

The model is the policy's own architecture with the LM head swapped for one scalar
(`AutoModelForSequenceClassification`, num_labels=1, initialised from the policy). It reads
the chat-templated conversation plus the answer and is scored at the last real token.

On CPU (2 cores, shared with the chat engine; bench/README.md has the numbers) what made
training fastest: bf16 autocast over float32 weights (AMX), one torch thread, the top 8 of
30 layers trained, length-bucketed batches with dynamic padding, max_length 384.

Order of the file: config, model, loss, scoring, folders (save, manifest). Training is
trainer/reward_train.py, evaluation trainer/reward_eval.py, versions and the gated refresh
trainer/reward.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kaizen.core.atomic_files import atomic_folder
from kaizen.core.settings import Settings
from trainer.reward_data import pad_sequences
from trainer.trunk import decoder_slice

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
"""The file in every reward-model folder that says what it was trained on and how well it did."""


#: RewardConfig fields whose value is the setting `reward_<name>`
#: (kaizen/core/settings_training.py documents each).
FROM_SETTINGS = ("max_length", "batch_size", "grad_accum", "lr", "epochs", "margin", "tie_weight",
                 "train_layers", "dtype", "threads", "eval_fraction", "eval_every", "patience", "seed",
                 "max_minutes", "budget_decay", "trunk_cache_mb", "ended_term", "relevance_pairs")


def _setting(name: str) -> Any:
    """The default of setting `reward_<name>`: one source, so a bare RewardConfig() trains as the
    trainer does with no KAIZEN_REWARD_* set (it had lr 2e-5 and 1 epoch against the settings' 5e-5
    and 3). The environment's values come in through `RewardConfig.from_settings`."""
    return Settings.model_fields[f"reward_{name}"].default


@dataclass
class RewardConfig:
    """One reward-model training run. Build it with `from_settings` (the settings, then the CLI's
    overrides); the field defaults are the settings' defaults, for tests and tools."""

    max_length: int = _setting("max_length")
    """Tokens per conversation + answer, cut from the left (reward_data.encode_conversation)."""
    batch_size: int = _setting("batch_size")
    """Pairs per micro-batch: 2 x batch_size sequences per forward."""
    grad_accum: int = _setting("grad_accum")
    """Micro-batches per optimizer step."""
    lr: float = _setting("lr")
    """Peak AdamW learning rate (after warmup)."""
    epochs: int = _setting("epochs")
    """Passes over the training pairs."""
    margin: float = _setting("margin")
    """Bradley-Terry margin m in -log sigma(r+ - r- - m); 0 is the plain loss."""
    tie_weight: float = _setting("tie_weight")
    """Weight of a tie (a pair labelled 0.5) in the loss; 0 trains on decided votes only."""
    train_layers: int = _setting("train_layers")
    """Top decoder layers trained, plus final norm and score head; 0 trains everything."""
    dtype: str = _setting("dtype")
    """Autocast dtype of forward passes; parameters and AdamW state stay float32. "auto" is
    resolved for this machine when the config is made (kaizen/core/hardware.py)."""
    threads: int | None = _setting("threads")
    """torch threads; None: one per core."""
    eval_fraction: float = _setting("eval_fraction")
    """Share of training pairs held out for early stopping."""
    eval_every: int = _setting("eval_every")
    """Optimizer steps between held-out evaluations."""
    patience: int = _setting("patience")
    """Evaluations without a better held-out accuracy before training stops."""
    seed: int = _setting("seed")
    max_minutes: float | None = _setting("max_minutes")
    """Wall-clock budget; None: none."""
    budget_decay: bool = _setting("budget_decay")
    """With max_minutes: the learning rate's decay ends with the budget (reward_train.LrPlan)."""
    trunk_cache_mb: int = _setting("trunk_cache_mb")
    """Memory for the frozen lower layers' output of the training pairs, kept from their first pass
    (trainer/trunk.py); 0: the whole model runs at every pass."""
    ended_term: bool = _setting("ended_term")
    """Fit the vote's ended-vs-cut-off step as its own γ beside the model (reward_train.EndedTerm)."""
    relevance_pairs: float = _setting("relevance_pairs")
    """Share of decided training pairs that also train as a relevance pair (reward_data.relevance_pairs)."""
    # -- not settings: fixed parts of the recipe --
    ended_lr: float = 0.01
    """Peak AdamW learning rate of γ: one number started at its log-odds, which the model's lr
    would hardly move in a refresh of ~100 steps."""
    warmup_fraction: float = 0.05
    """Share of optimizer steps with a linearly rising lr; then linear decay to 0."""
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.dtype == "auto":
            from kaizen.core.hardware import choose_dtype

            choice = choose_dtype("auto")
            log.info("reward model dtype %s", choice)
            self.dtype = choice.dtype

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> RewardConfig:
        """The settings' `reward_*` values; an override that is not None replaces one (the CLI's options)."""
        values = {name: getattr(settings, f"reward_{name}") for name in FROM_SETTINGS}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def apply_threads(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)


# -- model ------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    # Loading from the policy always reports `score.weight` as newly initialised:
    # that is the point, so the report and the per-tensor progress bar are noise here.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def load_reward_model(path: Path, seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer) from a policy folder (new score head, seeded) or a reward-model folder.

    Parameters are float32: AdamW updates of ~1e-5 vanish in bf16 weights; speed comes
    from bf16 autocast instead (RewardConfig.dtype).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)  # the score head's initialisation
    with _quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
    return model, tokenizer


def freeze_lower_layers(model: Any, train_layers: int) -> int:
    """Train only the top `train_layers` decoder layers, final norm and score head (0: all).

    Frozen layers below build no autograd graph, so a step costs one forward plus the
    backward of the top layers only. Returns the number of trainable parameters.
    """
    layers = model.base_model.layers
    for p in model.parameters():
        p.requires_grad_(train_layers == 0 or train_layers >= len(layers))
    if 0 < train_layers < len(layers):
        for module in [*layers[-train_layers:], model.base_model.norm, model.score]:
            for p in module.parameters():
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def sequence_rewards(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     trunk: torch.Tensor | None = None, depth: int = 0) -> torch.Tensor:
    """Scalar reward of each sequence, read at its last real token.

    input_ids, attention_mask: (B, T), padded on either side. Returns (B,).
    trunk: (B, T, H) the states after the lowest `depth` layers (trainer/trunk.py): only the
    layers above run.
    Position ids count real tokens only, so a left-padded row scores as it would alone.
    We read the score ourselves instead of using the HF head's pooling: that pooling looks
    for `pad_token_id`, which in SmolLM2 is <|im_end|>, a real token of every turn.
    """
    device = model.score.weight.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    B, T = input_ids.shape
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    if trunk is None:
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids).last_hidden_state  # (B, T, H)
    else:
        top = decoder_slice(model.base_model, model.base_model.layers[depth:], model.base_model.norm)
        hidden = top(inputs_embeds=trunk.to(device), attention_mask=attention_mask,
                     position_ids=position_ids).last_hidden_state  # (B, T, H)
    last = (torch.arange(T, device=input_ids.device) * attention_mask).argmax(-1)  # (B,) last 1 per row
    h_last = hidden[torch.arange(B, device=input_ids.device), last]  # (B, H)
    rewards: torch.Tensor = model.score(h_last).squeeze(-1).float()  # (B, 1) -> (B,)
    return rewards


class RewardForward(nn.Module):
    """`sequence_rewards` as a module's forward, so DistributedDataParallel can wrap it (DDP
    synchronises the gradients of what runs through its wrapped module's forward)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                trunk: torch.Tensor | None = None, depth: int = 0) -> torch.Tensor:
        return sequence_rewards(self.model, input_ids, attention_mask, trunk, depth)


def autocast_to(dtype: str | torch.dtype,
                device: torch.device | None = None) -> contextlib.AbstractContextManager[Any]:
    """Autocast to `dtype` on `device` (CPU when None); none for float32. The reward model's passes
    and PPO's (PPOTrainer.compute_dtype) both enter it here."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type if device is not None else "cpu", dtype=dtype)


def autocast(config: RewardConfig,
             device: torch.device | None = None) -> contextlib.AbstractContextManager[Any]:
    """The forward passes' autocast to `config.dtype` on `device` (CPU when None); none for float32."""
    return autocast_to(config.dtype, device)


def model_device(model: Any) -> torch.device:
    """Where the model's parameters are."""
    device: torch.device = next(model.parameters()).device
    return device


# -- loss -------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: float | torch.Tensor = 0.0,
    labels: torch.Tensor | None = None, weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over pairs of -log σ(r₊ − r₋ − m). chosen_rewards, rejected_rewards: (B,); returns ().

    P(chosen ≻ rejected) = σ(r₊ − r₋): Bradley & Terry (1952), the reward-model loss of
    Ouyang et al. 2022 (InstructGPT, eq. 1); the margin m is Touvron et al. 2023 (Llama 2, eq. 2).
    logsigmoid, not log(sigmoid(.)), stays finite for large negative differences.

    labels (B,): P(chosen ≻ rejected) per pair, 1 by default; a tie's 0.5 gives the cross-entropy
    −½ log σ(d) − ½ log σ(−d), smallest at d = 0, and no margin (m is scaled by 2y − 1).
    weights (B,): each pair's share of the mean (a tie's `reward_tie_weight`), 1 by default.
    """
    d = chosen_rewards - rejected_rewards  # (B,)
    if labels is None:
        losses = -F.logsigmoid(d - margin)  # Ouyang et al. 2022, eq. 1
    else:
        shifted = d - margin * (2 * labels - 1)
        losses = -(labels * F.logsigmoid(shifted) + (1 - labels) * F.logsigmoid(-shifted))
    return (losses if weights is None else losses * weights).mean()


# -- scoring ----------------------------------------------------------------------


@torch.no_grad()
def score_texts(model: Any, tokenizer: Any, seqs: Sequence[list[int]], config: RewardConfig) -> torch.Tensor:
    """Rewards of single token sequences: (N,)."""
    model.eval()
    out = torch.empty(len(seqs))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    step = config.batch_size * 2
    for start in range(0, len(order), step):
        idx = order[start:start + step]
        ids, mask = pad_sequences([seqs[i] for i in idx], tokenizer.pad_token_id)
        with autocast(config, model_device(model)):
            out[idx] = sequence_rewards(model, ids, mask).cpu()
    return out


# -- folders ----------------------------------------------------------------------


def save_model(model: Any, tokenizer: Any, out: Path, manifest: dict[str, Any]) -> Path:
    """Write an HF folder plus manifest.json into a temp dir, then rename it to `out` at once."""
    with atomic_folder(out) as tmp:
        with _quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out.resolve()


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest.json of the reward-model folder `path`."""
    data: dict[str, Any] = json.loads((path / MANIFEST).read_text())
    return data
