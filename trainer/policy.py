"""The models a PPO step runs: the policy (a causal LM with a value head) and the reward scorer.

    from trainer.policy import load_policy, save_policy   # trainer/ppo.py and the round's gate use them

PolicyWithValue (shared trunk: one forward gives logits and values), which lower layers are
frozen and shared with the reference, loading and saving Hugging Face folders; RewardScorer (the
reward model as PPO reads it); prompt encoding, right-padded rollout batches and their
log-probs, and the KL of sampled answers to a reference.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kaizen.core.atomic_files import atomic_folder
from trainer.ppo_math import kl_per_token, logprobs_from_logits
from trainer.reward_data import encode_conversation
from trainer.reward_model import RewardConfig, load_reward_model, read_manifest, score_texts
from trainer.trunk import decoder_slice

Messages = list[dict[str, str]]


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
        logits = self.lm.lm_head(h).float() / temperature  # (B, R, V): float32 under autocast too
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
        """The decoder with only `layers` and `norm`, sharing every weight (trainer/trunk.py)."""
        return decoder_slice(self.lm.model, layers, norm)


def shared_trunk_depth(policy: PolicyWithValue, reference: PolicyWithValue, frozen: bool = True) -> int:
    """How many lower decoder layers (with the embeddings) are frozen in `policy` and equal to
    `reference`'s: their outputs are computed once per batch and serve both models and every
    minibatch pass (0: none can be shared). `frozen=False`: equal is enough (a reading that trains
    nothing, `kl_to_reference`)."""
    mine, ref = policy.lm.model, reference.lm.model

    def frozen_and_equal(a: nn.Module, b: nn.Module) -> bool:
        pa, pb = list(a.parameters()), list(b.parameters())
        return (len(pa) == len(pb) and not (frozen and any(p.requires_grad for p in pa))
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
        trained = [*layers[-train_layers:], policy.lm.model.norm, policy.v_head, *([] if tied else [head])]
        for module in trained:
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


# -- reward scorer -----------------------------------------------------------------------------


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
    dtype: str = "float32"
    """Autocast dtype of the forward passes. `load` takes the reward model's own (`reward_dtype`,
    resolved for this hardware): the dtype its `reward_norm` was measured in, and on a CPU with
    native bf16 half the time of float32 (scoring was half of a shipped PPO iteration)."""

    @classmethod
    def load(cls, path: Path, max_length: int = 384, dtype: str = "float32") -> RewardScorer:
        """`dtype`: auto | bfloat16 | float32 (auto follows the hardware, kaizen/core/hardware.py)."""
        model, tokenizer = load_reward_model(path)
        norm = read_manifest(path).get("reward_norm", {}) if (path / "manifest.json").is_file() else {}
        return cls(model, tokenizer, max_length, float(norm.get("mean", 0.0)),
                   float(norm.get("std", 1.0)) or 1.0, path.name, RewardConfig(dtype=dtype).dtype)

    def __call__(self, prompts: Sequence[Messages], answers: Sequence[str]) -> torch.Tensor:
        """Normalised scores (N,) of answers[i] to prompts[i]."""
        seqs = [encode_conversation(self.tokenizer, p, a, self.max_length)[0]
                for p, a in zip(prompts, answers, strict=True)]
        raw: torch.Tensor = score_texts(self.model, self.tokenizer, seqs,
                                        RewardConfig(max_length=self.max_length, dtype=self.dtype))  # (N,)
        return (raw - self.mean) / self.std


# -- prompts and batches ------------------------------------------------------------------------


def encode_prompt(tokenizer: Any, messages: Messages, max_length: int) -> list[int]:
    """Chat-template tokens ending with the assistant's turn prompt; the oldest cut past max_length."""
    ids: Any = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    out: list[int] = [int(i) for i in ids]
    return out[-max_length:]


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


def collate_answers(tokenizer: Any, prompt_ids: Sequence[list[int]], samples: Sequence[Any]) -> Batch:
    """A rollout's answers (`Sample`s: .prompt indexes prompt_ids, .token_ids) after their prompts."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return collate([prompt_ids[s.prompt] for s in samples], [s.token_ids for s in samples], pad_id)


@torch.no_grad()
def sequence_logprobs(model: PolicyWithValue, batch: Batch, temperature: float, with_values: bool = True,
                      trunk: torch.Tensor | None = None,
                      depth: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the answer tokens (B, R) and values (B, R) without gradients."""
    batch = batch.to(model.v_head.weight.device)
    logits, values = model(batch.input_ids, batch.attention_mask, batch.start, temperature, with_values,
                           trunk=trunk, depth=depth)
    labels = batch.input_ids[:, batch.start:]  # (B, R)
    return logprobs_from_logits(logits, labels), values


def kl_to_reference(policy: PolicyWithValue, reference: PolicyWithValue, tokenizer: Any,
                    prompt_ids: Sequence[list[int]], answers: Sequence[list[int]], temperature: float,
                    batch_size: int = 16) -> list[float]:
    """Σ_t k1 per answer (nats) of answers sampled from `policy` at `temperature`: an estimate of
    KL(π || π_ref) between the two read at that temperature (no default: read at another one, the
    mean is no KL and can go below zero).
    Batched in order of length (a batch pads to its longest answer and prompt), returned in the
    callers' order. The lower layers the two models share (a round trains only the top ones) run
    once per batch for both (`shared_trunk_depth`)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(answers)), key=lambda j: (len(answers[j]), len(prompt_ids[j])))
    out = [0.0] * len(answers)
    policy.eval()
    depth = shared_trunk_depth(policy, reference, frozen=False)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        batch = collate([prompt_ids[j] for j in idx], [answers[j] for j in idx], pad)
        batch = batch.to(policy.v_head.weight.device)
        trunk = policy.trunk(batch.input_ids, batch.attention_mask, depth) if depth else None
        lp, _ = sequence_logprobs(policy, batch, temperature, with_values=False, trunk=trunk, depth=depth)
        ref, _ = sequence_logprobs(reference, batch, temperature, with_values=False, trunk=trunk, depth=depth)
        for j, kl in zip(idx, (kl_per_token(lp, ref) * batch.response_mask).sum(-1).tolist(), strict=True):
            out[j] = kl
    return out
