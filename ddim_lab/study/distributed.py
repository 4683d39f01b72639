"""One job over several processes (``accelerate launch``, one process per GPU): who does which image group.

Ranks come from the variables ``accelerate launch`` (and torchrun) set — ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` — and the collective steps (barrier, broadcast, gather) run on the process group that
accelerate's ``PartialState`` sets up, touched only when there is more than one process. Rank r takes image
groups r, r + W, r + 2W, …; every rank writes its groups as parts into the same run directory (the main
process's), and the main process merges them once all are done: the table a single process writes.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any


def process_info() -> tuple[int, int, int]:
    """(rank, world size, local rank); (0, 1, 0) outside a multi-process launch."""
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


@cache
def _ready() -> None:
    """The process group: accelerate's ``PartialState`` sets it up (NCCL and one GPU per process under
    ``accelerate launch`` on GPUs); where it does not (CPU processes), a gloo group from the same variables."""
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState()
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")


def barrier() -> None:
    """Wait for every process (no-op for one)."""
    if process_info()[1] > 1:
        import torch.distributed as dist

        _ready()
        dist.barrier()


def broadcast(value: Any) -> Any:
    """``value`` of the main process, on every process (itself for one process)."""
    if process_info()[1] == 1:
        return value
    import torch.distributed as dist

    _ready()
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """``value`` of every process, in rank order (``[value]`` for one process)."""
    world = process_info()[1]
    if world == 1:
        return [value]
    import torch.distributed as dist

    _ready()
    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return out


def my_share(count: int, rank: int, world: int) -> list[int]:
    """Indices of the ``count`` image groups that process ``rank`` of ``world`` computes."""
    return list(range(rank, count, world))
