"""torch.distributed, as torchrun sets it up: which shards are this rank's, and meeting up.

Shards are fixed by dataset index (shard k holds samples k*S .. k*S+S-1), and rank r of W
takes shards r, r+W, r+2W, ...: every sample lands in the same shard, at the same offset,
in the same batch, whatever the number of processes, so the output is the same sample for
sample, and a run may resume with another number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_here: bool = False  # we called init_process_group, so we tear it down

    @property
    def active(self) -> bool:
        return self.world > 1

    def shards(self, n_shards: int) -> list[int]:
        return list(range(self.rank, n_shards, self.world))

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's obj on rank 0 (None elsewhere); no shared file system needed."""
        if not self.active:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def close(self) -> None:
        if self.started_here and dist.is_initialized():
            dist.destroy_process_group()


def pick_device(device: str | torch.device | None) -> torch.device:
    """None: this rank's GPU (LOCAL_RANK) when there is one, else the CPU."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
    return device


def join_group(device: torch.device) -> Group:
    """The process group torchrun describes in the environment (joined if not yet)."""
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size(),
                     int(os.environ.get("LOCAL_RANK", "0")))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return Group()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # long timeout: ranks wait at the end for the slowest one, which may take hours
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=timedelta(hours=12))
    return Group(dist.get_rank(), dist.get_world_size(),
                 int(os.environ.get("LOCAL_RANK", "0")), started_here=True)
