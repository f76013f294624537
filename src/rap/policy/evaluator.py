"""How good is a configuration? Log-perplexity ratio to the dense model, measured and predicted.

Three pieces, from slow and exact to fast and approximate:

* `MeasuredEvaluator`: runs the masked model on fixed token windows and returns the mean token
  NLL; every mask is measured once (memoised in memory and, optionally, in a JSON file keyed by
  model and windows). `log_ratio(mask) = nll(mask) - nll(dense)` = log(PPL(mask) / PPL(dense)).
  Used for calibration (WikiText-2 valid) and for the reported held-out numbers (WikiText-2 test).
* `KVPenalty`: the quality cost of keeping only a fraction r of the prompt's KV cache, as an
  *additive* term in log-PPL, measured ONCE on the dense model by `measure_kv_penalty` and then
  interpolated in log2(prompt length): the prompt is prefilled through rap's decoder with each
  keep ratio (Ada-KV in its flat cache, the compressor `rap serve` runs) and optionally int8 KV
  (`int8_table`), and the NLL of the following tokens is compared with the full 16-bit cache
  (`rap.policy.kv_measure`). Given a bare HF model instead of a BlockView it measures rap.kv's
  HF-path AdaKV(SnapKV()), kept as an explicit comparison.
  Assumptions this makes explicit: the penalty does not depend on which blocks are dropped
  (benchmarks/policy.py checks this on a few pruned masks), nor on batch or output length.
* `MaskSurrogate`: a small model fitted to measured masks that predicts the log ratio of any mask
  in microseconds, so RL training and the oracle's search can score thousands of masks.

`QualityModel` bundles the surrogate and the KV penalty: `log_ratio(mask, kv_ratio, prompt)`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from rap.core.hf import cache_kwargs
from rap.core.mask import BlockMask

log = logging.getLogger(__name__)

KV_RATIOS: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1)


# ---- mask <-> vector ------------------------------------------------------------------------
def mask_key(mask: BlockMask) -> str:
    """Compact, stable text key: attention keep bits, '|', FFN keep bits ('1' = kept)."""
    bits = lambda flags: "".join("1" if f else "0" for f in flags)  # noqa: E731
    return f"{bits(mask.keep_attn)}|{bits(mask.keep_ffn)}"


def mask_from_key(key: str) -> BlockMask:
    attn, ffn = key.split("|")
    return BlockMask(tuple(c == "1" for c in attn), tuple(c == "1" for c in ffn))


def drop_vector(mask: BlockMask) -> np.ndarray:
    """[2L] float32, 1 where a block is dropped; layout attn.0..attn.L-1, ffn.0..ffn.L-1."""
    return np.array([not k for k in (*mask.keep_attn, *mask.keep_ffn)], dtype=np.float32)


def mask_from_keep(keep: np.ndarray) -> BlockMask:
    """Inverse of 1 - drop_vector: [2L] keep flags -> BlockMask."""
    L = keep.shape[0] // 2
    return BlockMask(tuple(bool(x) for x in keep[:L]), tuple(bool(x) for x in keep[L:]))


def block_index(name: str, num_layers: int) -> int:
    kind, layer = name.split(".")
    return int(layer) + (num_layers if kind == "ffn" else 0)


# ---- measured --------------------------------------------------------------------------------
class MeasuredEvaluator:
    """Mean token NLL of the masked model on fixed windows; each mask measured once.

    windows: [n, seq] token ids. `cache_path`: JSON file that keeps measurements across runs; it
    is keyed by model name and a hash of the windows, so a different set never reuses numbers.
    """

    def __init__(self, view, windows: torch.Tensor, batch_size: int = 4, cache_path: str | Path | None = None,
                 label: str = "calibration"):
        self.view = view
        self.windows = windows
        self.batch_size = batch_size
        self.label = label
        self.cache_path = Path(cache_path) if cache_path else None
        self.key = {"model": str(view.name), "windows_sha": hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16],
                    "shape": list(windows.shape)}
        self._nll: dict[str, float] = {}
        self.measured = 0  # masks actually run (not from cache)
        self.seconds = 0.0
        self._load()

    @property
    def tokens(self) -> int:
        return int(self.windows.shape[0] * (self.windows.shape[1] - 1))

    def _load(self) -> None:
        if self.cache_path and self.cache_path.is_file():
            data = json.loads(self.cache_path.read_text())
            if data.get("key") == self.key:
                self._nll = dict(data["nll"])

    def save(self) -> None:
        if self.cache_path:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": self.key, "nll": self._nll}))
            tmp.replace(self.cache_path)

    def known(self, mask: BlockMask) -> bool:
        return mask_key(mask) in self._nll

    @torch.no_grad()
    def nll(self, mask: BlockMask) -> float:
        key = mask_key(mask)
        if key not in self._nll:
            import time

            from rap.eval.perplexity import perplexity

            t0 = time.perf_counter()
            res = perplexity(self.view, self.windows, self.batch_size, progress=False, mask=mask)
            self._nll[key] = res.mean_nll
            self.measured += 1
            self.seconds += time.perf_counter() - t0
            if self.cache_path and self.measured % 20 == 0:
                self.save()
        return self._nll[key]

    def dense_nll(self) -> float:
        return self.nll(BlockMask.full(self.view.num_layers))

    def log_ratio(self, mask: BlockMask) -> float:
        """log(PPL(mask) / PPL(dense)) on these windows."""
        return self.nll(mask) - self.dense_nll()

    def items(self) -> list[tuple[BlockMask, float]]:
        """Every measured (mask, log ratio)."""
        dense = self.dense_nll()
        return [(mask_from_key(k), v - dense) for k, v in self._nll.items()]


# ---- KV compression penalty --------------------------------------------------------------------
@dataclass(frozen=True)
class KVPenalty:
    """Added log-PPL of continuation tokens when only ceil(r * prompt) prompt tokens stay cached.

    table[i][j]: penalty at prompt_lens[i], ratios[j] with 16-bit KV; int8_table (when measured):
    the same with int8 keys and values (its r = 1 column is the quantisation's own cost).
    Interpolated linearly in log2(prompt), clamped at the ends. 16-bit r = 1 costs nothing by definition.
    """

    prompt_lens: tuple[int, ...]
    ratios: tuple[float, ...]
    table: tuple[tuple[float, ...], ...]
    method: str = ("rap's decoder (Ada-KV with the decoder's scorer, its flat cache) on the dense model, "
                   "continuation NLL, measured once")
    tokens: int = 0  # continuation tokens scored per prompt length
    int8_table: tuple[tuple[float, ...], ...] | None = None

    @property
    def bits(self) -> tuple[int, ...]:
        return (16, 8) if self.int8_table is not None else (16,)

    def __call__(self, kv_ratio: float, prompt: int, kv_bits: int = 16) -> float:
        if kv_bits not in self.bits:
            raise ValueError(f"KV bits {kv_bits} were not measured; measured: {self.bits}")
        if kv_ratio >= 1.0 and kv_bits == 16:
            return 0.0
        j = self._ratio_index(min(kv_ratio, 1.0))
        col = [row[j] for row in (self.table if kv_bits == 16 else self.int8_table)]
        x = math.log2(max(prompt, 1))
        xs = [math.log2(p) for p in self.prompt_lens]
        return float(max(0.0, np.interp(x, xs, col)))

    def _ratio_index(self, kv_ratio: float) -> int:
        for j, r in enumerate(self.ratios):
            if abs(r - kv_ratio) < 1e-9:
                return j
        raise ValueError(f"kv ratio {kv_ratio} was not measured; measured: {self.ratios}")

    def to_dict(self) -> dict:
        d = {"prompt_lens": list(self.prompt_lens), "ratios": list(self.ratios),
             "table": [list(r) for r in self.table], "method": self.method, "tokens": self.tokens}
        if self.int8_table is not None:
            d["int8_table"] = [list(r) for r in self.int8_table]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "KVPenalty":
        int8 = d.get("int8_table")
        return cls(tuple(d["prompt_lens"]), tuple(d["ratios"]), tuple(tuple(r) for r in d["table"]),
                   d.get("method", ""), d.get("tokens", 0), None if int8 is None else tuple(tuple(r) for r in int8))

    @classmethod
    def zero(cls, ratios: Sequence[float] = (1.0,)) -> "KVPenalty":
        return cls((1, 2), tuple(ratios), ((0.0,) * len(ratios),) * 2, method="none (KV compression not modelled)")


@torch.no_grad()
def continuation_nll(model, ids: torch.Tensor, prompt: int, kv_ratios: Sequence[float], press=None) -> dict[float, float]:
    """Summed NLL of the tokens after `prompt` for each KV keep ratio, the prompt's cache compressed
    by rap.kv (`compress` with `press`, default AdaKV(SnapKV())), then read through by the rest.

    ids: [1, prompt + continuation]; returns {ratio: summed NLL over the continuation tokens}.
    """
    import torch.nn.functional as F

    from rap.kv import AdaKV, Budget, SnapKV, compress

    press = press or AdaKV(SnapKV())
    cont = ids[:, prompt:]
    out = {}
    for r in kv_ratios:
        comp = compress(model, press, ids[:, :prompt], Budget(kv_ratio=r), reserve=cont.shape[1])
        first = F.cross_entropy(comp.next_logits.float(), cont[:, 0], reduction="sum")
        rest = 0.0
        if cont.shape[1] > 1:
            logits = model(input_ids=cont[:, :-1], **cache_kwargs(comp.cache), use_cache=True).logits
            rest = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), cont[:, 1:].reshape(-1),
                                   reduction="sum")
        out[r] = float(first + rest)
    return out


def measure_kv_penalty(model, token_stream: torch.Tensor, prompt_lens: Sequence[int],
                       kv_ratios: Sequence[float] = KV_RATIOS, continuation: int = 64, samples: int = 2,
                       progress: bool = True, kv_bits: Sequence[int] = (16,)) -> KVPenalty:
    """Measure `KVPenalty` once: `samples` non-overlapping spans per prompt length of a token stream.

    model: a `BlockView` (or a `rap.decode.decoder.Decoder`): measured on rap's decoder, the
    compressor `rap serve` runs (Ada-KV in its flat cache; `kv_bits` (16, 8) adds the int8 table);
    a bare HF model: rap.kv's HF-path AdaKV(SnapKV()) (the explicit comparison; 16-bit only).
    """
    from tqdm.auto import tqdm

    from rap.core.model import BlockView

    ratios = tuple(sorted(set(kv_ratios) | {1.0}, reverse=True))
    bits = tuple(sorted(set(kv_bits) | {16}, reverse=True))
    decoder = None
    if isinstance(model, BlockView):
        from rap.decode.decoder import Decoder

        decoder = Decoder(model)
    elif hasattr(model, "generate") and hasattr(model, "kv_resident_bytes"):
        decoder = model
    if decoder is None and bits != (16,):
        raise ValueError("int8 KV is measured on rap's decoder: pass a BlockView")
    if decoder is not None:
        from rap.policy.kv_measure import KVOption, decoder_continuation_nll

        options = [KVOption(r, b) for b in bits for r in ratios]
    tables = {b: [] for b in bits}
    tokens = 0
    bar = tqdm(total=len(prompt_lens) * samples, desc="KV penalty", disable=not progress, leave=False)
    for P in prompt_lens:
        span = P + continuation
        n = min(samples, token_stream.numel() // span)
        if n == 0:
            raise ValueError(f"the token stream has {token_stream.numel()} tokens, fewer than one span of {span}")
        sums = {(r, b): 0.0 for r in ratios for b in bits}
        for s in range(n):
            ids = token_stream[s * span:(s + 1) * span][None]
            if decoder is not None:
                for o, v in decoder_continuation_nll(decoder, ids, P, options).items():
                    sums[(o.kv_ratio, o.kv_bits)] += v
            else:
                for r, v in continuation_nll(model, ids, P, ratios).items():
                    sums[(r, 16)] += v
            bar.update(1)
        scored = n * continuation
        tokens = scored
        for b in bits:
            # noise can make a smaller cache look free or better: clamp at 0 and make it monotone
            row = np.maximum.accumulate([max(0.0, (sums[(r, b)] - sums[(1.0, 16)]) / scored) for r in ratios])
            tables[b].append(tuple(float(x) for x in row))
    bar.close()
    method = ("rap's decoder (Ada-KV with the decoder's scorer and split, its flat cache"
              + (", int8 KV" if 8 in bits else "") + ") on the dense model, continuation NLL, measured once"
              if decoder is not None else
              "rap.kv HF-path AdaKV(SnapKV()) on the dense model, continuation NLL, measured once (comparison)")
    return KVPenalty(tuple(prompt_lens), ratios, tuple(tables[16]), method=method, tokens=tokens,
                     int8_table=tuple(tables[8]) if 8 in bits else None)


# ---- surrogate ---------------------------------------------------------------------------------
@dataclass
class MaskSurrogate:
    """Predicts log(PPL(mask)/PPL(dense)) from the drop vector d in {0,1}^2L:

        z = w . d  (w >= 0: each block's "damage")
        y = a * log(1 + z) + b * (exp(c * z) - 1)      a, b, c >= 0

    The link is monotone in z, 0 for the dense mask, concave for moderate damage and explosive
    for heavy damage, the shape measured on SmolLM2 (log-PPL ratio rises steadily over the first
    ~20 removals, flattens, then blows up when most blocks are gone). Fitted by least squares on
    log(1 + y) with Adam; 2L + 3 parameters, evaluation is one dot product. Because y is
    monotone in w . d, the best mask with a given number of attention / FFN blocks kept drops
    the lowest-damage blocks of each kind.
    """

    weights: np.ndarray  # [2L], >= 0
    a: float
    b: float
    c: float
    fit_rmse: float = float("nan")  # on log(1 + y), fitted points
    cv_rmse: float = float("nan")  # on a held-out fifth of the points
    points: int = 0

    def predict_drop(self, drop: np.ndarray) -> np.ndarray:
        """drop: [..., 2L] in {0,1} -> [...] predicted log ratio."""
        z = drop @ self.weights
        return self.a * np.log1p(z) + self.b * np.expm1(self.c * z)

    def __call__(self, mask: BlockMask) -> float:
        return float(self.predict_drop(drop_vector(mask)))

    def to_dict(self) -> dict:
        return {"form": "a*log1p(w.d) + b*expm1(c*w.d)", "weights": [float(x) for x in self.weights],
                "a": self.a, "b": self.b, "c": self.c, "fit_rmse": self.fit_rmse, "cv_rmse": self.cv_rmse,
                "points": self.points}

    @classmethod
    def from_dict(cls, d: dict) -> "MaskSurrogate":
        return cls(np.asarray(d["weights"], dtype=np.float64), float(d["a"]), float(d["b"]), float(d["c"]),
                   d.get("fit_rmse", float("nan")), d.get("cv_rmse", float("nan")), d.get("points", 0))

    @classmethod
    def fit(cls, drops: np.ndarray, log_ratios: np.ndarray, steps: int = 2000, seed: int = 0,
            holdout: float = 0.2) -> "MaskSurrogate":
        """drops: [n, 2L] {0,1}; log_ratios: [n] (negative values count as 0)."""
        drops = np.asarray(drops, dtype=np.float64)
        y = np.maximum(np.asarray(log_ratios, dtype=np.float64), 0.0)
        n = len(y)
        perm = np.random.default_rng(seed).permutation(n)
        n_hold = int(holdout * n) if n >= 20 else 0
        hold, train = perm[:n_hold], perm[n_hold:]
        model = cls._fit(drops, y, steps, seed)
        tgt = np.log1p(y)
        model.fit_rmse = float(np.sqrt(np.mean((np.log1p(model.predict_drop(drops)) - tgt) ** 2)))
        if n_hold:
            cv_model = cls._fit(drops[train], y[train], steps, seed)
            model.cv_rmse = float(np.sqrt(np.mean((np.log1p(cv_model.predict_drop(drops[hold])) - tgt[hold]) ** 2)))
        model.points = n
        return model

    @classmethod
    def _fit(cls, drops: np.ndarray, y: np.ndarray, steps: int, seed: int) -> "MaskSurrogate":
        sp = torch.nn.functional.softplus
        torch.manual_seed(seed)
        D, t = torch.tensor(drops), torch.tensor(np.log1p(y))
        raw_w = torch.full((drops.shape[1],), -1.0, dtype=torch.float64, requires_grad=True)
        raw = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([raw_w, raw], lr=0.03)

        def predict() -> torch.Tensor:
            z = D @ sp(raw_w)
            a, b, c = sp(raw)
            return a * torch.log1p(z) + b * torch.expm1(c * z)

        for _ in range(steps):
            opt.zero_grad()
            loss = ((torch.log1p(predict()) - t) ** 2).mean()
            loss.backward()
            opt.step()
        with torch.no_grad():
            a, b, c = (float(v) for v in sp(raw))
            return cls(sp(raw_w).numpy().copy(), a, b, c)


# ---- the bundle the policies use ----------------------------------------------------------------
_FITTED: dict[str, "QualityModel"] = {}  # QualityModel.from_profile's fits, by the profile's content


@dataclass
class QualityModel:
    """Predicted log(PPL / PPL_dense) of (mask, KV keep ratio, prompt length)."""

    surrogate: MaskSurrogate
    kv_penalty: KVPenalty
    dense_ppl: float = float("nan")
    calibration: dict = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)  # mask_key -> measured calibration log ratio

    @property
    def kv_ratios(self) -> tuple[float, ...]:
        return self.kv_penalty.ratios

    def mask_log_ratio(self, mask: BlockMask) -> float:
        """Measured on the calibration set when this mask was measured, else the surrogate.

        A measured *improvement* over dense counts as 0: on a small calibration set it is noise
        (or overfitting), and no policy should drop blocks it could afford to keep because of it."""
        value = self.measured.get(mask_key(mask))
        return self.surrogate(mask) if value is None else max(0.0, value)

    def log_ratio(self, mask: BlockMask, kv_ratio: float = 1.0, prompt: int = 1) -> float:
        return self.mask_log_ratio(mask) + self.kv_penalty(kv_ratio, prompt)

    def log_ratio_drop(self, drop: np.ndarray, kv_ratio: float = 1.0, prompt: int = 1) -> np.ndarray:
        return self.surrogate.predict_drop(drop) + self.kv_penalty(kv_ratio, prompt)

    def to_dict(self) -> dict:
        return {"surrogate": self.surrogate.to_dict(), "kv_penalty": self.kv_penalty.to_dict(),
                "dense_ppl": self.dense_ppl, "calibration": self.calibration, "measured": self.measured}

    @classmethod
    def from_profile(cls, profile: dict) -> "QualityModel":
        """Without measurements of our own: fit the surrogate to the profile's removal curve
        (PPL after each removal in its order). KV compression is not modelled (ratio 1 only).
        The fit takes seconds and depends only on the profile, so one per profile is kept."""
        key = json.dumps([list(profile["order"]), profile.get("num_layers"), profile.get("dense_ppl"),
                          profile.get("ppl_after")], default=str)
        if key not in _FITTED:
            _FITTED[key] = cls._from_profile(profile)
        return _FITTED[key]

    @classmethod
    def _from_profile(cls, profile: dict) -> "QualityModel":
        order = list(profile["order"])
        L = int(profile.get("num_layers") or len(order) // 2)
        dense = float(profile.get("dense_ppl") or float("nan"))
        curve = profile.get("ppl_after") or []
        drops, ys = [np.zeros(2 * L)], [0.0]
        if math.isfinite(dense) and dense > 0:
            for k, ppl in enumerate(curve[: len(order)], start=1):
                drops.append(drop_vector(BlockMask.from_order(L, order, k)))
                ys.append(math.log(max(float(ppl), dense) / dense))
        if len(ys) < 3:  # no curve: damage grows with the position in the order
            for k in range(1, len(order) + 1):
                drops.append(drop_vector(BlockMask.from_order(L, order, k)))
                ys.append(0.05 * k * k / len(order))
        sur = MaskSurrogate.fit(np.stack(drops), np.array(ys), steps=1500)
        return cls(sur, KVPenalty.zero(), dense, calibration={"source": "profile ppl_after curve"})

    @classmethod
    def from_dict(cls, d: dict) -> "QualityModel":
        return cls(MaskSurrogate.from_dict(d["surrogate"]), KVPenalty.from_dict(d["kv_penalty"]),
                   d.get("dense_ppl", float("nan")), d.get("calibration", {}), dict(d.get("measured", {})))


def design_masks(num_layers: int, order: Sequence[str], count: int, seed: int = 0,
                 max_drop_fraction: float = 0.6) -> list[BlockMask]:
    """Masks to measure for fitting the surrogate: every prefix of the removal order, per-kind
    prefixes, and random masks biased towards blocks the order removes early."""
    rng = np.random.default_rng(seed)
    L = num_layers
    out: list[BlockMask] = [BlockMask.from_order(L, order, k) for k in range(0, len(order) + 1)]
    attn = [b for b in order if b.startswith("attn")]
    ffn = [b for b in order if b.startswith("ffn")]
    for k in range(1, L + 1, max(1, L // 10)):
        out.append(BlockMask.from_drop(L, attn[:k]))
        out.append(BlockMask.from_drop(L, ffn[:k]))
    rank = {b: i for i, b in enumerate(order)}
    names = list(order)
    bias = np.array([1.0 / (1.0 + rank[b] / (0.25 * len(order))) for b in names])
    for _ in range(count):
        k = int(rng.integers(1, max(2, int(max_drop_fraction * 2 * L)) + 1))
        p = bias / bias.sum() if rng.random() < 0.7 else None
        drop = rng.choice(len(names), size=k, replace=False, p=p)
        out.append(BlockMask.from_drop(L, [names[i] for i in drop]))
    seen, unique = set(), []
    for m in out:
        if m not in seen:
            seen.add(m)
            unique.append(m)
    return unique


def measure_many(evaluator: MeasuredEvaluator, masks: Iterable[BlockMask], progress: bool = True,
                 desc: str = "measuring masks") -> list[float]:
    from tqdm.auto import tqdm

    masks = list(masks)
    todo = sum(not evaluator.known(m) for m in masks)
    out = []
    with tqdm(total=todo, desc=desc, disable=not progress or todo == 0, leave=False) as bar:
        for m in masks:
            fresh = not evaluator.known(m)
            out.append(evaluator.log_ratio(m))
            if fresh:
                bar.update(1)
    evaluator.save()
    return out
