"""torchrun / DDP plumbing: process group from the environment, rank helpers, reductions."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class RankTimeout(TimeoutError):
    """Another process did not take part in a collective within ``train.dist_timeout``."""


def is_collective_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective that gave up on a hung or dead peer (gloo / nccl wording)."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(
        s in text for s in ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer")
    )


def init_distributed(device_pref: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ...), or run alone.

    gloo on CPU, nccl on GPU; multi-node works through torchrun's own rendezvous. A collective
    that waits more than ``timeout_s`` for another process raises instead of waiting forever.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart != "0":
            # torchrun keeps its store across restarts, with the last attempt's addresses in it:
            # the restarted processes meet in a key space of their own.
            base = dist.TCPStore(  # type: ignore[attr-defined]
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
            )
            store = dist.PrefixStore(f"pvt/restart{restart}", base)  # type: ignore[attr-defined]
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    return DistInfo(rank, world, local_rank, device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (in place, and returned)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP does this before each
    training forward, but each rank's last forward leaves its own statistics behind; evaluation
    must see one model."""
    if info.enabled:
        for b in module.buffers():
            dist.broadcast(b, src=0)


def gather_objects(obj: object, info: DistInfo) -> list[object]:
    """Every rank's ``obj``, in rank order (a one-item list when running alone)."""
    if not info.enabled:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
