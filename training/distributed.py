"""Several processes under ``torchrun``: PyTorch's own DistributedDataParallel, nothing else.

``torchrun --nproc_per_node N -m distill.run CONFIG`` starts N copies of the runner; each reads
RANK / WORLD_SIZE / LOCAL_RANK from the environment. Every process trains on its shard of each
batch (the configured ``batch_size`` stays the *global* batch), gradients are averaged by DDP,
evaluation outputs are gathered so every rank computes the same metrics and takes the same
decisions (best epoch, early stop), and only rank 0 writes files and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.engine import EvalOutput

__all__ = ["Dist", "SINGLE", "init_distributed", "barrier", "gather_eval", "close_distributed"]


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard_batch(self, batch_size: int) -> int:
        """Each rank's batch, so that all ranks together make the configured (global) batch."""
        return max(1, batch_size // self.world)


SINGLE = Dist()


def init_distributed(device_name: str) -> tuple[Dist, str]:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPU); returns the rank info
    and the device name this process should use (its own GPU under torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE, device_name
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local), (f"cuda:{local}" if use_cuda else "cpu")


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def gather_eval(out: EvalOutput, d: Dist) -> EvalOutput:
    """Every rank's evaluation outputs, put back in dataset order (ranks evaluated interleaved shards)."""
    if not d.active:
        return out
    parts: list[EvalOutput | None] = [None] * d.world
    dist.all_gather_object(parts, out)
    logits = torch.cat([p.logits for p in parts])
    labels = torch.cat([p.labels for p in parts])
    index = torch.cat([p.index for p in parts])
    order = torch.argsort(index, stable=True)
    return EvalOutput(logits[order], labels[order], index[order])


def close_distributed(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
