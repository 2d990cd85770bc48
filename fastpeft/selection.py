"""Which entries of W a sparse delta trains: random, largest |W|, or largest scores (e.g. accumulated
gradient magnitudes, RoSA's one-shot mask), as flat indices (block_size 1) or block coordinates."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_sparse_options


@dataclass(frozen=True)
class SparseSpec:
    """Where a sparse delta sits: ``density`` of W's entries (or of its ``block_size`` blocks), picked by
    ``selection`` ("random", "magnitude", "scores"). ``SparseDeltaConfig(density, block_size, selection)``
    and ``LoraConfig(sparse_density, sparse_block_size, sparse_selection)`` both name one of these."""

    density: float
    block_size: int = 1
    selection: str = "random"

    def __post_init__(self):
        check_sparse_options(self.density, self.block_size, self.selection)
        object.__setattr__(self, "density", float(self.density))

    def select(self, weight: torch.Tensor, scores: torch.Tensor | None = None, selection: str | None = None
               ) -> torch.Tensor:
        """Positions on ``weight`` by this spec (or by ``selection`` instead of its own)."""
        return select_indices(weight, self.density, self.block_size, selection or self.selection, scores)


def count_for(density: float, out_features: int, in_features: int, block_size: int) -> int:
    """How many entries (block_size 1) or blocks a density keeps: round(density * total), at least 1."""
    total = -(-out_features // block_size) * -(-in_features // block_size)
    return max(1, min(total, int(round(density * total))))


def _block_scores(w: torch.Tensor, b: int) -> torch.Tensor:
    """Sum of |w| over each b x b block (edge blocks clipped): (cdiv(out, b), cdiv(in, b))."""
    out_f, in_f = w.shape
    rb, cb = -(-out_f // b), -(-in_f // b)
    padded = w.new_zeros(rb * b, cb * b)
    padded[:out_f, :in_f] = w
    return padded.view(rb, b, cb, b).sum(dim=(1, 3))


def select_indices(weight: torch.Tensor, density: float, block_size: int = 1, selection: str = "random",
                   scores: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sorted, unique positions for a sparse delta on ``weight`` (out, in), on weight's device.

    block_size 1: (nnz,) int64 flat row-major indices; block_size b: (nblocks, 2) int64 block (row, col).
    ``selection``: "random" (uniform, from ``generator`` or torch's default one), "magnitude" (largest
    |W|, summed over each block), "scores" (largest |scores|, scores of W's shape).
    """
    check_sparse_options(density, block_size, selection)
    out_f, in_f = weight.shape
    b = block_size
    rb, cb = -(-out_f // b), -(-in_f // b)
    k = count_for(density, out_f, in_f, b)
    if selection == "random":
        flat = torch.randperm(rb * cb, generator=generator)[:k].to(weight.device)
    else:
        if selection == "scores":
            if scores is None:
                raise ValueError("selection='scores' needs scores, got None")
            if tuple(scores.shape) != (out_f, in_f):
                raise ValueError(f"scores must have the weight's shape {(out_f, in_f)}, got {tuple(scores.shape)}")
            s = scores.detach().abs().float()
        else:
            s = weight.detach().abs().float()
        s = s if b == 1 else _block_scores(s, b)
        flat = torch.topk(s.reshape(-1), k, sorted=False).indices
    flat = torch.sort(flat.to(torch.int64)).values
    if b == 1:
        return flat
    return torch.stack([flat // cb, flat % cb], dim=1)
