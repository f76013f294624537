"""Block importance: which blocks to remove first.

- `gsi`: Greedy Sequential Importance, exact (prefix reuse + upstream snapshots) or racing;
  `naive_gsi` is the plain reference it must agree with.
- `oneshot`, `shortgpt`, `random_order`: one-shot baselines.
- `removal_curves`: held-out perplexity along each order.
A profile is one JSON file (`Profile`, `load_profile`); `rap profile` / `rap curve` drive it.
"""

from .calibration import Calibration, load_calibration
from .gsi import Racing, Wavefront, gsi, naive_gsi
from .oneshot import oneshot
from .random_order import random_order
from .record import Profile, Step, load_profile, model_hash
from .runner import BlockRunner
from .shortgpt import shortgpt

__all__ = ["BlockRunner", "Calibration", "Profile", "Racing", "Step", "Wavefront", "gsi", "load_calibration",
           "load_profile", "model_hash", "naive_gsi", "oneshot", "random_order", "shortgpt"]
