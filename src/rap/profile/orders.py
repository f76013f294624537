"""Calibration perplexity along a fixed removal order (one-shot methods record it like GSI does)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from rap.core.mask import BlockMask
from rap.core.model import BlockView
from rap.profile.calibration import Calibration
from rap.profile.record import Profile, ppl_from_nll
from rap.profile.runner import BlockRunner


@torch.no_grad()
def fill_ppl_after(view: BlockView, calib: Calibration, profile: Profile, steps: int | None = None,
                   progress: bool = True, batch_windows: int = 8) -> Profile:
    """Set `dense_ppl` and `ppl_after[k]` (first k+1 blocks of the order removed), k < steps."""
    runner = BlockRunner(view)
    count = len(profile.order) if steps is None else min(steps, len(profile.order))
    if profile.dense_ppl is None:
        profile.dense_ppl = ppl_from_nll(float(runner.nll(calib.windows, BlockMask.full(view.num_layers),
                                                          batch_windows).double().sum()), calib.scored_tokens)
    profile.ppl_after = []
    for k in tqdm(range(1, count + 1), desc=f"{profile.method}: calibration ppl", disable=not progress):
        mask = BlockMask.from_order(view.num_layers, profile.order, k)
        nll = runner.nll(calib.windows, mask, batch_windows).double().sum()
        profile.ppl_after.append(ppl_from_nll(float(nll), calib.scored_tokens))
    profile.block_forwards += runner.block_window_passes / calib.num_windows
    profile.settings["ppl_after_steps"] = count
    profile.complete = True
    return profile
