"""How Kaizen configures vLLM: the engine arguments, the environment vLLM reads, and what a
started engine reports it runs with.

    engine_args(settings, model_dir)   # AsyncEngineArgs for the chat API's engines
    scheduling_args(settings, n)       # the CPU backend's no-split prefill (also the trainer's engine)
    serving_dtype(settings)            # engine_dtype with `auto` resolved for this machine
    running_config(llm)                # read back from a started engine (kaizen_engine_config_info)
    configure_vllm_env(settings)       # the environment vLLM reads, and rpc_dir: its sockets' folder

The chat API's engines (services/engine.py) and the trainer's rollout engine
(trainer/rollout_engine.py) both build on these, so a setting means the same in both.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal, cast

from kaizen.core.settings import Settings
from kaizen.core.vllm_plugin import ENV as VLLM_SPIN_ENV

log = logging.getLogger(__name__)


def vllm_env(settings: Settings) -> dict[str, str]:
    """The environment variables vLLM's processes read, from our settings (`auto` resolved)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(settings.engine_kv_cache_gib),
           # read by kaizen/core/vllm_plugin.py in each process vLLM starts
           VLLM_SPIN_ENV: str(settings.engine_spin_sleep_us)}
    reserved = reserved_cpus(settings)
    if reserved is not None:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved)
    if settings.engine_omp_spincount is not None:  # read by libgomp as each engine process starts
        env["GOMP_SPINCOUNT"] = str(settings.engine_omp_spincount)
    return env


def configure_vllm_env(settings: Settings) -> None:
    """vLLM reads a few knobs from the environment; set them from our settings."""
    env = vllm_env(settings)
    log.info("engine reserved cores %s of %d usable (engine_reserved_cpus=%s)",
             env.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "vLLM default"), usable_cpus(),
             settings.engine_reserved_cpus)
    os.environ.update(env)
    os.environ["VLLM_RPC_BASE_PATH"] = rpc_dir(os.environ.get("VLLM_RPC_BASE_PATH"))
    # No usage reporting, no hub look-ups: nothing outside this machine is reachable.
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


RPC_PREFIX = "kaizen-vllm-"


def rpc_dir(current: str | None) -> str:
    """The folder of vLLM's IPC sockets (VLLM_RPC_BASE_PATH) for this process: its own, under the temp
    folder, removed at exit. vLLM binds a socket file per engine and worker link in the temp folder
    itself and leaves them there, even when its engines shut down in order (one hour of `kaizen bench
    loop` left 28; thousands piled up in /tmp on a test machine). A folder of a process that no
    longer runs (killed: its exit handlers never ran) is removed here too. A path the operator set
    (not one of ours) is kept. `release_rpc_dir` removes it before the exit."""
    import atexit
    import shutil
    import tempfile

    from kaizen.core.pid_folders import stale_pid_folders

    if current and not Path(current).name.startswith(RPC_PREFIX):
        return current  # the operator's choice
    if current and _this_process(current) and Path(current).is_dir():
        return current  # made by this process already (each engine start calls configure_vllm_env)
    for old in stale_pid_folders(Path(tempfile.gettempdir()), RPC_PREFIX):
        shutil.rmtree(old, ignore_errors=True)
    mine = tempfile.mkdtemp(prefix=f"{RPC_PREFIX}{os.getpid()}-")
    atexit.register(shutil.rmtree, mine, ignore_errors=True)
    return mine


def release_rpc_dir() -> None:
    """Remove this process's socket folder now, once its engines have stopped. The chat API calls it
    as it shuts down: uvicorn re-raises the SIGTERM it stopped on after its orderly shutdown, and a
    process ended by a signal runs no exit handlers."""
    import shutil

    current = os.environ.get("VLLM_RPC_BASE_PATH", "")
    if _this_process(current):
        shutil.rmtree(current, ignore_errors=True)


def _this_process(folder: str) -> bool:
    return Path(folder).name.startswith(f"{RPC_PREFIX}{os.getpid()}-")


def usable_cpus() -> int:
    """Cores this process may run on (its affinity mask: a container's cpuset, taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def reserved_cpus(settings: Settings) -> int | None:
    """engine_reserved_cpus with `auto` resolved for this machine (None: vLLM's own default)."""
    if settings.engine_reserved_cpus != "auto":
        return settings.engine_reserved_cpus
    cpus = usable_cpus()
    return 0 if cpus <= settings.engine_reserve_none_up_to_cpus else None


def scheduling_args(settings: Settings, max_model_len: int) -> dict[str, Any]:
    """Scheduler options that keep one request from killing a CPU engine.

    vLLM 0.32 rewinds a seeded request's generator after a partial prefill
    (`_bookkeeping_sync`: `gen.set_offset(gen.get_offset() - 4)`); CPU generators refuse
    ("CPU Generator does not use offset"), the engine core dies and every later request fails.
    A prefill is partial when chunked prefill splits a prompt because the step's token budget
    ran out, e.g. long prompts arriving together. Any user may send `seed` and PPO seeds every
    rollout, so on the CPU backend chunked prefill is off and a step's budget holds any whole
    prompt: a prompt that does not fit this step waits for the next one instead of being split
    (tests/test_engine_seeds.py). GPU generators rewind fine: nothing changes there.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    return {"enable_chunked_prefill": False,
            "max_num_batched_tokens": max(max_model_len, settings.engine_max_num_batched_tokens)}


def running_config(llm: Any) -> dict[str, str]:
    """What a started `AsyncLLM` really runs with, read back from its `vllm_config` (vLLM may
    adjust what it was given: a dtype, the batch budget); exported as kaizen_engine_config_info."""
    import vllm.envs as envs

    config = llm.vllm_config
    model, scheduler = config.model_config, config.scheduler_config
    reserved = envs.VLLM_CPU_NUM_OF_RESERVED_CPU  # the EngineCore inherits this process's environment
    return {
        "dtype": str(model.dtype).removeprefix("torch."),
        "max_model_len": str(model.max_model_len),
        "max_num_seqs": str(scheduler.max_num_seqs),
        "max_num_batched_tokens": str(scheduler.max_num_batched_tokens),
        "chunked_prefill": str(bool(scheduler.enable_chunked_prefill)).lower(),
        "seed": str(model.seed),
        "reserved_cpus": "vllm default" if reserved is None else str(reserved),
        "omp_spincount": os.environ.get("GOMP_SPINCOUNT", "libgomp default"),
    }


VllmDtype = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]


def serving_dtype(settings: Settings) -> VllmDtype:
    """engine_dtype with `auto` resolved for this machine (kaizen/core/hardware.py), logged."""
    from kaizen.core.hardware import choose_dtype

    choice = choose_dtype(settings.engine_dtype, serving=True)
    log.info("engine dtype %s", choice)
    return cast(VllmDtype, choice.dtype)


def engine_args(settings: Settings, model_dir: Path, log_stats: bool = True) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(
        **scheduling_args(settings, settings.engine_max_model_len),
        model=str(model_dir),
        served_model_name=[settings.served_model_name],
        dtype=serving_dtype(settings),
        max_model_len=settings.engine_max_model_len,
        gpu_memory_utilization=settings.engine_memory_utilization,
        enforce_eager=settings.engine_enforce_eager,
        max_num_seqs=settings.engine_max_num_seqs,
        seed=settings.engine_seed,
        disable_log_stats=not log_stats,
    )
