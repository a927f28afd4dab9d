"""Distributed data parallel helpers and the resumable epoch sampler.

Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` set) the
engine joins a process group (NCCL on GPU, gloo on CPU), wraps the model in
DistributedDataParallel and shards every epoch with :class:`EpochSampler`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from fwi_core.data import balanced_indices

from ..errors import ConfigError


@dataclass
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False   # we initialised the process group (and destroy it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device={name!r} is not a torch device (e.g. auto, cpu, cuda, cuda:1)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} but CUDA is not available")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment variables, if any.

    A group that is already initialised (e.g. by the caller) is used as it is.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, False)
    if world <= 1:
        return DistInfo(0, 1, 0, dev, False)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, True)


def all_gather_objects(obj: Any, info: DistInfo) -> List[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without DDP)."""
    if not info.enabled:
        return [obj]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if ``flag`` is true on any rank (keeps stop decisions in step)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return value
    t = value.detach().clone().float()
    if dist.get_backend() != "nccl":
        t = t.cpu()
    dist.all_reduce(t)
    return t / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


class EpochSampler(DistributedSampler):
    """A DistributedSampler whose order is a pure function of ``(seed, epoch)`` and which
    can start part-way through an epoch, so a run killed mid-epoch resumes on exactly the
    next batch.

    Each epoch's global order is a permutation of the dataset (or, with ``families``, a
    family-balanced draw, :func:`fwi_core.data.balanced_indices`), padded by wrapping to a
    multiple of ``num_replicas`` and dealt ``order[rank::num_replicas]`` as torch's
    DistributedSampler does. So with a per-rank batch ``B / N``, the N ranks' k-th batches
    together hold exactly the k-th batch of ``B`` that a single process would draw.

    Args:
        dataset: anything with ``len``.
        families: per-item family names, for family-balanced epochs.
        start: items of this rank's share to skip in the current epoch (set by resume).
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 families: Optional[Sequence[str]] = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.families = list(families) if families is not None else None
        n = len(self.global_order(0)) if self.families is not None else len(dataset)
        self.num_samples = -(-n // num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.start = 0

    def global_order(self, epoch: int) -> np.ndarray:
        if self.families is not None:
            return balanced_indices(self.families, seed=self.seed + epoch)
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.dataset), generator=g).numpy()

    def __iter__(self):
        order = self.global_order(self.epoch)
        if len(order) < self.total_size:
            order = np.resize(order, self.total_size)   # wrap around, like DistributedSampler
        mine = order[self.rank:self.total_size:self.num_replicas]
        return iter(mine[self.start:].tolist())

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)
