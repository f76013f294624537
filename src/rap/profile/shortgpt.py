"""ShortGPT's Block Influence, per block: BI = 1 - cos(input stream, output stream), averaged over
calibration tokens, on the full model. Low influence = the block barely changes the stream."""

from __future__ import annotations

import time

from rap.core.mask import BlockMask
from rap.core.model import BlockView
from rap.profile.calibration import Calibration
from rap.profile.gsi import Wavefront
from rap.profile.orders import fill_ppl_after
from rap.profile.record import Profile, environment, model_hash, now, ppl_from_nll
from rap.profile.runner import BlockRunner


def shortgpt(view: BlockView, calib: Calibration, *, steps: int | None = None, progress: bool = True,
             batch_windows: int = 8) -> Profile:
    runner = BlockRunner(view)
    t0 = time.perf_counter()
    wf = Wavefront(runner, calib.windows, runner.kept_blocks(BlockMask.full(view.num_layers)), resident=False,
                   chunk_windows=batch_windows, batch_windows=batch_windows)
    nll, influence = wf.current()
    blocks = [b.name for b in view.blocks]
    order = sorted(influence, key=lambda b: (influence[b], blocks.index(b)))
    versions, device = environment(view.device)
    profile = Profile(model=view.name, model_hash=model_hash(view), method="shortgpt", calibration=calib.describe(),
                      num_layers=view.num_layers, dense_ppl=ppl_from_nll(float(nll.sum()), calib.scored_tokens),
                      order=order, scores=influence,
                      settings={"dtype": str(view.dtype).replace("torch.", ""),
                                "score": "Block Influence: 1 - cos(block input, block output), token mean"},
                      seconds=time.perf_counter() - t0, block_forwards=runner.block_window_passes / calib.num_windows,
                      versions=versions, device=device, created=now())
    return fill_ppl_after(view, calib, profile, steps, progress=progress, batch_windows=batch_windows)
