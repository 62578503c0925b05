"""Every dtype follows the hardware it runs on (kaizen/core/hardware.py): `auto` is bf16 only where the
device computes bf16 natively, and the resolved value is what the trainer and the engines use."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import pytest
import torch

from kaizen.core.engine_config import engine_args, serving_dtype
from kaizen.core.hardware import choose_dtype, cpu_flags, cpu_model, describe_machine, resolve_dtype
from kaizen.core.settings import Settings
from kaizen.core.vllm_plugin import ENV as VLLM_SPIN_ENV
from trainer.ppo_config import PPOConfig
from trainer.reward_model import RewardConfig

AMX_XEON = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
ZEN4_EPYC = frozenset({"avx2", "avx512f", "avx512_bf16"})
AVX2_EPYC = frozenset({"avx2", "fma", "sse4_2"})


def test_auto_is_bf16_only_where_the_cpu_or_gpu_computes_it() -> None:
    assert resolve_dtype("auto", flags=AMX_XEON, gpu_bf16=None).dtype == "bfloat16"
    assert resolve_dtype("auto", flags=ZEN4_EPYC, gpu_bf16=None).dtype == "bfloat16"
    avx2 = resolve_dtype("auto", flags=AVX2_EPYC, gpu_bf16=None)
    assert avx2.dtype == "float32" and "emulated" in avx2.reason
    # a GPU decides for itself, whatever the host CPU has
    assert resolve_dtype("auto", flags=AVX2_EPYC, gpu_bf16=True).dtype == "bfloat16"
    assert resolve_dtype("auto", flags=AMX_XEON, gpu_bf16=False).dtype == "float32"
    # the serving engine: float32 on AMX (vLLM's CPU backend garbled bf16 there) and without native bf16,
    # bf16 on avx512_bf16 without AMX (answers checked with the default model in test_models) and GPUs
    amx = resolve_dtype("auto", flags=AMX_XEON, gpu_bf16=None, serving=True)
    assert amx.dtype == "float32" and "AMX" in amx.reason
    assert resolve_dtype("auto", flags=ZEN4_EPYC, gpu_bf16=None, serving=True).dtype == "bfloat16"
    assert resolve_dtype("auto", flags=AVX2_EPYC, gpu_bf16=None, serving=True).dtype == "float32"
    assert resolve_dtype("auto", flags=AVX2_EPYC, gpu_bf16=True, serving=True).dtype == "bfloat16"
    # an explicit value is never second-guessed
    explicit = resolve_dtype("bfloat16", flags=AVX2_EPYC, gpu_bf16=None)
    assert explicit.dtype == "bfloat16" and explicit.reason == "set explicitly"


def test_reserved_cpus_and_spincount_reach_vllm_as_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    from kaizen.core.engine_config import configure_vllm_env, reserved_cpus, usable_cpus

    # everything configure_vllm_env writes is put back after the test (set, then removed: recorded)
    for name in ("VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_KVCACHE_SPACE", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK",
                 "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", VLLM_SPIN_ENV, "GOMP_SPINCOUNT", "VLLM_RPC_BASE_PATH"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    configure_vllm_env(Settings(engine_reserved_cpus=None, engine_omp_spincount=None))
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ  # vLLM's own default
    assert "GOMP_SPINCOUNT" not in os.environ  # libgomp's own default
    assert float(os.environ[VLLM_SPIN_ENV]) == Settings().engine_spin_sleep_us  # for kaizen/core/vllm_plugin.py
    configure_vllm_env(Settings(engine_reserved_cpus=0, engine_spin_sleep_us=0, engine_omp_spincount=7))
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert os.environ["GOMP_SPINCOUNT"] == "7"
    assert float(os.environ[VLLM_SPIN_ENV]) == 0
    # auto: no reserved core on a machine this small or smaller, vLLM's default on a larger one
    cpus = usable_cpus()
    assert cpus >= 1
    assert reserved_cpus(Settings(engine_reserve_none_up_to_cpus=cpus)) == 0
    assert reserved_cpus(Settings(engine_reserve_none_up_to_cpus=cpus - 1)) is None
    assert reserved_cpus(Settings(engine_reserved_cpus=3)) == 3
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU")
    configure_vllm_env(Settings(engine_reserve_none_up_to_cpus=cpus - 1))
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ
    configure_vllm_env(Settings(engine_reserve_none_up_to_cpus=cpus))
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"


def test_vllm_sockets_live_in_a_folder_of_the_process_that_goes_with_it(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM binds a socket file per engine link in VLLM_RPC_BASE_PATH (the temp folder by default) and a
    killed process leaves its files: thousands piled up in /tmp. Each Kaizen process now gets a folder of
    its own, removed at its exit; a killed process's folder is removed by the next one to start."""
    import signal
    import subprocess
    import sys

    from kaizen.core.engine_config import RPC_PREFIX, rpc_dir

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # tempfile reads it once: reset its cache
    monkeypatch.setattr("tempfile.tempdir", None)
    code = ("import sys, time; from kaizen.core.engine_config import rpc_dir; print(rpc_dir(None), flush=True); "
            "time.sleep(float(sys.argv[1]))")
    # a process that exits: its folder goes with it
    done = subprocess.run([sys.executable, "-c", code, "0"], capture_output=True, text=True, check=True)
    left = Path(done.stdout.strip())
    assert left.parent == tmp_path and left.name.startswith(RPC_PREFIX) and not left.exists()
    # a process killed by SIGKILL leaves its folder (and the sockets in it) ...
    child = subprocess.Popen([sys.executable, "-c", code, "60"], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    killed = Path(child.stdout.readline().strip())
    (killed / "a-socket-of-its-engine").touch()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert killed.is_dir()
    # ... until the next process starts; a live process's folder stays (here: this one's)
    mine = Path(rpc_dir(None))
    assert not killed.exists() and mine.is_dir() and mine.name.startswith(f"{RPC_PREFIX}{os.getpid()}-")
    assert rpc_dir(str(mine)) == str(mine)  # each engine start asks again: the same folder
    assert Path(rpc_dir(None)).is_dir() and mine.is_dir()
    # a folder the operator chose is kept as it is
    assert rpc_dir("/var/run/kaizen-sockets") == "/var/run/kaizen-sockets"


def test_the_vllm_plugin_replaces_the_spin_only_when_kaizen_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM calls `register` in each process it starts (entry point `vllm.general_plugins`). It
    replaces vLLM's sched_yield spin with a sleep of `engine_spin_sleep_us` where Kaizen configured
    vLLM, and leaves vLLM alone otherwise (a plain `vllm serve`) or at 0. What the sleep does to a
    running engine: tests/test_engine_health.py::test_probes_are_answered_while_a_long_answer_is_written."""
    from importlib.metadata import entry_points

    from vllm.distributed import utils
    from vllm.distributed.device_communicators import shm_broadcast

    from kaizen.core import vllm_plugin

    assert "kaizen.core.vllm_plugin:register" in {e.value for e in entry_points(group="vllm.general_plugins")}
    original = utils.sched_yield
    monkeypatch.setattr(utils, "sched_yield", original)  # put back after the test
    monkeypatch.setattr(shm_broadcast, "sched_yield", original)
    for value in (None, "0", "0.0"):
        if value is None:
            monkeypatch.delenv(VLLM_SPIN_ENV, raising=False)
        else:
            monkeypatch.setenv(VLLM_SPIN_ENV, value)
        vllm_plugin.register()
        assert utils.sched_yield is original and shm_broadcast.sched_yield is original, value
    monkeypatch.setenv(VLLM_SPIN_ENV, "2000")
    vllm_plugin.register()
    assert utils.sched_yield is not original and getattr(shm_broadcast, "sched_yield") is utils.sched_yield
    t0 = time.perf_counter()
    for _ in range(10):
        utils.sched_yield()
    assert time.perf_counter() - t0 >= 10 * 0.002  # it sleeps 2,000 us each time


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16 sse4_2\n\n"
                    "processor\t: 1\nflags\t\t: fpu avx2 avx512_bf16 sse4_2\n")
    assert cpu_flags(info) == frozenset({"fpu", "avx2", "avx512_bf16", "sse4_2"})
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert cpu_model(info) == "AMD EPYC" and cpu_model(tmp_path / "missing")  # else platform's name
    machine = describe_machine(info)  # what a benchmark report records of the machine
    assert machine["cpu"] == "AMD EPYC" and machine["isa"] == ["avx512_bf16", "avx2"]
    assert machine["torch"] == torch.__version__ and machine["cores"] == len(os.sched_getaffinity(0))


def test_the_machines_speed_is_measured_and_shown_with_its_name() -> None:
    """kaizen bench loop records float32 matmul GFLOPS beside the CPU's name (machines of one name
    differ); the probe leaves torch's thread count as it found it."""
    from kaizen.core.hardware import matmul_gflops
    from simulation.loop import machine_summary

    threads = torch.get_num_threads()
    one = matmul_gflops(threads=1, size=256, seconds=0.05)
    assert one is not None and 0.1 < one < 1e6, one  # a real figure: not zero, not a division by ~0
    assert torch.get_num_threads() == threads
    line = machine_summary({"cpu": "AMD EPYC", "isa": ["avx2"], "cores": 2, "matmul_gflops": 64.3,
                            "dtypes": {"engine_dtype": "float32"}, "torch": "2.13.0", "vllm": "0.1"})
    assert line.startswith("AMD EPYC (avx2), 2 cores, matmul 64 GFLOPS, float32 engine"), line
    assert "GFLOPS" not in machine_summary({"cpu": "AMD EPYC", "isa": ["avx2"], "cores": 2})
    # every torch bench's report carries it too (bench/_common.py provenance; torch is loaded here)
    from bench._common import provenance

    assert re.search(r"\d+ cores, matmul [1-9]\d* GFLOPS, python ", provenance()), provenance()


def test_the_resolved_dtype_is_what_the_trainer_and_the_engine_use(caplog: pytest.LogCaptureFixture,
                                                                   tiny_model: Path) -> None:
    settings = Settings()
    assert settings.reward_dtype == "auto" and settings.engine_dtype == "auto"  # the defaults
    here = choose_dtype("auto")
    with caplog.at_level(logging.INFO):
        config = RewardConfig.from_settings(settings)
    assert config.dtype == here.dtype in ("bfloat16", "float32")
    assert f"reward model dtype {here}" in caplog.text  # logged with its reason
    assert RewardConfig.from_settings(settings, dtype="float32").dtype == "float32"
    assert settings.ppo_dtype == "auto"
    with caplog.at_level(logging.INFO):
        ppo = PPOConfig.from_settings(settings).resolved_dtype()
    assert ppo == getattr(torch, here.dtype) and f"PPO autocast dtype {here}" in caplog.text
    # the chat engine is built with the resolved value, never vLLM's own "auto" (the model's bf16)
    assert engine_args(settings, tiny_model).dtype == serving_dtype(settings) == \
        choose_dtype("auto", serving=True).dtype
    shown = settings.masked()
    assert shown["reward_dtype (effective)"].startswith(here.dtype)
    assert shown["ppo_dtype (effective)"].startswith(here.dtype)
    assert shown["engine_dtype (effective)"].startswith(serving_dtype(settings))
