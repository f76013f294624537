"""Block importance: which blocks to remove first.

- `gsi`: Greedy Sequential Importance, exact (prefix reuse + upstream snapshots) or racing;
  `naive_gsi` is the plain reference it must agree with.
- `oneshot`, `shortgpt`, `random_order`: one-shot baselines.
- `removal_curves`: held-out perplexity along each order.
A profile is one JSON file (`Profile`, `load_profile`); `rap profile` / `rap curve` drive it.
"""

from rap.profile.calibration import Calibration, load_calibration
from rap.profile.gsi import Racing, Wavefront, gsi, naive_gsi
from rap.profile.oneshot import oneshot
from rap.profile.random_order import random_order
from rap.profile.record import Profile, Step, load_profile, model_hash
from rap.profile.runner import BlockRunner
from rap.profile.shortgpt import shortgpt

__all__ = ["BlockRunner", "Calibration", "Profile", "Racing", "Step", "Wavefront", "gsi", "load_calibration",
           "load_profile", "model_hash", "naive_gsi", "oneshot", "random_order", "shortgpt"]
