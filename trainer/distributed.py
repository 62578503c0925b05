"""Training on one process or many: torch.distributed under torchrun, and nothing of it otherwise.

    KAIZEN_TRAIN_NPROC_PER_NODE=2 kaizen train --once     # the round runs under torchrun, 2 ranks
    torchrun --standalone --nproc-per-node 2 -m trainer.rounds run   # the same, by hand

The launch environment decides (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
without it `init` returns the one-process `Dist` and every helper below is the identity, so
the same training code runs either way. With it, the process group uses gloo on CPU and NCCL
on GPU (`train_backend`), and:

- data is sharded by rank (`shard`): every rank builds the same global batches from the same
  seed and takes its own part, so N processes see the batches one process would;
- gradients are averaged by DistributedDataParallel; a rank whose share of a batch is empty
  runs a zero-weighted step so the all-reduce still meets every rank;
- decisions (stop now, early stopping) are reduced so every rank takes the same one (`any`);
- rank 0 leads: it holds the rollout engine, writes checkpoints and publishes; the others
  follow its broadcast commands (trainer/round_crew.py).

OpenRLHF and veRL place their trainers the same way (DeepSpeed/FSDP under Ray); here the
launcher is torchrun and the wrapper DDP, which is enough while one device holds the model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist

from kaizen.core.settings import Settings

log = logging.getLogger(__name__)

#: What torchrun puts in a worker's environment; hidden from processes a rank starts itself
#: (vLLM's engine core), which must not mistake themselves for members of this group.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


@dataclass(frozen=True)
class Dist:
    """This process's place in the training job; the default is the one-process job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    """"gloo" or "nccl" when a process group is up; None for one process."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """What a manifest records about how a model was trained."""
        return {"world_size": self.world_size, "backend": self.backend or "none", "device": str(self.device)}

    # -- sharding ------------------------------------------------------------------------

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's share: items rank, rank + N, rank + 2N, ... (DistributedSampler's
        interleaving, without its padding: a short share is handled by the caller)."""
        return list(items[self.rank::self.world_size])

    # -- collectives (identity for one process) ------------------------------------------------

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place, and returned (on this rank's device)."""
        if self.enabled:
            moved = tensor.to(self.device)
            tdist.all_reduce(moved, op=tdist.ReduceOp.SUM)
            if moved is not tensor:
                tensor.copy_(moved)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on at least one: one decision for all."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (pickled); other ranks' argument is ignored."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        tdist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()


def wrap_ddp(module: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    """DistributedDataParallel around `module` when there are several ranks; else `module` itself."""
    if not dist.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)


ONE_PROCESS = Dist()
_current: Dist = ONE_PROCESS


def launched_by_torchrun() -> bool:
    """True in a worker that torchrun (or another launcher using its environment) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def resolve_backend(requested: str, cuda_available: bool) -> str:
    """auto: NCCL when this process can use a GPU, else gloo. NCCL without CUDA is an error."""
    if requested == "auto":
        return "nccl" if cuda_available else "gloo"
    if requested == "nccl" and not cuda_available:
        raise ValueError("KAIZEN_TRAIN_BACKEND=nccl needs CUDA, and torch sees no GPU here; use gloo or auto")
    return requested


def init(settings: Settings) -> Dist:
    """Join the job torchrun started (once per process), or the one-process job without it."""
    global _current
    if _current.enabled or not launched_by_torchrun():
        return _current
    backend = resolve_backend(settings.train_backend, torch.cuda.is_available())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    tdist.init_process_group(backend, timeout=timedelta(seconds=settings.train_dist_timeout_s),
                             rank=rank, world_size=world)
    _current = Dist(rank, world, local_rank, backend, device)
    log.info("rank %d of %d (local %d) on %s, backend %s", rank, world, local_rank, device, backend)
    return _current


def current() -> Dist:
    """The job this process joined with `init` (the one-process job before that)."""
    return _current


def shutdown() -> None:
    """Leave the process group; after a peer died this must not hang or raise."""
    global _current
    if _current.enabled and tdist.is_initialized():
        with contextlib.suppress(Exception):
            tdist.destroy_process_group()
    _current = ONE_PROCESS


@contextlib.contextmanager
def launcher_env_hidden() -> Iterator[None]:
    """torchrun's variables out of os.environ for the duration (children started inside
    do not see them); put back afterwards."""
    saved = {k: os.environ.pop(k) for k in LAUNCHER_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# -- launching ------------------------------------------------------------------------------


def torchrun_command(settings: Settings, module: str, *args: str) -> list[str]:
    """`python -m torch.distributed.run ... -m module args` for this node.

    One node: torchrun's --standalone (a private rendezvous on a free port). Several: the
    static rendezvous at train_master_addr:port, this node's train_node_rank; every node runs
    the same command. No restarts: a failed rank fails the round, which the next round recovers.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={settings.train_nproc_per_node}",
           "--max-restarts=0"]
    if settings.train_nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={settings.train_nnodes}", f"--node-rank={settings.train_node_rank}",
                f"--master-addr={settings.train_master_addr}", f"--master-port={settings.train_master_port}"]
    return [*cmd, "-m", module, *args]


def wants_torchrun(settings: Settings) -> bool:
    """More than one training process is configured and this process is not one of them yet."""
    return settings.train_world_size > 1 and not launched_by_torchrun()


def relaunch(settings: Settings, module: str, argv: Sequence[str]) -> int:
    """Run `module argv` under torchrun with this process's settings; returns its exit code."""
    cmd = torchrun_command(settings, module, *argv)
    log.info("launching %d training processes: %s", settings.train_world_size, " ".join(cmd[1:]))
    return subprocess.call(cmd, env=settings.child_env())


__all__ = ["Dist", "ONE_PROCESS", "wrap_ddp", "current", "init", "launched_by_torchrun", "launcher_env_hidden", "relaunch",
           "resolve_backend", "shutdown", "torchrun_command", "wants_torchrun"]
