"""The floor: a seeded random removal order."""

from __future__ import annotations

import time

import torch

from rap.core.model import BlockView
from rap.profile.calibration import Calibration
from rap.profile.orders import fill_ppl_after
from rap.profile.record import Profile, environment, model_hash, now


def random_order(view: BlockView, calib: Calibration, *, seed: int | None = None, steps: int | None = None,
                 progress: bool = True, batch_windows: int = 8) -> Profile:
    seed = calib.seed if seed is None else seed
    blocks = [b.name for b in view.blocks]
    perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed)).tolist()
    versions, device = environment(view.device)
    profile = Profile(model=view.name, model_hash=model_hash(view), method="random", calibration=calib.describe(),
                      num_layers=view.num_layers, order=[blocks[i] for i in perm],
                      settings={"seed": seed, "dtype": str(view.dtype).replace("torch.", "")},
                      versions=versions, device=device, created=now())
    t0 = time.perf_counter()
    profile = fill_ppl_after(view, calib, profile, steps, progress=progress, batch_windows=batch_windows)
    profile.seconds = time.perf_counter() - t0
    return profile
