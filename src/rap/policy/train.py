"""Training: measure quality on calibration data, build the mask ladder, train the agent.

    prepare_quality   profile + calibration windows -> QualityModel (surrogate fitted to measured
                      masks, KV penalty measured once) and a MaskLadder whose masks are all measured
    train_agent       sb3-contrib MaskablePPO on DecisionEnv; seeded; checkpoints the whole bundle
                      every `checkpoint_every` steps so `resume=True` continues where it stopped

Measurements are memoised in a JSON cache beside the output file, so a resumed or repeated run
does not run the model again for masks it has already scored.
"""

from __future__ import annotations

import io
import logging
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from rap.policy.evaluator import (KV_RATIOS, KVPenalty, MaskSurrogate, MeasuredEvaluator, QualityModel, design_masks,
                        drop_vector, mask_key, measure_kv_penalty, measure_many)
from rap.policy.ladder import MaskLadder
from rap.policy.workload import Workload

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200_000
    seed: int = 0
    checkpoint_every: int = 20_000
    n_steps: int = 512  # rollout length per PPO update
    batch_size: int = 128
    n_epochs: int = 4
    learning_rate: float = 1e-3
    ent_coef: float = 0.003
    net_arch: tuple[int, ...] = (64, 64)


def validate_profile(profile: dict, num_layers: int) -> None:
    from rap.errors import RapError

    order = profile.get("order")
    names = {f"{k}.{i}" for k in ("attn", "ffn") for i in range(num_layers)}
    if not isinstance(order, list) or set(order) != names or len(order) != len(names):
        raise RapError(f"the profile's 'order' must list each of the {len(names)} blocks once "
                       f"(attn.0..attn.{num_layers - 1}, ffn.0..ffn.{num_layers - 1}): was it made for another model?")


def prepare_quality(view, profile: dict, evaluator: MeasuredEvaluator, kv_stream=None,
                    kv_ratios: Sequence[float] = KV_RATIOS, design_count: int = 150, ladder_step: int = 2,
                    kv_prompt_lens: Sequence[int] | None = None, kv_samples: int = 2, kv_continuation: int = 64,
                    seed: int = 0, progress: bool = True) -> tuple[QualityModel, MaskLadder]:
    """Measure, fit and build what the policies score configurations with.

    Measured on the calibration windows: the design masks (order prefixes, per-kind prefixes,
    random masks) and the ladder masks at every `ladder_step`-th count pair (0: none); the
    surrogate is fitted to all of them and fills in the ladder entries between measured ones.
    The KV penalty is measured once on `kv_stream` (skipped, i.e. ratio 1 only, if None).
    """
    L = view.num_layers
    order = list(profile["order"])
    t0 = time.perf_counter()
    masks = design_masks(L, order, design_count, seed=seed)
    if ladder_step > 0:
        known = set(masks)
        masks += [m for m in MaskLadder.grid_masks(L, order, ladder_step) if m not in known]
    ys = measure_many(evaluator, masks, progress, desc="measuring calibration masks")
    surrogate = MaskSurrogate.fit(np.stack([drop_vector(m) for m in masks]), np.array(ys), seed=seed)
    log.info("surrogate fitted on %d masks: rmse(log1p) %.3f, held-out %.3f", surrogate.points,
             surrogate.fit_rmse, surrogate.cv_rmse)
    if kv_stream is not None and len(kv_ratios) > 1:
        lens = kv_prompt_lens or [p for p in (64, 256, 1024, 4096) if p + kv_continuation <= view.shape.max_context]
        # on rap's decoder (the compressor that serves), 16-bit and int8 KV
        penalty = measure_kv_penalty(view, kv_stream, lens, kv_ratios, kv_continuation, kv_samples, progress,
                                     kv_bits=(16, 8))
    else:
        penalty = KVPenalty.zero()
    dense_nll = evaluator.dense_nll()
    quality = QualityModel(surrogate, penalty, math.exp(dense_nll), calibration={
        "label": evaluator.label, "windows": list(evaluator.windows.shape), "tokens": evaluator.tokens,
        "dense_nll": dense_nll, "measured_masks": len(masks), "ladder_step": ladder_step,
        "seconds": round(time.perf_counter() - t0, 1)})
    quality.measured.update({mask_key(m): y for m, y in zip(masks, ys)})
    return quality, MaskLadder.from_order(quality, L, order)


# ---- the agent --------------------------------------------------------------------------------
def _versions() -> dict:
    import gymnasium
    import sb3_contrib
    import stable_baselines3
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "gymnasium": gymnasium.__version__,
            "stable_baselines3": stable_baselines3.__version__, "sb3_contrib": sb3_contrib.__version__}


def train_agent(context, meta: dict, out: str | Path, config: TrainConfig = TrainConfig(),
                workload: Workload | None = None, resume: bool = False, progress: bool = True):
    """Train (or continue training) MaskablePPO; writes the bundle to `out` at every checkpoint."""
    import torch
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.utils import set_random_seed
    from tqdm.auto import tqdm

    from rap.policy.env import DecisionEnv
    from rap.policy.rl import Agent, Bundle

    out = Path(out)
    workload = workload or Workload()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    set_random_seed(config.seed)
    start, history = 0, []
    if resume and out.is_file():
        old = Bundle.load(out, with_sb3=True)
        if old.sb3_bytes is not None:  # else: only the quality model is there; train from step 0
            start = int(old.meta.get("training", {}).get("timesteps", 0))
            history = list(old.meta.get("training", {}).get("history", []))
    env = DecisionEnv(context, workload, seed=config.seed + start)
    if start:
        model = MaskablePPO.load(io.BytesIO(old.sb3_bytes), env=env, device="cpu")
        model.set_random_seed(config.seed + start)
        log.info("resuming from %d steps", start)
    else:
        model = MaskablePPO("MlpPolicy", env, n_steps=config.n_steps, batch_size=config.batch_size,
                            n_epochs=config.n_epochs, learning_rate=config.learning_rate, gamma=0.0,
                            gae_lambda=1.0, ent_coef=config.ent_coef, seed=config.seed, device="cpu", verbose=0,
                            policy_kwargs={"net_arch": list(config.net_arch)})
    t_start = time.perf_counter()

    def save(done: int, final: bool) -> None:
        buf = io.BytesIO()
        model.save(buf)
        training = {"algorithm": "sb3-contrib MaskablePPO", "timesteps": int(done), "target_steps": config.steps,
                    "seed": config.seed, "config": {k: (list(v) if isinstance(v, tuple) else v)
                                                    for k, v in config.__dict__.items()},
                    "seconds": round(time.perf_counter() - t_start, 1) + sum(h.get("seconds", 0) for h in history),
                    "finished": final, "history": history + [{"from": start, "to": int(done),
                                                              "seconds": round(time.perf_counter() - t_start, 1)}],
                    "versions": _versions(), "workload": workload.to_dict(), "device": "cpu"}
        Bundle(dict(meta, training=training), Agent.from_sb3(model), buf.getvalue()).save(out)

    class Progress(BaseCallback):
        def __init__(self):
            super().__init__()
            self.bar = tqdm(total=config.steps, initial=start, desc="train-policy", unit="step",
                            disable=not progress, dynamic_ncols=True)
            self.rewards: list[float] = []
            self.next_ckpt = start + config.checkpoint_every

        def _on_step(self) -> bool:
            self.bar.update(self.training_env.num_envs)
            for info in self.locals.get("infos", []):
                if "log_ratio" in info and math.isfinite(info["log_ratio"]):
                    self.rewards.append(info["log_ratio"])
            if len(self.rewards) >= 500:
                self.bar.set_postfix(mean_log_ratio=f"{np.mean(self.rewards):.3f}")
                self.rewards.clear()
            if self.num_timesteps >= self.next_ckpt:
                save(self.num_timesteps, False)
                self.next_ckpt += config.checkpoint_every
            return True

        def _on_training_end(self) -> None:
            self.bar.close()

    remaining = config.steps - start
    if remaining > 0:
        model.learn(total_timesteps=remaining, callback=Progress(), reset_num_timesteps=start == 0)
    save(max(start, int(model.num_timesteps)), True)
    return Bundle.load(out)


def base_meta(view_name: str, num_layers: int, profile: dict, quality: QualityModel, ladder: MaskLadder,
              memory_dtype: str) -> dict:
    return {"model": view_name, "num_layers": num_layers, "order": list(profile["order"]),
            "scores": profile.get("scores"), "profile_method": profile.get("method"),
            "profile_hash": profile.get("model_hash"), "kv_ratios": list(quality.kv_ratios),
            "quality": quality.to_dict(), "ladder": ladder.to_dict(), "memory_dtype": memory_dtype}

