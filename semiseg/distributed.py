"""Multi-GPU / multi-node training with ``torchrun`` (issue #4): process group, collectives, SyncBN.

``torchrun --nproc_per_node N -m semiseg.train CONFIG ...`` starts N processes; each reads
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment. What is shared, and how:

* **data** -- every global batch (``batch_labeled`` / ``batch_unlabeled`` in the config) is split
  into N equal contiguous shares (:class:`semiseg.data.sampling.Batches` with ``rank`` and
  ``world``): the role of a ``DistributedSampler``, with the extra property that the union of the
  shares is exactly the 1-process batch, and every sample is cropped and augmented by a
  generator keyed on its place in the global batch;
* **gradients** -- ``DistributedDataParallel`` averages them over the processes;
* **the memory bank** -- each process ranks its own labeled vectors; the candidates (vectors,
  labels, scores, image ids, FQF mask: fixed shapes, since every share has the same size) are
  all-gathered in rank order before the update, so every process pushes the same candidates into
  the same bank and the banks stay identical;
* **class frequencies** of eq. (3)'s alpha, the logged loss values and BatchNorm running
  statistics are all-reduced (sum, mean, mean), so the EMA teacher is the same everywhere;
* **files** -- only rank 0 writes (run directory, checkpoints, metrics) and evaluates; the others
  wait at a barrier.

*Choice*: ``sync_bn=true`` converts the network's ``BatchNorm2d`` layers only. The 1-D BatchNorms
of the heads and of the class-wise attention (per class) normalise each process's own vectors,
whose classes differ between processes, as C separate modules per process did; their running
statistics are averaged after each step like the others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self):
        return self.world > 1

    @property
    def main(self):
        return self.rank == 0


def init(device_type):
    """Join the process group that ``torchrun`` describes in the environment (nothing to do for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    info = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return info


def check_divisible(global_batch, info, key):
    """A global batch size that the process count does not divide is a one-line error naming the key."""
    if global_batch % info.world:
        raise ValueError(f"config key '{key}' = {global_batch} is not divisible by the {info.world} processes")


def all_gather_cat(tensor, info):
    """Concatenate every process's ``tensor`` (same shape everywhere) in rank order: one fixed-shape
    collective, no pickled objects."""
    if not info.enabled:
        return tensor
    dtype = tensor.dtype
    tensor = tensor.to(torch.uint8) if dtype == torch.bool else tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(info.world)]
    dist.all_gather(parts, tensor)
    out = torch.cat(parts)
    return out.to(dtype) if dtype == torch.bool else out


def all_reduce_(tensor, info, mean=False):
    """In-place sum (or mean) over the processes."""
    if info.enabled:
        dist.all_reduce(tensor)
        if mean:
            tensor /= info.world
    return tensor


def average_buffers_(module, info):
    """Mean of every floating-point buffer (BatchNorm running statistics) over the processes, and
    the largest of every integer one (``num_batches_tracked``: a class-wise attention module may
    have seen a batch on one process only)."""
    if info.enabled:
        for buffer in module.buffers():
            if buffer.is_floating_point():
                all_reduce_(buffer, info, mean=True)
            else:
                dist.all_reduce(buffer, op=dist.ReduceOp.MAX)


def barrier(info):
    if info.enabled:
        dist.barrier()


def convert_sync_bn(module):
    """``BatchNorm2d`` -> ``SyncBatchNorm`` (the 1-D BatchNorms of heads and attention stay local)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            sync = nn.SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            sync.to(next(child.parameters(), child.running_mean).device)
            setattr(module, name, sync)
        else:
            convert_sync_bn(child)
    return module


def destroy(info):
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
