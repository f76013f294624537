"""Attention over the flat variable-length cache layout (`rap.kv.cache.FlatKV`), GQA-aware.

Three implementations of one function, `varlen_attention(query, kv, scaling)`:
  * `varlen_attention_torch`: the PyTorch reference (CPU and GPU). Gathers each segment into a
    [segments, max_length, D] view, masks, softmaxes in float32. Pads only in the transient compute,
    never in the stored cache;
  * `varlen_attention_triton`: split-K flash-decoding over segments (CUDA). One program per
    (segment, key split, block of query rows): it loads all query heads of the KV head's group (GQA:
    the keys are read once for the whole group), walks its key range with an online softmax; a
    second kernel merges all splits of a query row from one [splits, D] tile. Splits are sized so a
    small decode problem becomes about one key tile per program (short critical path). Used on CUDA
    when Triton imports; `TRITON_INTERPRET=1` runs it on the CPU (float32 only: the interpreter's
    bf16 dot is wrong). H100 numbers: benchmarks/results/kv-2026-11-23-h100.json;
  * the float64 loop in the tests, the obviously-correct reference both are checked against.

Queries may be more than one token (a question appended to a compressed context): query j of q
new tokens sees, in each segment, the rows up to lengths - q + j (the new tokens are the last q
rows of every segment, in order).

How this meets transformers: `use_varlen_attention(model)` registers "rap_varlen" in
`AttentionInterface` (and `sdpa_mask` under the same name in `AttentionMaskInterface`) and
switches the model to it. Llama-style attention modules call
`attention_interface(module, q, k, v, mask, scaling=...)` with whatever `past_key_values.update`
returned; our function runs varlen attention when that is a `FlatKV` and otherwise calls
transformers' own `sdpa_attention_forward` unchanged, so prefill, uncompressed caches and
sliding-window layers behave exactly as under "sdpa". We chose this over making the cache return
padded dense tensors because the 4D mask transformers builds is shared by all heads, so it cannot
express per-head lengths; padding to the longest head would also bring back the memory that
head-adaptive budgets save. Registration goes through `rap.core.hf`.
"""

from __future__ import annotations

import logging
import math
import os
from functools import lru_cache

import torch

from rap.core.hf import register_attention, sdpa_attention, use_attention
from rap.kv.cache import FlatKV

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "rap_varlen"


# ---- PyTorch reference ----------------------------------------------------------------------
def varlen_attention_torch(query: torch.Tensor, kv: FlatKV, scaling: float) -> torch.Tensor:
    """query [B, Hq, q, D] -> output [B, q, Hq, D] (float32 math, query's dtype out)."""
    B, Hq, q, D = query.shape
    H = kv.num_kv_heads
    g, S, L = Hq // H, B * H, max(kv.max_length, 1)
    pos = torch.arange(L, device=query.device)
    rows = kv.starts.unsqueeze(1) + pos  # [S, L]
    rows = torch.where(pos < kv.lengths.unsqueeze(1), rows, torch.zeros_like(rows))
    keys, values = kv.keys[rows].float(), kv.values[rows].float()  # [S, L, D]
    queries = query.reshape(S, g * q, D).float()  # row r = (group member) * q + (query index)
    scores = torch.bmm(queries, keys.transpose(1, 2)) * scaling  # [S, g*q, L]
    j = torch.arange(q, device=query.device).repeat(g)  # query index of each row
    limit = kv.lengths.unsqueeze(1) - q + j  # last visible row, [S, g*q]
    scores = scores.masked_fill(pos.view(1, 1, L) > limit.unsqueeze(2), float("-inf"))
    out = torch.bmm(torch.softmax(scores, dim=-1), values)  # [S, g*q, D]
    return out.view(B, Hq, q, D).transpose(1, 2).contiguous().to(query.dtype)


# ---- Triton kernel --------------------------------------------------------------------------
@lru_cache(maxsize=1)
def triton_available() -> bool:
    if os.environ.get("RAP_KV_NO_TRITON") == "1":
        return False
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


@lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def partial_kernel(Q, K, V, KS, VS, STARTS, LENS, O_PART, M_PART, L_PART,
                       scale, q_len, m_rows, num_splits, split_size,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, IEEE: tl.constexpr, QUANT: tl.constexpr):
        s = tl.program_id(0)
        sp = tl.program_id(1)
        mb = tl.program_id(2)
        start = tl.load(STARTS + s).to(tl.int64)
        length = tl.load(LENS + s).to(tl.int32)
        lo = sp * split_size
        hi = tl.minimum(lo + split_size, length)
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < m_rows
        limit = length - q_len + rows % q_len  # last visible key of each query row
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q_ptrs = Q + (s * m_rows + rows).to(tl.int64)[:, None] * HEAD_DIM + d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            k_ok = offs < hi
            kv_off = (start + offs.to(tl.int64))[:, None] * HEAD_DIM + d[None, :]
            k = tl.load(K + kv_off, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            if QUANT:  # int8 rows with one fp32 scale each (rap.kv.decode_cache): dequantise on load
                k_scale = tl.load(KS + start + offs.to(tl.int64), mask=k_ok, other=0.0)
                k = (k.to(tl.float32) * k_scale[:, None]).to(q.dtype)
            if IEEE:  # float32 caches: true fp32 products (TF32 would cost ~1e-3 relative error)
                qk = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                qk = tl.dot(q, tl.trans(k)) * scale
            visible = k_ok[None, :] & (offs[None, :] <= limit[:, None])
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp(qk - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + kv_off, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            if QUANT:
                v_scale = tl.load(VS + start + offs.to(tl.int64), mask=k_ok, other=0.0)
                v = (v.to(tl.float32) * v_scale[:, None]).to(q.dtype)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        part = (s * num_splits + sp) * m_rows + rows
        tl.store(M_PART + part, m_i, mask=row_ok)
        tl.store(L_PART + part, l_i, mask=row_ok)
        tl.store(O_PART + part.to(tl.int64)[:, None] * HEAD_DIM + d[None, :], acc,
                 mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def combine_kernel(O_PART, M_PART, L_PART, OUT, m_rows, num_splits,
                       HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per (segment, query row): all splits' partials are loaded at once (one
        # [splits, D] tile), so the merge costs one memory round trip instead of one per split.
        pid = tl.program_id(0)
        s = pid // m_rows
        r = pid % m_rows
        sp = tl.arange(0, BLOCK_S)
        sp_ok = sp < num_splits
        part = (s * num_splits + sp) * m_rows + r
        m = tl.load(M_PART + part, mask=sp_ok, other=-1.0e30)
        l = tl.load(L_PART + part, mask=sp_ok, other=0.0)
        w = tl.exp(m - tl.max(m, 0))
        denom = tl.sum(w * l, 0)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        o = tl.load(O_PART + part.to(tl.int64)[:, None] * HEAD_DIM + d[None, :],
                    mask=sp_ok[:, None] & d_ok[None, :], other=0.0)
        out = tl.sum(o * w[:, None], 0) / denom
        tl.store(OUT + (s * m_rows + r).to(tl.int64) * HEAD_DIM + d, out.to(OUT.dtype.element_ty), mask=d_ok)

    return partial_kernel, combine_kernel


@lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":  # TRITON_INTERPRET=1 on the CPU (kernel tests without a GPU)
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


MAX_SPLITS = 128  # the merge kernel loads all splits of a row as one tile


def split_plan(segments: int, max_length: int, m_rows: int, num_sms: int,
               block_m: int, block_n: int) -> tuple[int, int]:
    """(split_size, num_splits): about four programs per SM (short critical path: a small decode
    problem becomes one key tile per program), at most MAX_SPLITS splits."""
    m_blocks = -(-m_rows // block_m)
    wanted = max(1, (4 * num_sms) // max(1, segments * m_blocks))
    n = max(max_length, 1)
    split = max(block_n, -(-n // wanted), -(-n // MAX_SPLITS))
    split = -(-split // block_n) * block_n
    return split, -(-n // split)


def varlen_attention_triton(query: torch.Tensor, kv: FlatKV, scaling: float,
                            key_scale: torch.Tensor | None = None,
                            value_scale: torch.Tensor | None = None) -> torch.Tensor:
    """query [B, Hq, q, D] -> output [B, q, Hq, D]; same contract as `varlen_attention_torch`.

    key_scale, value_scale: fp32 [rows] for an int8 cache (keys / values int8, one scale per row),
    dequantised as they are loaded; the queries then stay in their own dtype."""
    partial_kernel, combine_kernel = _kernels()
    B, Hq, q, D = query.shape
    H = kv.num_kv_heads
    S, M = B * H, (Hq // H) * q
    quant = key_scale is not None
    queries = query.reshape(S, M, D).to(query.dtype if quant else kv.keys.dtype).contiguous()
    if not quant:
        key_scale = value_scale = queries  # unused pointers (QUANT is a constexpr False)
    keys, values = kv.keys.contiguous(), kv.values.contiguous()
    block_m = min(64, max(16, _next_pow2(M)))
    block_n = 64
    block_d = max(16, _next_pow2(D))
    split, num_splits = split_plan(S, kv.max_length, M, _num_sms(query.device), block_m, block_n)
    m_blocks = -(-M // block_m)
    dev = query.device
    o_part = torch.empty(S * num_splits * M, D, device=dev, dtype=torch.float32)
    m_part = torch.empty(S * num_splits * M, device=dev, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    partial_kernel[(S, num_splits, m_blocks)](
        queries, keys, values, key_scale, value_scale, kv.starts, kv.lengths, o_part, m_part, l_part,
        float(scaling), q, M, num_splits, split,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=queries.dtype == torch.float32,
        QUANT=quant, num_warps=4, num_stages=2)
    out = torch.empty(S, M, D, device=dev, dtype=query.dtype)
    combine_kernel[(S * M,)](o_part, m_part, l_part, out, M, num_splits,
                             HEAD_DIM=D, BLOCK_S=max(2, _next_pow2(num_splits)), BLOCK_D=block_d, num_warps=4)
    return out.view(B, Hq, q, D).transpose(1, 2).contiguous()


def varlen_attention(query: torch.Tensor, kv: FlatKV, scaling: float) -> torch.Tensor:
    """Triton on CUDA (unless RAP_KV_NO_TRITON=1), the PyTorch reference elsewhere."""
    if query.is_cuda and triton_available():
        return varlen_attention_triton(query, kv, scaling)
    return varlen_attention_torch(query, kv, scaling)


# ---- transformers integration ---------------------------------------------------------------
def attention_forward(module: torch.nn.Module, query: torch.Tensor, key, value, attention_mask,
                      scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """An `AttentionInterface` function: varlen attention for `FlatKV`, transformers' SDPA otherwise."""
    if isinstance(key, FlatKV):
        if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
            raise NotImplementedError("compressed KV caches do not support logit softcapping or attention sinks")
        scale = scaling if scaling is not None else getattr(module, "scaling", 1.0 / math.sqrt(query.shape[-1]))
        return varlen_attention(query, key, scale), None
    return sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register_varlen_attention() -> str:
    return register_attention(ATTN_IMPLEMENTATION, attention_forward)


def use_varlen_attention(model: torch.nn.Module) -> None:
    """Switch `model` to "rap_varlen" (= SDPA for ordinary caches, so safe to leave switched on)."""
    register_varlen_attention()
    use_attention(model, ATTN_IMPLEMENTATION)
