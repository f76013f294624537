"""Removal curves: held-out perplexity as blocks are removed in each profile's order.

x = fraction of block parameters removed, y = perplexity (log scale), one line per method.
Perplexity is the standard protocol of `rap ppl` (rap.eval.perplexity), so numbers compare.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rap.errors import RapError
from rap.eval.perplexity import perplexity
from rap.core.mask import BlockMask
from rap.core.model import BlockView
from rap.profile.record import Profile


@dataclass(frozen=True)
class CurvePoint:
    method: str
    blocks_removed: int
    block_fraction: float  # of the 2L blocks
    param_fraction: float  # of the parameters inside blocks
    ppl: float
    removed: str  # the block removed last ("" at 0)


def curve_counts(num_blocks: int, max_fraction: float = 0.5, every: int = 1) -> list[int]:
    """0, every, 2*every, ... up to max_fraction of the blocks, always with the 25% point."""
    top = int(math.floor(max_fraction * num_blocks + 1e-9))
    counts = set(range(0, top + 1, max(1, every))) | {top}
    quarter = round(0.25 * num_blocks)
    if quarter <= top:
        counts.add(quarter)
    return sorted(counts)


def method_labels(profiles: list[Profile], paths: list[str] | None = None) -> list[str]:
    labels = [p.method for p in profiles]
    if len(set(labels)) < len(labels) and paths:  # two profiles of one method: tell them apart
        labels = [f"{p.method} ({Path(path).stem})" for p, path in zip(profiles, paths)]
    return labels


@torch.no_grad()
def removal_curves(view: BlockView, profiles: list[Profile], windows: torch.Tensor, counts: list[int],
                   labels: list[str] | None = None, batch_size: int = 4, progress: bool = True) -> list[CurvePoint]:
    """Held-out PPL of every (profile, count) pair; a mask shared by several profiles (e.g. the
    dense model) is evaluated once."""
    from tqdm.auto import tqdm

    labels = labels or [p.method for p in profiles]
    for p in profiles:
        if p.num_layers != view.num_layers:
            raise RapError(f"profile {p.method} of {p.model} has {p.num_layers} layers, {view.name} has {view.num_layers}")
    block_params = {b.name: b.params for b in view.blocks}
    total_params = sum(block_params.values())
    seen: dict[BlockMask, float] = {}
    jobs = [(label, p, k) for label, p in zip(labels, profiles) for k in counts if k <= len(p.order)]
    points = []
    for label, p, k in tqdm(jobs, desc="removal curves", disable=not progress):
        mask = BlockMask.from_order(view.num_layers, p.order, k)
        if mask not in seen:
            seen[mask] = perplexity(view, windows, batch_size, progress=False, mask=mask).ppl
        removed = p.order[:k]
        points.append(CurvePoint(label, k, k / len(block_params), sum(block_params[b] for b in removed) / total_params,
                                 seen[mask], removed[-1] if removed else ""))
    return points


def ppl_at(points: list[CurvePoint], blocks_removed: int) -> dict[str, float]:
    return {pt.method: pt.ppl for pt in points if pt.blocks_removed == blocks_removed}


def plot_curves(points: list[CurvePoint], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method in dict.fromkeys(pt.method for pt in points):
        pts = sorted((pt for pt in points if pt.method == method), key=lambda pt: pt.blocks_removed)
        ax.plot([pt.param_fraction for pt in pts], [pt.ppl for pt in pts], marker="o", markersize=2.5,
                linewidth=1.4, label=method)
    ax.set_yscale("log")
    ax.set_xlabel("fraction of block parameters removed")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def rows(points: list[CurvePoint]) -> list[dict]:
    return [asdict(pt) for pt in points]
