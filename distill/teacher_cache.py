"""Teacher outputs computed once, for K fixed augmented views of every training image.

With ``distill.teacher_outputs: cached`` the teacher runs over each training image K times, each
time on a fixed view (identified by its augmentation seed), and its logits are stored. The
student then trains on those same views, picking one of the K per epoch, and never runs the
teacher. A cached output belongs to exactly one view: :meth:`TeacherCache.lookup` finds it by
the view's seed and refuses a batch whose view was never cached.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from core.files import atomic_write
from data.loader import InspectionDataset, ViewSampler

__all__ = ["TeacherCache", "build_teacher_cache"]


class TeacherCache:
    """``seeds[i, k]`` is the view seed of view k of image i; ``logits[i, k]`` the teacher's output on it."""

    def __init__(self, seeds: torch.Tensor, logits: torch.Tensor) -> None:
        self.seeds = seeds.long()
        self.logits = logits.float()

    def lookup(self, index: torch.Tensor, view_seeds: torch.Tensor) -> torch.Tensor:
        """Teacher logits for these (image, view) pairs; an uncached view is an error, never a guess."""
        index, view_seeds = index.cpu().long(), view_seeds.cpu().long()
        match = self.seeds[index] == view_seeds[:, None]
        found = match.any(dim=1)
        if not bool(found.all()):
            i = int(index[~found][0])
            raise RuntimeError(f"image {i} arrived with view seed {int(view_seeds[~found][0])}, which was never "
                               "cached: cached teacher outputs may only pair with the view they were computed on")
        return self.logits[index, match.float().argmax(dim=1)]

    def save(self, path: Path, meta: dict) -> None:
        tensors = {"seeds": self.seeds, "logits": self.logits}
        atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"meta": json.dumps(meta)}))

    @classmethod
    def load(cls, path: Path) -> tuple[TeacherCache, dict]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
        tensors = load_file(str(path))
        return cls(tensors["seeds"], tensors["logits"]), meta


class _TeacherViews(Dataset):
    """The teacher's view alone of ``(index, view seed)`` keys: the student's view is not made."""

    def __init__(self, dataset: InspectionDataset) -> None:
        self.dataset = dataset
        self.size = dataset.teacher_size if dataset.teacher_size is not None else dataset.size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        return self.dataset.view(int(key[0]), int(key[1]), self.size)


@torch.inference_mode()
def build_teacher_cache(teacher: nn.Module, dataset: InspectionDataset, sampler: ViewSampler, *,
                        device: torch.device, batch_size: int, precision=None) -> TeacherCache:
    """Run the teacher once over the K fixed views of every image of ``dataset``."""
    n, k = len(dataset), sampler.views
    keys = [(i, sampler.cached_view_seed(i, v)) for i in range(n) for v in range(k)]
    seeds = torch.tensor([s for _, s in keys], dtype=torch.long).view(n, k)
    loader = DataLoader(_TeacherViews(dataset), batch_size=batch_size, sampler=keys, num_workers=0)
    teacher.eval().to(device)
    outs = []
    for batch in tqdm(loader, desc=f"cache teacher ({k} views)", unit="batch", leave=False, mininterval=1.0,
                      disable=None):
        images = batch.to(device)  # the teacher's own view
        if precision is not None:
            with precision.autocast(device):
                outs.append(teacher(images).float().cpu())
        else:
            outs.append(teacher(images).float().cpu())
    logits = torch.cat(outs).view(n, k, -1)
    return TeacherCache(seeds, logits)
