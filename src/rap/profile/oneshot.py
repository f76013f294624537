"""One-shot importance: each block's calibration-perplexity increase when removed alone from the
full model. It is exactly the first step of GSI (same wavefront, one step), ranked once."""

from __future__ import annotations

from rap.core.model import BlockView
from rap.profile.calibration import Calibration
from rap.profile.gsi import gsi
from rap.profile.orders import fill_ppl_after
from rap.profile.record import Profile


def oneshot(view: BlockView, calib: Calibration, *, steps: int | None = None, progress: bool = True,
            batch_windows: int = 8, cache_bytes: int | None = None) -> Profile:
    first = gsi(view, calib, steps=1, predict=0, progress=progress, batch_windows=batch_windows,
                cache_bytes=cache_bytes)
    scores = {b: ppl - first.dense_ppl for b, ppl in first.steps[0].candidates.items()}
    order = sorted(scores, key=lambda b: (scores[b], [x.name for x in view.blocks].index(b)))
    profile = Profile(model=first.model, model_hash=first.model_hash, method="oneshot",
                      calibration=first.calibration, num_layers=view.num_layers, dense_ppl=first.dense_ppl,
                      order=order, scores=scores, settings={"dtype": first.settings["dtype"],
                                                            "score": "calibration PPL increase when removed alone"},
                      seconds=first.seconds, block_forwards=first.block_forwards,
                      versions=first.versions, device=first.device, created=first.created)
    return fill_ppl_after(view, calib, profile, steps, progress=progress, batch_windows=batch_windows)
