"""The frozen lower layers of a decoder, run once: slicing a model, and the reward model's cache.

    part = decoder_slice(model.model, model.model.layers[:depth], nn.Identity())  # the trunk
    cache = TrunkCache(model, depth, limit_bytes)     # trainer/reward_train.py: each sequence once

When only the top layers of a model train (`ppo_train_layers`, `reward_train_layers`), the
embeddings and the layers below never change during a run, so their output for a sequence is
the same at every pass. PPO computes it once per batch and shares it between policy, reference
and every minibatch (trainer/ppo.py). Reward training reads each pair `reward_epochs` times:
`TrunkCache` keeps each sequence's trunk output from its first pass and the later passes run the
trained layers only. Measured in bench/README.md ("Reward model: the frozen trunk run once").
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def decoder_slice(decoder: Any, layers: Sequence[nn.Module], norm: nn.Module) -> Any:
    """`decoder` (a Hugging Face `*Model`: embeddings, layers, norm) with only `layers` and `norm`,
    sharing every weight. A shallow copy with its own module table: the model class's own forward
    (embeddings or `inputs_embeds`, causal mask, rotary positions) runs over a slice of the layers."""
    part = copy.copy(decoder)
    part._modules = {**decoder._modules, "layers": nn.ModuleList(layers), "norm": norm}
    return part


def frozen_depth(n_layers: int, train_layers: int) -> int:
    """Lower layers left frozen when the top `train_layers` of `n_layers` train (0 trains all)."""
    return n_layers - train_layers if 0 < train_layers < n_layers else 0


class TrunkCache:
    """Each sequence's hidden states after the embeddings and the lowest `depth` layers of a
    reward model (`AutoModelForSequenceClassification`), computed without gradients the first
    time the sequence is seen and kept until `limit_bytes` are held (then computed every time).

    Keys are the caller's (e.g. (pair index, "chosen")). `batch` returns the states padded the way
    `pad_sequences` pads the ids (right, zeros on the padding, which the attention mask hides)."""

    def __init__(self, model: Any, depth: int, limit_bytes: int) -> None:
        self.depth, self.limit_bytes = depth, limit_bytes
        self.bottom = decoder_slice(model.base_model, model.base_model.layers[:depth], nn.Identity())
        self.states: dict[Any, torch.Tensor] = {}
        self.bytes = 0
        self.hits = self.misses = 0

    @torch.no_grad()
    def batch(self, keys: Sequence[Any], input_ids: torch.Tensor,
              attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) trunk states of the right-padded rows `input_ids` (B, T), row i being `keys[i]`."""
        missing = [i for i, k in enumerate(keys) if k not in self.states]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        lengths = attention_mask.sum(-1).tolist()
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            idx = torch.tensor(missing, device=input_ids.device)
            ids, mask = input_ids[idx], attention_mask[idx]
            width = int(mask.sum(-1).max())
            ids, mask = ids[:, :width], mask[:, :width]
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.bottom(input_ids=ids, attention_mask=mask,
                              position_ids=position_ids).last_hidden_state  # (m, width, H)
            for row, i in enumerate(missing):
                fresh[i] = out[row, : int(lengths[i])]
                if self.bytes + fresh[i].nbytes <= self.limit_bytes:
                    self.states[keys[i]] = fresh[i].clone()
                    self.bytes += fresh[i].nbytes
        B, T = input_ids.shape
        first = fresh[missing[0]] if missing else self.states[keys[0]]
        states = torch.zeros(B, T, first.shape[-1], dtype=first.dtype, device=input_ids.device)
        for i, k in enumerate(keys):
            s = fresh[i] if i in fresh else self.states[k]
            states[i, : s.shape[0]] = s
        return states


__all__ = ["TrunkCache", "decoder_slice", "frozen_depth"]
