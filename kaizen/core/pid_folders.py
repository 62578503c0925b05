"""Folders a process makes for itself, named `<prefix><pid>-<suffix>` (tempfile.mkdtemp with a
prefix that ends in "<pid>-"), and which of them belong to processes that no longer run.

    stale_pid_folders(root, prefix)    # e.g. the weight-sync folders of rounds killed by SIGKILL

A process removes its own folder as it ends; one killed (SIGKILL, the OOM killer) cannot, so the
next process to make such a folder removes the stale ones: the trainer's weight-sync folders
(trainer/rollout_engine.py) and vLLM's socket folders (kaizen/core/engine_config.py, rpc_dir).
"""

from __future__ import annotations

import os
from pathlib import Path


def stale_pid_folders(root: Path, prefix: str) -> list[Path]:
    """Folders `root/<prefix><pid>-*` whose process no longer runs. A name without a pid and a dash
    is not judged (an older naming, or not ours); another user's live process counts as alive."""
    stale = []
    for folder in root.glob(f"{prefix}*"):
        pid, dash, _ = folder.name[len(prefix):].partition("-")
        if not (dash and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            stale.append(folder)
        except PermissionError:
            pass  # alive, someone else's
    return stale
