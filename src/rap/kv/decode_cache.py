"""The decoder's variable-length KV cache: Ada-KV's per-head budgets in a flat buffer, optionally int8 / int4.

`rap.decode.decoder.Decoder` keeps, for a kept attention layer under Ada-KV, PyramidKV (or int8 / int4 KV),
one `FlatLayerCache` instead of dense [B, Hkv, T, D] buffers:

* keys / values [B * Hkv * T, D] (T = the workspace's compressed cache length); segment
  s = b * Hkv + h (row b, KV head h) owns rows [starts[s], starts[s] + capacity_s), its first
  lengths[s] rows live. Row b's region is [b * Hkv * T, (b + 1) * Hkv * T): after the prefill
  head h gets its kept count len_bh plus a reserve of T - k_b rows (k_b = the row's average
  kept tokens), so the heads of a row together fill exactly Hkv * T rows. The layer then holds
  the same bytes as the uniform dense cache of the same keep ratio, split over heads by score:
  what Ada-KV's "same budget, adaptive allocation" means, in memory that is really freed. Under
  the pyramid presses each layer has its own T (its PyramidKV budget plus the decode reserve,
  rounded like every cache length), so the layers' bytes shrink with depth;
* shapes depend only on (batch bucket, T, bits), never on the request, so the decode step is
  captured as a CUDA graph once per (mask, batch bucket, T) and replayed for any request;
  starts / lengths are device tensors the step reads and bumps (no host sync);
* int8 (`bits=8`): symmetric per-token quantisation, one fp32 scale per (token, KV head) for
  keys and one for values, written at prefill and at every decode append, dequantised inside
  the attend. KIVI quantises keys per channel, which needs a full-precision residual group of
  recent tokens to be appended in groups; per-token scales for both keep appends one row at a
  time (what a captured decode step needs) at the cost of some key precision. transformers'
  `QuantizedCache` (quanto / HQQ backends) re-quantises a Python-side residual and cannot run
  inside rap's captured step, hence this small implementation;
* int4 (`bits=4`): per-(token, KV head) *asymmetric* quantisation, one fp32 (scale, zero) pair per
  row for keys and one for values: zero = min x, scale = (max x - min x) / 15, values in [0, 15]
  stored as two nibbles per uint8 along head_dim (element 2i in the low nibble, 2i + 1 in the high
  one; head_dim must be even): keys / values [rows, D / 2] uint8, scales [rows, 2] fp32. One
  quantise / dequantise pair (`quantize_rows` / `dequantize_rows`, parameterised by bits) serves
  int8 and int4, and the store / attend code is the same for both. Why asymmetric, measured on
  SmolLM2-135M (CPU, fp32): on the needle at 1k / 2k x 7 depths, symmetric int4 (scale =
  max|x| / 7, [-7, 7], 4 bytes a row fewer) scored 8 / 14 cases, asymmetric 11 / 14, the full
  cache and int8 14 / 14 (`benchmarks/results/kv-needle-eval-smollm2-135m-2026-12-02-int4{-sym,}-cpu.json`);
  teacher-forced continuation NLL (`benchmarks/kv_int4_scales.py`, 1024-token prompt, 64 tokens):
  16-bit 2.889, symmetric 3.123, asymmetric 3.035 nats / token. Most of the gain is in the keys
  (asymmetric keys with symmetric values: 3.062): a key row is far from centred (KIVI reports
  outlier key channels, which it quantises per channel; that needs grouped appends, which a
  captured one-token step cannot do). int4 still loses against the full cache (11 / 14 points,
  4 cases worse), so the policy does not offer it (it has no measured KV penalty table).
  A row costs D / 2 + 8 bytes against int8's D + 4: less only for head_dim > 8;
* attention over it: `rap.kv.attention.varlen_attention` (the Triton split-K kernel on CUDA for
  16-bit and int8 caches, the int8 kernel dequantising on load; the PyTorch reference otherwise).
  An int4 cache always dequantises the gathered rows in the PyTorch path (no int4 Triton kernel).

Bytes: `layer_tensor_bytes` lists every tensor a layer allocates; `rap.core.memory.MemoryModel`
charges exactly these (`kv_bytes(..., kv_layout=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rap.errors import RequestError
from rap.kv.attention import triton_available, varlen_attention_torch, varlen_attention_triton
from rap.kv.cache import FlatKV, _segment_rows
from rap.kv.pyramidkv import pyramid_budgets
from rap.kv.scorer import DEFAULT_SCORER

DECODER_PRESSES = ("snapkv", "adakv", "pyramidkv", "ada-pyramidkv")
KV_BITS = (16, 8, 4)
INT4_LEVELS = 15  # int4: values in [0, 15] over each row's [min, max]
ADAKV_ALPHA = 0.2  # Ada-KV's safeguard: every head keeps at least floor(alpha * k) of its own top tokens


@dataclass(frozen=True)
class KVLayout:
    """How the decoder stores a compressed cache: the press that picks tokens and the storage bits.

    press "snapkv": uniform per-head budgets (dense buffers, the decoder's original layout);
    "adakv": head-adaptive budgets (flat buffer); "pyramidkv": PyramidKV's per-layer budgets
    (`rap.kv.pyramidkv.pyramid_budgets`), uniform over a layer's heads (flat buffer, one length per
    layer); "ada-pyramidkv": those layer budgets split over heads by Ada-KV (flat buffer). bits 16:
    the model's dtype; 8: int8 + fp32 scales, 4: packed int4 + fp32 (scale, zero) (flat buffer, any press). window: the observation
    window the pyramid reserves in every layer (the scorer's; only the pyramid presses read it).
    """

    press: str = "adakv"
    bits: int = 16
    window: int = DEFAULT_SCORER.window

    def __post_init__(self) -> None:
        if self.press not in DECODER_PRESSES:
            raise RequestError(f"unknown KV press {self.press!r} for the decoder; choose from "
                               f"{', '.join(DECODER_PRESSES)}")
        if self.bits not in KV_BITS:
            raise RequestError(f"KV bits must be one of {', '.join(map(str, KV_BITS))} (16 = the model's dtype), "
                               f"got {self.bits}")

    @property
    def flat(self) -> bool:
        return self.press != "snapkv" or self.bits != 16

    @property
    def adaptive(self) -> bool:
        """Are a layer's tokens split over its KV heads by Ada-KV (else every head keeps the same count)?"""
        return self.press in ("adakv", "ada-pyramidkv")

    @property
    def pyramid(self) -> bool:
        """Does every layer keep its own PyramidKV budget (else every layer keeps the same)?"""
        return self.press in ("pyramidkv", "ada-pyramidkv")

    @property
    def key(self) -> str:
        return f"{self.press}-{self.bits}"

    def layer_budgets(self, num_layers: int, prompt_tokens: int, tokens: int) -> list[int]:
        """Average kept tokens per KV head of each compressed layer (first to last) for a prompt of
        `prompt_tokens` keeping `tokens` on average: the pyramid, or `tokens` in every layer."""
        if not self.pyramid:
            return [tokens] * num_layers
        return pyramid_budgets(num_layers, prompt_tokens, tokens, self.window)


def layout_for(press: str | None = None, bits: int | None = None, window: int | None = None) -> KVLayout:
    """A `KVLayout` from request fields (None = the defaults: Ada-KV, the model's dtype, the default window)."""
    return KVLayout(press=(press or "adakv").strip().lower(), bits=16 if bits is None else int(bits),
                    window=DEFAULT_SCORER.window if window is None else int(window))


def layer_tensor_bytes(batch: int, kv_heads: int, tokens: int, head_dim: int, dtype_bytes: int,
                       bits: int) -> list[int]:
    """Bytes of every tensor one `FlatLayerCache` allocates: keys, values, (key / value scales), starts, lengths."""
    rows = batch * kv_heads * tokens
    row = head_dim * dtype_bytes if bits == 16 else stored_width(head_dim, bits)  # bytes per stored row
    sizes = [rows * row, rows * row]
    if bits != 16:
        sizes += [rows * scale_width(bits) * 4] * 2
    return sizes + [batch * kv_heads * 8, batch * kv_heads * 8]


def check_head_dim(head_dim: int, bits: int) -> None:
    """int4 packs two values per byte along head_dim: an odd head_dim is refused in one line."""
    if bits == 4 and head_dim % 2:
        raise RequestError(f"int4 KV packs two values per byte along head_dim, which must be even (got "
                           f"{head_dim}); use --kv-bits 8 or 16 for this model")


def stored_width(head_dim: int, bits: int) -> int:
    """Bytes of one quantised row of `head_dim` values: D at int8, D / 2 at int4 (two per byte)."""
    check_head_dim(head_dim, bits)
    return head_dim if bits == 8 else head_dim // 2


def scale_width(bits: int) -> int:
    """fp32 values of quantisation parameters per stored row: 1 (int8: scale), 2 (int4: scale, zero)."""
    return 1 if bits == 8 else 2


def quantize_rows(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (stored rows, fp32 parameters), so that |x - x_hat| <= step / 2 per element:

    bits 8: int8 [..., D], scale [...]: symmetric, step = scale = max|x| / 127, values in [-127, 127];
    bits 4: uint8 [..., D / 2] (two values per byte, low nibble first), [..., 2] = (scale, zero):
    asymmetric, zero = min x, step = scale = (max x - min x) / 15, values in [0, 15]."""
    x = x.float()
    if bits == 8:
        scale = x.abs().amax(-1).clamp_min(1e-8) / 127.0
        return torch.round(x / scale[..., None]).clamp_(-127, 127).to(torch.int8), scale
    check_head_dim(x.shape[-1], bits)
    lo = x.amin(-1)
    scale = (x.amax(-1) - lo).clamp_min(1e-8) / INT4_LEVELS
    u = torch.round((x - lo[..., None]) / scale[..., None]).clamp_(0, INT4_LEVELS).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4), torch.stack((scale, lo), -1)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`quantize_rows`'s inverse up to rounding: stored rows (int8 [..., D], or uint8 [..., D / 2] packed
    int4, told apart by dtype) and their fp32 parameters -> fp32 [..., D]."""
    if q.dtype != torch.uint8:
        return q.float() * scale[..., None]
    u = torch.stack((q & 15, q >> 4), -1).flatten(-2).float()
    return u * scale[..., :1] + scale[..., 1:]


@dataclass(eq=False)
class FlatLayerCache:
    """One kept attention layer's cache in the flat layout (see the module docstring)."""

    keys: torch.Tensor  # [B * Hkv * T, D] model dtype or int8; [B * Hkv * T, D / 2] uint8 (packed int4)
    values: torch.Tensor
    key_scale: torch.Tensor | None  # fp32, int8: [B * Hkv * T] scales; int4: [B * Hkv * T, 2] (scale, zero)
    value_scale: torch.Tensor | None
    starts: torch.Tensor  # [B * Hkv] int64
    lengths: torch.Tensor  # [B * Hkv] int64
    batch: int
    kv_heads: int
    tokens: int  # T: rows per (row, KV head) on average
    positions: int  # prompt + new tokens the workspace serves (its RoPE table length)
    max_length: int = 0  # host bound of the longest segment of the current request (eager paths)

    @classmethod
    def allocate(cls, batch: int, kv_heads: int, tokens: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, bits: int = 16, positions: int | None = None) -> "FlatLayerCache":
        rows = batch * kv_heads * tokens
        store = {8: torch.int8, 4: torch.uint8}.get(bits, dtype)
        width = head_dim if bits == 16 else stored_width(head_dim, bits)
        shape = (rows,) if bits == 8 else (rows, scale_width(bits))
        scale = (lambda: torch.ones(shape, device=device, dtype=torch.float32)) if bits != 16 else (lambda: None)
        # zero-initialised: rows the attend masks must never be NaN (0 * NaN poisons P @ V)
        cache = cls(torch.zeros(rows, width, device=device, dtype=store),
                    torch.zeros(rows, width, device=device, dtype=store), scale(), scale(),
                    torch.zeros(batch * kv_heads, device=device, dtype=torch.long),
                    torch.zeros(batch * kv_heads, device=device, dtype=torch.long), batch, kv_heads, tokens,
                    positions if positions is not None else kv_heads * tokens)
        cache.reset()
        return cache

    @property
    def quantized(self) -> bool:
        return self.key_scale is not None

    @property
    def bits(self) -> int:
        """Storage bits: 16 (the model's dtype), 8 (int8) or 4 (packed int4, uint8 storage)."""
        return 16 if not self.quantized else 4 if self.keys.dtype == torch.uint8 else 8

    @property
    def bound(self) -> int:
        """Static upper bound of any segment's length (sizes the captured step's kernels): a head keeps
        at most its row's whole prompt (< `positions`) plus its reserve (<= T), and never more than
        its row's Hkv * T rows."""
        return min(self.kv_heads * self.tokens, self.positions + self.tokens)

    @property
    def nbytes(self) -> int:
        ts = [self.keys, self.values, self.key_scale, self.value_scale, self.starts, self.lengths]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def reset(self) -> None:
        """Every segment empty, segment s at rows [s * T, (s + 1) * T) (idle bucket rows keep this)."""
        self.starts.copy_(torch.arange(self.starts.numel(), device=self.starts.device) * self.tokens)
        self.lengths.zero_()
        self.max_length = 0

    def _store(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [N, D] into flat rows [N] (quantised on write for int8 / int4)."""
        if self.quantized:
            kq, ks = quantize_rows(k, self.bits)
            vq, vs = quantize_rows(v, self.bits)
            self.keys.index_copy_(0, rows, kq)
            self.values.index_copy_(0, rows, vq)
            self.key_scale.index_copy_(0, rows, ks)
            self.value_scale.index_copy_(0, rows, vs)
        else:
            self.keys.index_copy_(0, rows, k.to(self.keys.dtype))
            self.values.index_copy_(0, rows, v.to(self.values.dtype))

    def write_prompt(self, r0: int, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                     reserve: torch.Tensor | int) -> None:
        """Rows [r0, r0 + n) of the batch keep `keep` [n, Hkv, P] of their prompt keys / values k, v
        [n, Hkv, P, D] (ascending positions per head); each head of row b gets reserve[b] more rows for
        decoding (reserve[b] <= T - k_b, so the row's heads fit in its Hkv * T rows)."""
        n, Hkv, P, D = k.shape
        lens = keep.sum(-1)  # [n, Hkv]
        reserve = torch.as_tensor(reserve, device=k.device).expand(n)
        cap = lens + reserve[:, None]
        first = torch.cumsum(cap, 1) - cap + (r0 + torch.arange(n, device=k.device))[:, None] * (Hkv * self.tokens)
        seg = slice(r0 * Hkv, (r0 + n) * Hkv)
        self.starts[seg] = first.reshape(-1)
        self.lengths[seg] = lens.reshape(-1)
        b, h, t = keep.nonzero(as_tuple=True)  # row-major: segment by segment, positions ascending
        dst = _segment_rows(first.reshape(-1), lens.reshape(-1))
        self._store(dst, k[b, h, t], v[b, h, t])
        self.max_length = max(self.max_length, int(lens.max()))  # live rows (the eager step's bound)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """One new token per segment of the first n rows: k, v [n, Hkv, 1, D] (capturable: no host sync)."""
        m = k.shape[0] * self.kv_heads
        rows = self.starts[:m] + self.lengths[:m]
        D = k.shape[-1]
        self._store(rows, k.reshape(-1, D), v.reshape(-1, D))
        self.lengths[:m] += 1

    def attend(self, q: torch.Tensor, scaling: float, max_length: int | None = None) -> torch.Tensor:
        """q [B, H, 1, D] -> [B, H, 1, D] over every segment's live rows. max_length: a host bound of the
        segment lengths (default: the static `bound`, as the captured step needs)."""
        L = self.bound if max_length is None else max_length
        n, m = q.shape[0], q.shape[0] * self.kv_heads  # the first n rows (the eager step skips idle bucket rows)
        flat = FlatKV(self.keys, self.values, self.starts[:m], self.lengths[:m], L, n, self.kv_heads)
        if q.is_cuda and triton_available() and self.bits != 4:  # the kernel reads 16-bit and int8 rows
            return varlen_attention_triton(q, flat, scaling, self.key_scale, self.value_scale).transpose(1, 2)
        if not self.quantized:
            return varlen_attention_torch(q, flat, scaling).transpose(1, 2)
        return self._attend_quantized(q, scaling, L)

    def _attend_quantized(self, q: torch.Tensor, scaling: float, L: int) -> torch.Tensor:
        """The PyTorch attend over an int8 / int4 cache: gather each segment's rows, dequantise, softmax."""
        B, H, _, D = q.shape
        S, g = B * self.kv_heads, H // self.kv_heads
        starts, lengths = self.starts[:S], self.lengths[:S]
        pos = torch.arange(max(L, 1), device=q.device)
        live = pos[None, :] < lengths[:, None]  # [S, L]
        rows = torch.where(live, starts[:, None] + pos[None, :], torch.zeros_like(pos)[None, :])
        keys = dequantize_rows(self.keys[rows], self.key_scale[rows])  # [S, L, D]
        values = dequantize_rows(self.values[rows], self.value_scale[rows])
        scores = torch.bmm(q.reshape(S, g, D).float(), keys.transpose(1, 2)) * scaling  # [S, g, L]
        scores = scores.masked_fill(~live[:, None, :], float("-inf"))
        out = torch.bmm(scores.softmax(-1), values)  # [S, g, D]
        return out.view(B, H, 1, D).to(q.dtype)
