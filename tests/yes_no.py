"""The tiny model taught to answer "Yes." or "No." at random: the champion of the tests that train
(tests/test_rounds.py, tests/test_loop.py). Voters there prefer "Yes.", which a reward model learns
from a round's votes and a few policy iterations can learn from it. Built once per session (the
`yes_no_model` fixture in conftest.py; ~30 s on one thread)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = ("apple river stone cloud green quick silent paper window orange music light table summer garden "
         "north copper velvet").split()


def question(rng: random.Random) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Is the {' '.join(rng.choices(WORDS, k=3))}?"}]


def sft_yes_no(src: Path, out: Path, steps: int = 40) -> Path:
    """The tiny model taught to answer "Yes." or "No." (50/50) and stop; saved in bf16 like its source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.reward_data import encode_conversation, pad_sequences

    torch.manual_seed(0)
    rng = random.Random(0)
    tok = AutoTokenizer.from_pretrained(src)
    lm = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    lm.train()
    for _ in range(steps):
        seqs, starts = [], []
        for _ in range(16):
            m = question(rng)
            seqs.append(encode_conversation(tok, m, rng.choice(["Yes.", "No."]), 128)[0])
            starts.append(len(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False)))
        ids, mask = pad_sequences(seqs, tok.pad_token_id)
        labels = ids.masked_fill(mask == 0, -100)
        for i, s in enumerate(starts):
            labels[i, :s] = -100  # learn the answer (and its <|im_end|>) only
        loss = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out
