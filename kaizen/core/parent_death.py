"""Children that die with their parent: a `preexec_fn` for `subprocess.Popen`.

A process started by `kaizen up`, `kaizen bench loop` or the embedded broker's starter asks the
kernel (prctl PR_SET_PDEATHSIG) for SIGTERM when the thread that started it ends, so a parent
killed outright (SIGKILL, the out-of-memory killer) leaves no chat API, broker or engine running
on its ports. SIGTERM, not SIGKILL: the child still stops its own children (the chat API its
vLLM engine) on the way out. Linux only; elsewhere the function does nothing.

The kernel signals when the *thread* that forked the child exits: start such children from a
thread that lives as long as they should (the main thread, as every caller here does).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h

# looked up once here, not in the child: after fork only async-signal-safe work is safe
_PRCTL = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl \
    if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    """Run in the child between fork and exec: SIGTERM it when its parent thread ends."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
