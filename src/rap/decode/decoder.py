"""Fast masked decoding: a static KV cache for kept attention blocks only, one captured graph per mask.

`Decoder(view).generate(prompts, max_new_tokens, mask=...)` runs its own compact forward pass over
the Hugging Face model's weights (no copies) instead of `model.generate`:

* prefill: eager, one SDPA call per kept attention block (cuDNN / flash / memory-efficient kernels),
  writing keys and values straight into the static cache; each block's tensors are freed before
  the next block runs, so the peak is one block's transients (what `rap.core.memory` counts);
* decode: one step = embedding -> kept blocks -> norm -> lm_head -> greedy or sampled pick ->
  stop-token bookkeeping, all on the device. On CUDA that step is captured as a
  `torch.cuda.CUDAGraph` per (mask, batch bucket, cache length, greedy/sampled) and cached: a
  dropped block is simply absent from the graph, so every byte a mask drops is time saved, and
  switching back to a mask seen before is a dictionary lookup. On CPU the same step runs eagerly.

Why our own step rather than transformers' pieces (measured on an H100, Llama-2-7B shape, batch 1,
benchmarks/results/decode-2026-11-23.json): `generate` with its dynamic cache decodes at 43 tok/s
(20% of the bandwidth roofline; Python-bound); with a `StaticCache`, which makes transformers
compile the forward (reduce-overhead), it reaches 124 tok/s (57%), but only for the dense model:
a dropped attention block's `SkippedCacheLayer` is not compileable, and every mask would be a new
whole-model compile. This path reaches 169 tok/s (78%) dense, and a new mask costs ~50 ms of
capture because the compiled unit is one block, shared by all layers and masks. It is gpt-fast's
recipe on top of the HF modules' own parameters; the layer math mirrors transformers'
Llama/Mistral/Qwen2/Qwen3 code op for op (checked against transformers 5.17 and 5.23), and
Gemma 3's (checked against 5.24: (1 + w) RMSNorms in fp32, q/k norms, post-attention and
pre/post-feedforward norms, sqrt(hidden)-scaled embeddings, gelu-tanh MLP, local and global RoPE
tables, sliding-window layers, final logit softcapping), so greedy tokens equal `generate`'s.

Layout. Cache column j of row b holds the token at padded position j; prompts are left-padded to
the longest one, so row b's real tokens start at column `pad[b]` and its RoPE position is
`j - pad[b] + shift[b]` (= cumsum of the attention mask - 1, as in `generate`; shift is 0 without
KV compression). Keys before `pad[b]` and after the current column are masked. Each kept
attention layer owns a [B, Hkv, T, D] key and value buffer (zero-initialised: masked garbage
must never be NaN, since 0 * NaN poisons P @ V); buffers live per (batch bucket, T, RoPE length)
workspace and are shared by every mask's graph, so the resident KV is that of the union of kept
attention layers over the cached graphs. `release()` frees graphs and buffers.

KV keep ratio (`generate(..., kv_ratio=r, kv_press=..., kv_bits=...)`, r < 1): right after its
prefill, each kept attention layer scores its prompt with the one SnapKV scorer
(`rap.kv.scorer.SnapKVScorer`, also behind rap.kv's HF-path presses and the policy's KV penalty;
the observation window always ranks first) and row b keeps k_b = max(1, ceil(r * P_b)) tokens per
KV head on average:

* kv_press="adakv" (the default): Ada-KV. The row's Hkv * k_b tokens go to the top scores of all
  KV heads together, each head first keeping its own top floor(0.2 * k_b) (Ada-KV's safeguard), in
  a `rap.kv.decode_cache.FlatLayerCache`: per-(row, KV head) segments in one flat buffer, read by
  the varlen decode attention (`rap.kv.attention`: the Triton kernel on CUDA, the PyTorch
  reference on CPU). Its shapes depend only on (batch bucket, cache length, bits), so the step is
  captured as before; a segment's length lives on the device;
* kv_press="snapkv": uniform per-head budgets in the dense buffers [B, Hkv, T, D]: row b's kept
  tokens sit in ascending order in columns [K - k_b, K) (K = max_b k_b), decoding starts at column
  K and `pad[b]` = K - k_b masks the rest;
* kv_bits=8: int8 keys and values with one fp32 scale per (token, KV head), in the flat cache
  (any ratio, either press), quantised on write and dequantised in the attend.

Either way `shift[b]` = P_b - k_b keeps every decoded token at its true RoPE position, only the
layer being compressed ever holds its full prompt K/V (the transient q, k, v of its prefill), and
the cache holds `MemoryModel(kv_length_quantum=LENGTH_QUANTUM).kv_bytes(..., kv_layout=...)`
bytes exactly (the compressed length rounded up like every cache length).

Why this module is long (~1,200 lines): it holds rap's layer math (shared with rap.core.forward, one
screen per piece) and the Decoder, whose prefill, KV compression, graph cache and sampling share
one workspace (the static buffers and the captured graphs read the same tensors). Moving the layer
math to a module of its own and the Decoder's jobs into a `decode/` package is the part of the
layout issue still open.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rap.errors import BudgetError, RequestError, UnsupportedModelError
from rap.core.hf import rotary_tables, sdpa_attention
from rap.kv.decode_cache import ADAKV_ALPHA, FlatLayerCache, KVLayout, layout_for
from rap.kv.scorer import DEFAULT_SCORER, SnapKVScorer, adaptive_keep, uniform_keep
from rap.core.mask import BlockMask
from rap.core.memory import PREFILL_CHUNK_TOKENS, MemoryModel, Request, format_bytes, prefill_rows
from rap.core.model import BlockView
from rap.core.plan import DROP, DTYPE, Plan
from rap.core.quant import quantize_weight, storage_bytes, weight_level

log = logging.getLogger(__name__)

DECODE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
# RoPE variants whose cos/sin depend only on the position (not on the current sequence length)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)
LENGTH_QUANTUM = 64  # cache lengths are rounded up to this, so nearby requests share a graph


# ---- the layer math (pure functions over tensors, so torch.compile traces each once) -------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool = False) -> torch.Tensor:
    """transformers' LlamaRMSNorm, op for op (normalise in fp32, scale in the input dtype); with
    `offset`, Gemma3RMSNorm: scale by (1 + weight) in fp32, then cast back."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (h * (1.0 + weight.float())).to(dtype)
    return weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D]; cos/sin [B, 1, S, D]."""
    return (x * cos) + (rotate_half(x) * sin)


@dataclass(eq=False)
class AttnWeights:
    """One attention block's parameters: the HF module's own tensors (see Decoder's `fuse_projections`)."""

    norm_w: torch.Tensor
    norm_eps: float
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    bo: torch.Tensor | None
    q_norm_w: torch.Tensor | None  # Qwen3: RMSNorm over head_dim before RoPE
    k_norm_w: torch.Tensor | None
    qk_eps: float
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    window: int | None  # sliding window in tokens, or None
    module: nn.Module  # for transformers' SDPA (rap.core.hf.sdpa_attention) on the eager path
    wqkv: torch.Tensor | None = None  # [q; k; v] rows, only with fuse_projections
    bqkv: torch.Tensor | None = None
    norm_offset: bool = False  # Gemma: every RMSNorm scales by (1 + w)
    post_norm_w: torch.Tensor | None = None  # Gemma: post_attention_layernorm on the block's output
    rope: int = 0  # which RoPE table (Gemma: local for sliding layers, global for full ones)


@dataclass(eq=False)
class FfnWeights:
    norm_w: torch.Tensor
    norm_eps: float
    wg: torch.Tensor
    wu: torch.Tensor
    wd: torch.Tensor
    bg: torch.Tensor | None
    bu: torch.Tensor | None
    bd: torch.Tensor | None
    wgu: torch.Tensor | None = None  # [gate; up] rows, only with fuse_projections
    bgu: torch.Tensor | None = None
    norm_offset: bool = False
    post_norm_w: torch.Tensor | None = None  # Gemma: post_feedforward_layernorm on the block's output
    act: str = "silu"  # or "gelu_tanh" (Gemma's gelu_pytorch_tanh)


def project_qkv(x: torch.Tensor, a: AttnWeights, cos: torch.Tensor, sin: torch.Tensor):
    """x [B, S, hidden] -> q [B, H, S, D], k, v [B, Hkv, S, D], normed and rotated as in HF."""
    B, S, _ = x.shape
    h = rms_norm(x, a.norm_w, a.norm_eps, a.norm_offset)
    if a.wqkv is not None:
        q, k, v = F.linear(h, a.wqkv, a.bqkv).split(
            [a.heads * a.head_dim, a.kv_heads * a.head_dim, a.kv_heads * a.head_dim], dim=-1)
    else:
        q, k, v = F.linear(h, a.wq, a.bq), F.linear(h, a.wk, a.bk), F.linear(h, a.wv, a.bv)
    del h  # eager prefill: the normed input must not outlive the projections (rap.core.memory counts it so)
    q = q.view(B, S, a.heads, a.head_dim)
    k = k.view(B, S, a.kv_heads, a.head_dim)
    v = v.view(B, S, a.kv_heads, a.head_dim).transpose(1, 2)
    if a.q_norm_w is not None:
        q = rms_norm(q, a.q_norm_w, a.qk_eps, a.norm_offset)
        k = rms_norm(k, a.k_norm_w, a.qk_eps, a.norm_offset)
    q = rope(q.transpose(1, 2), cos, sin)  # rebinding frees the unrotated q before k is rotated
    k = rope(k.transpose(1, 2), cos, sin)
    return q, k, v


def ffn_block(x: torch.Tensor, f: FfnWeights) -> torch.Tensor:
    """x + post_norm?(down(act(gate(norm x)) * up(norm x)))."""
    h = rms_norm(x, f.norm_w, f.norm_eps, f.norm_offset)
    if f.wgu is not None:
        g, u = F.linear(h, f.wgu, f.bgu).chunk(2, dim=-1)
    else:
        g, u = F.linear(h, f.wg, f.bg), F.linear(h, f.wu, f.bu)
    g = F.gelu(g, approximate="tanh") if f.act == "gelu_tanh" else F.silu(g)
    y = F.linear(g * u, f.wd, f.bd)
    if f.post_norm_w is not None:
        y = rms_norm(y, f.post_norm_w, f.norm_eps, f.norm_offset)
    return x + y


def attn_output(x: torch.Tensor, o: torch.Tensor, a: AttnWeights) -> torch.Tensor:
    """The residual update of an attention block: x + post_norm?(o_proj(o)); o [B, S, H * D]."""
    y = F.linear(o, a.wo, a.bo)
    if a.post_norm_w is not None:
        y = rms_norm(y, a.post_norm_w, a.norm_eps, a.norm_offset)
    return x + y


def attend_static(q, kc, vc, valid, scaling: float, impl: str):
    """One query token against the whole static cache, masked.

    q [B, H, 1, D]; kc, vc [B, Hkv, T, D]; valid [B, T] bool. Query heads that share a KV head are
    packed into the query-length axis ([B, Hkv, G, D]), so each cached key is read once (GQA).
    """
    B, H, _, D = q.shape
    Hkv = kc.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv, D)
    if impl == "matmul":
        s = torch.matmul(qg, kc.transpose(-1, -2)).float() * scaling
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
        o = torch.matmul(s.softmax(-1).to(vc.dtype), vc)
    else:
        o = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=valid[:, None, None, :], scale=scaling)
    return o.reshape(B, H, 1, D)


def attn_decode_static(x, a: AttnWeights, cos, sin, kc, vc, col, valid, impl: str):
    """Decode-step attention block over a static cache (the captured path). x [B, 1, hidden]."""
    B = x.shape[0]
    q, k, v = project_qkv(x, a, cos, sin)
    kc.index_copy_(2, col, k)
    vc.index_copy_(2, col, v)
    o = attend_static(q, kc, vc, valid, a.scaling, impl)
    return attn_output(x, o.transpose(1, 2).reshape(B, 1, a.heads * a.head_dim), a)


def attn_decode_flat(x, a: AttnWeights, cos, sin, cache: FlatLayerCache, max_length: int | None = None):
    """Decode-step attention block over a flat (Ada-KV / int8) cache: append this token to every
    (row, KV head) segment, attend over each segment's live rows. x [B, 1, hidden]. max_length None:
    the static bound (captured step); else a host bound of the live lengths (eager)."""
    B = x.shape[0]
    q, k, v = project_qkv(x, a, cos, sin)
    cache.append(k, v)
    o = cache.attend(q, a.scaling, max_length)
    return attn_output(x, o.transpose(1, 2).reshape(B, 1, a.heads * a.head_dim), a)


def final_logits(x: torch.Tensor, norm_w, eps: float, lm_w, lm_b, offset: bool = False,
                 softcap: float | None = None) -> torch.Tensor:
    """Last position's logits in fp32, as `generate` sees them. x [B, S, hidden] -> [B, V].
    `softcap` (Gemma's final_logit_softcapping): cap * tanh(logits / cap), in the model dtype as HF does."""
    logits = F.linear(rms_norm(x[:, -1], norm_w, eps, offset), lm_w, lm_b)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.float()


# ---- the layer weights, read from the HF modules (no copies) -----------------------------------------
def is_gemma(view: BlockView) -> bool:
    return view.config.model_type == "gemma3_text"


def norm_eps(norm: nn.Module) -> float:
    """LlamaRMSNorm keeps `variance_epsilon`, Gemma3RMSNorm `eps`."""
    return float(norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps)


def embed_scale(view: BlockView) -> torch.Tensor | None:
    """Gemma scales embeddings by sqrt(hidden), rounded to the model dtype as its embedding module does."""
    if not is_gemma(view):
        return None
    return torch.tensor(view.config.hidden_size ** 0.5, device=view.device).to(view.dtype)


def rope_kinds(view: BlockView) -> tuple[str | None, ...]:
    """The RoPE tables a model needs: one (None) for Llama-style models, one per layer type for Gemma 3
    (local base for sliding layers, global base and scaling for full ones)."""
    if is_gemma(view):
        return tuple(sorted(set(view.config.layer_types)))
    return (None,)


def check_static_rope(view: BlockView) -> None:
    rope_type = getattr(view.model.model.rotary_emb, "rope_type", "default")
    types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
    for t in types:
        if t not in STATIC_ROPE_TYPES:
            raise UnsupportedModelError(f"RoPE type {t!r} depends on the sequence length; "
                                        f"rap's forward supports {', '.join(STATIC_ROPE_TYPES)}")


def rope_tables(view: BlockView, length: int, kinds: Sequence[str | None] | None = None):
    """cos, sin [R, length, D] for positions 0..length-1, one row per RoPE kind, from the model's own
    rotary module (so values equal transformers')."""
    kinds = rope_kinds(view) if kinds is None else kinds
    rotary = view.model.model.rotary_emb
    pos = torch.arange(length, device=view.device)[None]
    probe = torch.empty(0, device=view.device, dtype=view.dtype)
    tables = [rotary_tables(rotary, probe, pos, kind) for kind in kinds]
    return torch.stack([c[0] for c, _ in tables]), torch.stack([s[0] for _, s in tables])


def attn_weights(view: BlockView, i: int, kinds: Sequence[str | None] | None = None) -> AttnWeights:
    """Layer i's attention block as rap's layer functions read it."""
    layer, m = view.layers[i], view.attention_module(i)
    s = view.shape
    gemma = is_gemma(view)
    if gemma and getattr(view.config, "attn_logit_softcapping", None) is not None:
        raise UnsupportedModelError("attention logit softcapping is not implemented on rap's forward")
    q_norm, k_norm = getattr(m, "q_norm", None), getattr(m, "k_norm", None)
    window = getattr(m, "sliding_window", "absent")
    if window == "absent":  # Mistral keeps the window in its config, Qwen2/3 and Gemma 3 per layer
        window = getattr(view.config, "sliding_window", None) if view.config.model_type == "mistral" else None
    kinds = rope_kinds(view) if kinds is None else kinds
    rope = kinds.index(view.config.layer_types[i]) if gemma else 0
    return AttnWeights(
        norm_w=layer.input_layernorm.weight, norm_eps=norm_eps(layer.input_layernorm),
        wq=m.q_proj.weight, wk=m.k_proj.weight, wv=m.v_proj.weight, wo=m.o_proj.weight,
        bq=m.q_proj.bias, bk=m.k_proj.bias, bv=m.v_proj.bias, bo=m.o_proj.bias,
        q_norm_w=None if q_norm is None else q_norm.weight, k_norm_w=None if k_norm is None else k_norm.weight,
        qk_eps=1e-6 if q_norm is None else norm_eps(q_norm),
        heads=s.num_heads, kv_heads=s.num_kv_heads, head_dim=s.head_dim, scaling=float(m.scaling),
        window=window, module=m, norm_offset=gemma,
        post_norm_w=layer.post_attention_layernorm.weight if gemma else None, rope=rope)


def ffn_weights(view: BlockView, i: int) -> FfnWeights:
    """Layer i's FFN block as rap's layer functions read it."""
    layer, m = view.layers[i], view.mlp_module(i)
    gemma = is_gemma(view)
    act = getattr(view.config, "hidden_activation" if gemma else "hidden_act", None) or "silu"
    if act in ("silu", "swish"):
        act = "silu"
    elif act == "gelu_pytorch_tanh":
        act = "gelu_tanh"
    else:
        raise UnsupportedModelError(f"rap's forward implements silu and gelu_pytorch_tanh MLPs, not {act!r}")
    pre = layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm
    return FfnWeights(norm_w=pre.weight, norm_eps=norm_eps(pre),
                      wg=m.gate_proj.weight, wu=m.up_proj.weight, wd=m.down_proj.weight,
                      bg=m.gate_proj.bias, bu=m.up_proj.bias, bd=m.down_proj.bias, norm_offset=gemma,
                      post_norm_w=layer.post_feedforward_layernorm.weight if gemma else None, act=act)


SNAPKV_WINDOW = DEFAULT_SCORER.window  # kept for callers; the scorer is rap.kv.scorer.DEFAULT_SCORER
SNAPKV_KERNEL = DEFAULT_SCORER.kernel


@dataclass(frozen=True, eq=False)
class KeepPlan:
    """Which prompt tokens a compressed prefill keeps: row b keeps `kept[b]` tokens per KV head on
    average. pad [n]: first real prompt column per row. Dense (uniform SnapKV) caches: every head
    keeps its top kept[b] into cache columns [width - kept[b], width). Flat caches (`adaptive`, or
    int8): the row's Hkv * kept[b] tokens, split over heads by Ada-KV (or uniformly), go to the
    row's `FlatLayerCache` segments with `reserve[b]` free rows per head for decoding."""

    pad: torch.Tensor
    kept: torch.Tensor
    width: int
    scorer: SnapKVScorer = DEFAULT_SCORER
    adaptive: bool = False
    reserve: torch.Tensor | None = None
    everything: bool = False  # keep every real prompt token (int8 at ratio 1): no scoring
    r0: int = 0  # first batch row of this prefill chunk (flat caches)


def snapkv_scores(q: torch.Tensor, k: torch.Tensor, pad: torch.Tensor, scaling: float,
                  scorer: SnapKVScorer = DEFAULT_SCORER) -> torch.Tensor:
    """SnapKV importance of every prompt key per (row, KV head): float32 [n, Hkv, P]; the one scorer,
    `rap.kv.scorer.SnapKVScorer` (q [n, H, P, D], k [n, Hkv, P, D], pad [n])."""
    return scorer(q, k, scaling, pad)


def kept_columns(scores: torch.Tensor, kept: torch.Tensor, width: int) -> torch.Tensor:
    """Prompt columns to keep, [n, Hkv, width]: row b's top kept[b] by score per head (ties: the
    earlier column), ascending and right-aligned; the first width - kept[b] entries are column 0,
    placeholders that the row's padding masks."""
    n, Hkv, P = scores.shape
    cols = torch.arange(P, device=scores.device).expand(n, Hkv, P)
    chosen = torch.where(uniform_keep(scores, kept), cols, -1)
    return chosen.sort(-1).values[..., P - width:].clamp_min(0)


def keep_prompt(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                plan: KeepPlan, scaling: float) -> None:
    """Write the SnapKV-kept prompt keys and values of rows [0, n) into cache columns [0, plan.width)."""
    n, _, _, D = k.shape
    idx = kept_columns(snapkv_scores(q, k, plan.pad, scaling, plan.scorer), plan.kept, plan.width)
    idx = idx[..., None].expand(-1, -1, -1, D)
    kc[:n, :, :plan.width] = k.gather(2, idx)
    vc[:n, :, :plan.width] = v.gather(2, idx)


def keep_prompt_flat(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: FlatLayerCache, plan: KeepPlan,
                     scaling: float) -> None:
    """Write the kept prompt keys and values of batch rows [plan.r0, plan.r0 + n) into a flat cache:
    Ada-KV's head-adaptive split of each row's Hkv * kept[b] tokens (or a uniform one)."""
    n, Hkv, P, _ = k.shape
    real = torch.arange(P, device=k.device)[None, :] >= plan.pad[:, None]  # [n, P]
    if plan.everything:
        keep = real[:, None, :].expand(n, Hkv, P)
    else:
        scores = snapkv_scores(q, k, plan.pad, scaling, plan.scorer)
        keep = (adaptive_keep(scores, plan.kept, ADAKV_ALPHA) if plan.adaptive else uniform_keep(scores, plan.kept))
    cache.write_prompt(plan.r0, k, v, keep, plan.reserve)


def prefill_attention(x: torch.Tensor, a: AttnWeights, cos: torch.Tensor, sin: torch.Tensor, kc: torch.Tensor,
                      vc: torch.Tensor, attn_mask: torch.Tensor | None, plan: KeepPlan | None = None,
                      flat: FlatLayerCache | None = None) -> torch.Tensor:
    """One attention block over a whole prompt (eager), writing its K/V into the static cache
    (all of it, or with a `plan` the SnapKV-kept columns only, scored before attention runs).

    Through transformers' SDPA wrapper, so tokens equal `generate`'s (unpadded prompts take the
    is_causal path: cuDNN or flash attention, no score matrix; measured on the H100, every backend
    allocates only its output). A function of its own so that nothing of one layer (q, k, v, the
    SDPA output) stays alive into the next layer's FFN, as the loop's locals used to: the prefill
    peak is then one layer's transients on top of the residual stream, which rap.core.memory counts.
    With a plan, this layer's full-prompt k and v are the only full-length K/V that exist.
    `flat`: the layer's `FlatLayerCache` (Ada-KV / int8; kc, vc unused), filled by `keep_prompt_flat`.
    """
    n, P, _ = x.shape
    q, k, v = project_qkv(x, a, cos, sin)
    if flat is not None:
        keep_prompt_flat(q, k, v, flat, plan, a.scaling)
    elif plan is None:
        kc[:n, :, :P] = k
        vc[:n, :, :P] = v
    else:
        keep_prompt(q, k, v, kc, vc, plan, a.scaling)
    o, _ = sdpa_attention(a.module, q, k, v, attn_mask, scaling=a.scaling)
    del q, k, v
    return attn_output(x, o.reshape(n, P, -1), a)


def pick_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                noise: torch.Tensor | None) -> torch.Tensor:
    """Greedy (noise None) or temperature + nucleus sampling by the Gumbel-max trick.

    logits [B, V] fp32; noise [B, V] uniform in [0, 1). Sampling works in sorted order: keep the
    smallest prefix whose probability mass reaches top_p (always the top token), add Gumbel noise,
    take the argmax. Equivalent in distribution to multinomial sampling, and capturable (no sync).
    """
    if noise is None:
        return logits.argmax(-1)
    scores, order = (logits / temperature).sort(-1, descending=True)
    probs = scores.softmax(-1)
    drop = (probs.cumsum(-1) - probs) > top_p
    scores = scores.masked_fill(drop, float("-inf"))
    gumbel = -torch.log(-torch.log(noise.clamp(1e-20, 1.0 - 1e-7)))  # i.i.d., so no need to permute it
    choice = (scores + gumbel).argmax(-1, keepdim=True)
    return order.gather(-1, choice).squeeze(-1)


_CAPTURE_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def capture_stream(device: torch.device) -> "torch.cuda.Stream":
    """The one side stream on which every Decoder of the process warms up and captures its graphs.

    cuBLAS keeps a workspace per stream it has run on (32 MiB on Hopper, in PyTorch's caching
    allocator, never freed). A new stream per capture for the warm-up plus torch.cuda.graph's own
    capture stream left one more workspace allocated per captured graph (+33.5 MB each, measured on
    the H100); with this stream the process holds two, the current stream's and this one's, which is
    what rap.core.memory counts.
    """
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return _CAPTURE_STREAMS[device]


_COMPILED: tuple | None = None


def _compiled_block_functions() -> tuple:
    """torch.compile'd block functions, shared by every Decoder (one compile per shape, not per layer:
    weights are arguments, so all layers of a model hit the same compiled code)."""
    global _COMPILED
    if _COMPILED is None:
        import torch._dynamo

        cfg = torch._dynamo.config
        limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, limit, max(getattr(cfg, limit), 64))
        opts = dict(fullgraph=True, dynamic=False)
        _COMPILED = tuple(torch.compile(f, **opts) for f in (attn_decode_static, ffn_block, final_logits))
    return _COMPILED


# ---- results ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    prefill_ms: float
    decode_ms: float
    decode_steps: int  # forward passes after prefill (new tokens - 1 unless every row stopped early)
    rows: int
    capture_ms: float  # graph capture paid by this call (0.0: the mask's graph was cached)
    graph: bool

    @property
    def ms_per_step(self) -> float:
        return self.decode_ms / self.decode_steps if self.decode_steps else float("nan")

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput over all rows (prefill excluded)."""
        return self.rows * self.decode_steps / (self.decode_ms / 1e3) if self.decode_ms > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"prefill_ms": self.prefill_ms, "decode_ms": self.decode_ms, "decode_steps": self.decode_steps,
                "rows": self.rows, "capture_ms": self.capture_ms, "graph": self.graph,
                "ms_per_step": self.ms_per_step, "tokens_per_s": self.tokens_per_s}


@dataclass(frozen=True)
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, up to and including the first stop token
    timing: Timing
    mask: BlockMask
    kv_ratio: float = 1.0
    kv_press: str | None = None  # "snapkv" | "adakv" when kv_ratio < 1 (the press that picked the kept tokens)
    kv_bits: int = 16  # 16: the model's dtype; 8: int8 keys and values


# ---- per (batch bucket, cache length) state --------------------------------------------------------
@dataclass(eq=False)
class _Workspace:
    """Static buffers a captured step reads and writes; shared by the graphs of every mask."""

    batch: int
    length: int  # cache columns T
    rope_length: int  # positions the RoPE table covers (> T when the KV press dropped prompt tokens)
    tokens: torch.Tensor  # [B] current token per row
    col: torch.Tensor  # [1] cache column of the current token
    pad: torch.Tensor  # [B] first real column per row
    shift: torch.Tensor  # [B] RoPE position minus (column - pad): prompt tokens the KV press dropped
    done: torch.Tensor  # [B] row has emitted a stop token
    out: torch.Tensor  # [B, T] token per column (generated ones from the first decode column on)
    stop: torch.Tensor  # [S] stop ids, -1 = unused slot
    pad_id: torch.Tensor  # [] token written after a row stops
    temperature: torch.Tensor  # []
    top_p: torch.Tensor  # []
    noise: torch.Tensor  # [B, V] uniform noise for sampling
    arange: torch.Tensor  # [T]
    cos: torch.Tensor  # [R, rope_length, D] RoPE tables (R: RoPE kinds, see rope_kinds)
    sin: torch.Tensor
    # dense: layer -> (keys, values) [B, Hkv, T, D]; flat (Ada-KV / int8): layer -> FlatLayerCache
    kv: dict[int, tuple[torch.Tensor, torch.Tensor] | FlatLayerCache] = field(default_factory=dict)
    graphs: dict[tuple[BlockMask, bool], "torch.cuda.CUDAGraph"] = field(default_factory=dict)
    layout: KVLayout | None = None  # None: dense buffers; else the flat layout's press and bits

    @property
    def kv_bytes(self) -> int:
        return sum(c.nbytes if isinstance(c, FlatLayerCache) else sum(t.numel() * t.element_size() for t in c)
                   for c in self.kv.values())


MAX_STOP_IDS = 16


def bucket_batch(n: int) -> int:
    for b in BATCH_BUCKETS:
        if n <= b:
            return b
    return n


def bucket_length(n: int) -> int:
    return LENGTH_QUANTUM * math.ceil(n / LENGTH_QUANTUM)


class Decoder:
    """Generates from a BlockView (or HF model) under any BlockMask and KV keep ratio, fast.

    `generate(prompts, n, mask=..., kv_ratio=0.2, on_step=fn)`: with kv_ratio < 1 every kept
    attention layer keeps ceil(kv_ratio * P_b) prompt tokens per (row, KV head) on average, split
    over heads by Ada-KV (kv_press="adakv", default) or uniformly (kv_press="snapkv"), optionally in
    int8 (kv_bits=8; see the module docstring), and the cache shrinks to what
    `MemoryModel.kv_bytes(request, mask, kv_ratio, kv_layout)` predicts; `on_step` receives each step's [n]
    new tokens (on the host; one device sync per step, only when given).

    Args:
        model: a `BlockView` or a supported HF causal LM (Llama, Mistral, Qwen2, Qwen3, Gemma 3).
        step: how decode steps run. "graph": the static step captured as a CUDA graph per mask
            (default on CUDA); "static": the same static step run eagerly (tests the captured code
            on CPU); "exact": eager, attending to the filled columns only through transformers' SDPA
            wrapper, so float32 tokens equal `generate`'s bit for bit (default on CPU).
        compile: run the per-block functions through `torch.compile` inside the graph (fuses the
            norm/RoPE/activation element-wise ops: 55% -> 73% of the bandwidth roofline on the H100
            at batch 1; ~9 s to compile once per process, ~3 s per new batch bucket). Default: on CUDA.
        attention: "sdpa" or "matmul" for the captured decode attention (prefill always uses SDPA).
        fuse_projections: one matmul for q/k/v and one for gate/up instead of five (larger GEMVs run
            closer to bandwidth at batch 1). "none" (default); "copy": concatenated copies, counted in
            `extra_weight_bytes`; "inplace": concatenate once, then re-point the HF parameters at row
            slices of the fused tensors and free the originals, so no byte is added (the model still
            works unchanged, but its q/k/v and gate/up parameters now share storage).
        budget_bytes: if given, refuse requests whose memory-model peak exceeds it.
    """

    def __init__(self, model: BlockView | nn.Module, *, step: str | None = None,
                 compile: bool | None = None, attention: str = "sdpa", fuse_projections: str = "none",
                 budget_bytes: int | None = None, check_every: int = 16):
        view = model if isinstance(model, BlockView) else BlockView(model)
        model_type = view.config.model_type
        if model_type not in DECODE_MODEL_TYPES:
            raise UnsupportedModelError(
                f"rap's fast decode path supports {', '.join(DECODE_MODEL_TYPES)}, not {model_type!r}; "
                "use the stock path (`with view.masked(mask): view.model.generate(...)`)")
        inner = view.model.model
        check_static_rope(view)
        if attention not in ("sdpa", "matmul"):
            raise ValueError(f"attention must be 'sdpa' or 'matmul', got {attention!r}")
        self.view = view
        self.memory = MemoryModel.from_view(view, kv_length_quantum=LENGTH_QUANTUM)
        # sliding-window layers get full-length buffers too (keys outside the window are masked, not
        # evicted: a ring buffer would save that memory but needs its own column bookkeeping)
        self.memory.window_bounded_kv = False
        self.device = view.device
        self.dtype = view.dtype
        self.step = step or ("graph" if self.device.type == "cuda" else "exact")
        if self.step not in ("graph", "static", "exact"):
            raise ValueError(f"step must be 'graph', 'static' or 'exact', got {step!r}")
        if self.step == "graph" and self.device.type != "cuda":
            raise RequestError("CUDA graphs need the model on a CUDA device: use step='static' or 'exact'")
        self.use_graphs = self.step == "graph"
        self.attention = attention
        self.check_every = max(1, check_every)
        self.budget_bytes = budget_bytes
        # prompts run through the prefill a few rows at a time, at most this many tokens together
        # (at least one row): the prefill's transients stay bounded however large the batch is
        self.prefill_chunk_tokens = PREFILL_CHUNK_TOKENS
        self.embed_w = inner.embed_tokens.weight
        self.embed_scale = embed_scale(view)
        self.norm_w, self.norm_eps = inner.norm.weight, norm_eps(inner.norm)
        self.norm_offset = is_gemma(view)
        self.softcap = getattr(view.config, "final_logit_softcapping", None)
        head = view.model.lm_head
        self.lm_w, self.lm_b = head.weight, head.bias
        self.pad_token_id = getattr(view.config, "pad_token_id", None)
        self.rope_kinds = rope_kinds(view)
        self.attn = [self._attn_weights(i) for i in range(view.num_layers)]
        self.ffn = [self._ffn_weights(i) for i in range(view.num_layers)]
        self.extra_weight_bytes = 0
        # (block name, level) -> that block's weights quantized from its resident dense copy (see block_weights)
        self._quantized: dict[tuple[str, str], AttnWeights | FfnWeights] = {}
        self._plan_weights: dict[BlockMask, tuple[list, list]] = {}
        self._validated: set[Plan] = set()
        if fuse_projections not in ("none", "copy", "inplace"):
            raise ValueError(f"fuse_projections must be 'none', 'copy' or 'inplace', got {fuse_projections!r}")
        self.fuse_projections = fuse_projections
        if fuse_projections != "none":
            self._fuse(in_place=fuse_projections == "inplace")
        self._attn_fn: Callable = attn_decode_static
        self._ffn_fn: Callable = ffn_block
        self._head_fn: Callable = final_logits
        self.compile = (self.device.type == "cuda") if compile is None else compile
        if self.compile:
            self._attn_fn, self._ffn_fn, self._head_fn = _compiled_block_functions()
        self._workspaces: dict[tuple[int, int, int], _Workspace] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._rope_tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.last_prepare_ms = 0.0

    # ---- weights ---------------------------------------------------------------------------------
    def _attn_weights(self, i: int) -> AttnWeights:
        return attn_weights(self.view, i, self.rope_kinds)

    def _ffn_weights(self, i: int) -> FfnWeights:
        return ffn_weights(self.view, i)

    @torch.no_grad()
    def _fuse(self, in_place: bool) -> None:
        """Concatenate q/k/v and gate/up once per layer: one matmul instead of three/two."""
        def cat(*ts):
            return None if any(t is None for t in ts) else torch.cat([t.detach() for t in ts], dim=0)

        def repoint(params, fused):  # HF parameters become row slices of `fused`; old storage is freed
            start = 0
            for p in params:
                p.data = fused[start:start + p.shape[0]]
                start += p.shape[0]

        for a, f in zip(self.attn, self.ffn):
            if weight_level(a.wq) == DTYPE:  # a block resident at int8 / int4 runs unfused (see block_weights)
                a.wqkv, a.bqkv = cat(a.wq, a.wk, a.wv), cat(a.bq, a.bk, a.bv)
            if weight_level(f.wg) == DTYPE:
                f.wgu, f.bgu = cat(f.wg, f.wu), cat(f.bg, f.bu)
            if in_place:
                if a.wqkv is not None:
                    repoint((a.wq, a.wk, a.wv), a.wqkv)
                if f.wgu is not None:
                    repoint((f.wg, f.wu), f.wgu)
                if a.bqkv is not None:
                    repoint((a.bq, a.bk, a.bv), a.bqkv)
                if f.bgu is not None:
                    repoint((f.bg, f.bu), f.bgu)
            else:
                for t in (a.wqkv, a.bqkv, f.wgu, f.bgu):
                    if t is not None:
                        self.extra_weight_bytes += t.numel() * t.element_size()

    # ---- precision levels -----------------------------------------------------------------------------
    def block_weights(self, mask: BlockMask) -> tuple[list[AttnWeights], list[FfnWeights]]:
        """Per-layer attention / FFN weights for `mask` (a `Plan` or a plain mask: every block at dtype).

        A block the plan keeps at the level its module's weights are resident at (the dtype as
        loaded, or int8 / int4 after `rap.serve.residency.WeightResidency` moved it) uses those weights as
        they are. A block resident at dtype that the plan wants quantized is quantized once from that
        copy and cached (counted in `extra_weight_bytes`: the dense copy stays, as it must for the
        next plan that keeps it dense); any other mismatch raises. Fused q/k/v and gate/up weights
        are quantized fused: int8's per-output-channel and int4's per-row groups never mix rows,
        so the values equal those of the three / two separate projections, and one GEMV stays one.
        Cached per plan, so a captured graph always sees the same tensors.
        """
        key = mask
        cached = self._plan_weights.get(key)
        if cached is not None:
            return cached
        resident_quantized = any(weight_level(a.wq) != DTYPE for a in self.attn) or any(
            weight_level(f.wg) != DTYPE for f in self.ffn)
        if not resident_quantized and (not isinstance(mask, Plan) or not mask.is_quantized):
            out = (self.attn, self.ffn)
        else:
            mask = Plan.of(mask)
            if mask not in self._validated:
                mask.validate(self.view.shape)
                self._validated.add(mask)
            attn = [self._block_at(self.attn[i], "attn", i, lv) for i, lv in enumerate(mask.attn_levels)]
            ffn = [self._block_at(self.ffn[i], "ffn", i, lv) for i, lv in enumerate(mask.ffn_levels)]
            out = (attn, ffn)
        self._plan_weights[key] = out
        return out

    def _block_at(self, w: AttnWeights | FfnWeights, kind: str, layer: int, level: str):
        resident = weight_level(w.wq if kind == "attn" else w.wg)
        if level == DROP or level == resident:
            return w
        name = f"{kind}.{layer}"
        if resident != DTYPE:
            raise RequestError(f"{name} is resident at {resident}, the plan runs it at {level}: move it first "
                               "(rap.serve.residency.WeightResidency.apply(plan))")
        key = (name, level)
        if key not in self._quantized:
            fields = ("wqkv", "wq", "wk", "wv", "wo") if kind == "attn" else ("wgu", "wg", "wu", "wd")
            fused = "wqkv" if kind == "attn" else "wgu"
            skip = ("wq", "wk", "wv") if kind == "attn" else ("wg", "wu")
            new = {}
            for f in fields:
                t = getattr(w, f)
                if t is None or (f in skip and getattr(w, fused) is not None):
                    continue  # the fused tensor carries these rows
                new[f] = quantize_weight(t, level, f"{name}.{f}")
                self.extra_weight_bytes += storage_bytes(new[f])
            self._quantized[key] = replace(w, **new)
        return self._quantized[key]

    def forget_weights(self) -> None:
        """Let go of every weight tensor this decoder references (per-layer weights, quantized copies),
        so a module's replaced weight is freed at once; `refresh_weights` must run before the next call."""
        for w in (*self.attn, *self.ffn):
            for f in ("wq", "wk", "wv", "wo", "wqkv", "wg", "wu", "wd", "wgu"):
                if hasattr(w, f):
                    setattr(w, f, None)
        self._quantized.clear()
        self._plan_weights.clear()
        self.extra_weight_bytes = 0

    def refresh_weights(self) -> None:
        """Re-read every block's weights from the model's modules (after a residency move replaced
        a module's weight with a quantized one, or back) and forget derived copies."""
        self.attn = [self._attn_weights(i) for i in range(self.view.num_layers)]
        self.ffn = [self._ffn_weights(i) for i in range(self.view.num_layers)]
        self._quantized.clear()
        self._plan_weights.clear()
        self.extra_weight_bytes = 0
        if self.fuse_projections != "none":
            self._fuse(in_place=self.fuse_projections == "inplace")

    # ---- memory -------------------------------------------------------------------------------------
    def _rope_table(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [R, T, D] (one table per RoPE kind) from the model's own rotary module."""
        if length not in self._rope_tables:
            self._rope_tables[length] = rope_tables(self.view, length, self.rope_kinds)
        return self._rope_tables[length]

    def _free_device_bytes(self) -> int:
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)

    def _smallest_window(self, mask: BlockMask | None = None) -> int | None:
        """The smallest sliding window among (kept) attention layers, or None (no windowed layer)."""
        windows = [a.window for i, a in enumerate(self.attn)
                   if a.window is not None and (mask is None or mask.keep_attn[i])]
        return min(windows) if windows else None

    @property
    def compresses_kv(self) -> bool:
        """Can every request take a KV keep ratio < 1? Not with sliding-window layers: the window is
        counted in true positions, which compressed cache columns no longer are (such a model takes
        a ratio only for requests that fit inside its window)."""
        return self._smallest_window() is None

    def _kv_length(self, prompt: int, length: int, kv_ratio: float) -> int:
        """Cache columns for a request of `prompt` tokens in a `length`-column bucket: the memory model's
        count for the request the engine plans with (rap.serve.backends.DecoderBackend.planning_request)."""
        if kv_ratio >= 1.0:
            return length
        return self.memory.kv_tokens(Request(1, max(1, prompt), max(1, length - prompt)), kv_ratio)

    def _check_fits(self, mask: BlockMask, batch: int, prompt: int, length: int, new_layers: Sequence[int],
                    kv_ratio: float = 1.0, layout: KVLayout | None = None) -> None:
        request = Request(batch, max(1, prompt), max(1, length - prompt))
        if self.budget_bytes is not None and not self.memory.fits(self.budget_bytes, mask, request, kv_ratio, layout):
            need = self.memory.peak_bytes(mask, request, kv_ratio, layout)
            raise BudgetError(f"batch {batch} x {length} tokens under [{mask}] needs {format_bytes(need)} "
                              f"(memory model), over the budget of {format_bytes(self.budget_bytes)}: "
                              "use a smaller batch, fewer tokens or drop more blocks")
        if self.device.type != "cuda":
            return
        sub = BlockMask(tuple(i in new_layers for i in range(mask.num_layers)), (False,) * mask.num_layers)
        need = self.memory.kv_bytes(request, sub, kv_ratio, layout) + max(
            self.memory.prefill_activation_bytes(request, mask), self.memory.decode_activation_bytes(request, mask))
        free = self._free_device_bytes()
        if need > free:
            raise BudgetError(f"the KV cache for batch {batch} x {length} tokens under [{mask}] plus activations "
                              f"needs {format_bytes(need)}, only {format_bytes(free)} is free on {self.device}: "
                              "use a smaller batch, fewer tokens or drop more attention blocks")

    @staticmethod
    def _flat_layout(kv_ratio: float, kv_press: str | None, kv_bits: int | None) -> KVLayout | None:
        """The flat layout a request needs (Ada-KV below ratio 1, or int8 KV), or None (dense buffers)."""
        layout = layout_for(kv_press, kv_bits)
        return layout if layout.flat and (kv_ratio < 1.0 or layout.bits != 16) else None

    def _workspace(self, batch: int, length: int, rope_length: int | None = None,
                   layout: KVLayout | None = None) -> _Workspace:
        rope_length = rope_length or length
        key = (batch, length, rope_length, None if layout is None else layout.bits)
        if key not in self._workspaces:
            dev, V = self.device, self.view.shape.vocab_size
            cos, sin = self._rope_table(rope_length)
            long = dict(device=dev, dtype=torch.long)
            self._workspaces[key] = _Workspace(
                batch=batch, length=length, rope_length=rope_length, tokens=torch.zeros(batch, **long),
                col=torch.zeros(1, **long), pad=torch.zeros(batch, **long), shift=torch.zeros(batch, **long),
                done=torch.zeros(batch, device=dev, dtype=torch.bool),
                out=torch.zeros(batch, length, **long), stop=torch.full((MAX_STOP_IDS,), -1, **long),
                pad_id=torch.zeros((), **long), temperature=torch.ones((), device=dev),
                top_p=torch.ones((), device=dev), noise=torch.rand(batch, V, device=dev),
                arange=torch.arange(length, **long), cos=cos, sin=sin, layout=layout)
        return self._workspaces[key]

    def _ensure_kv(self, ws: _Workspace, mask: BlockMask, prompt: int, kv_ratio: float = 1.0) -> None:
        new = [i for i in mask.kept_attn_layers if i not in ws.kv]
        if not new:
            return
        self._check_fits(mask, ws.batch, prompt, ws.rope_length, new, kv_ratio, ws.layout)
        s = self.view.shape
        shape = (ws.batch, s.num_kv_heads, ws.length, s.head_dim)
        for i in new:
            if ws.layout is not None:
                ws.kv[i] = FlatLayerCache.allocate(ws.batch, s.num_kv_heads, ws.length, s.head_dim, self.dtype,
                                                   self.device, ws.layout.bits, ws.rope_length)
                continue
            ws.kv[i] = (torch.zeros(shape, device=self.device, dtype=self.dtype),
                        torch.zeros(shape, device=self.device, dtype=self.dtype))

    @property
    def kv_resident_bytes(self) -> int:
        return sum(ws.kv_bytes for ws in self._workspaces.values())

    def release(self) -> None:
        """Drop every captured graph and cache buffer (the next request captures again)."""
        self._workspaces.clear()
        self._rope_tables.clear()
        if self.use_graphs:
            torch.cuda.synchronize(self.device)
            self._pool = torch.cuda.graph_pool_handle()
            torch.cuda.empty_cache()

    def cached_graphs(self) -> list[tuple[BlockMask, int, int, bool]]:
        return [(m, ws.batch, ws.length, sampled) for ws in self._workspaces.values() for (m, sampled) in ws.graphs]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.embed_w)
        return x if self.embed_scale is None else x * self.embed_scale

    # ---- the decode step ----------------------------------------------------------------------------
    def _step(self, ws: _Workspace, mask: BlockMask, sampled: bool) -> None:
        """One decode step over static buffers: capturable (no host syncs, no data-dependent shapes)."""
        x = self._embed(ws.tokens[:, None])  # [B, 1, hidden]
        pos = ws.col - ws.pad + ws.shift  # [B] true positions (columns of a compressed cache are fewer)
        cos, sin = ws.cos[:, pos][:, :, None, None, :], ws.sin[:, pos][:, :, None, None, :]  # [R, B, 1, 1, D]
        valid = (ws.arange[None, :] >= ws.pad[:, None]) & (ws.arange[None, :] <= ws.col)
        windowed: dict[int, torch.Tensor] = {}
        attn, ffn = self.block_weights(mask)
        for i in range(mask.num_layers):
            if mask.keep_attn[i]:
                a = attn[i]
                v = valid
                if a.window is not None:
                    if a.window not in windowed:
                        windowed[a.window] = valid & (ws.arange[None, :] > ws.col - a.window)
                    v = windowed[a.window]
                cache = ws.kv[i]
                if isinstance(cache, FlatLayerCache):  # Ada-KV / int8: per-head segments, static bound
                    x = attn_decode_flat(x, a, cos[a.rope], sin[a.rope], cache)
                else:
                    kc, vc = cache
                    x = self._attn_fn(x, a, cos[a.rope], sin[a.rope], kc, vc, ws.col, v, self.attention)
            if mask.keep_ffn[i]:
                x = self._ffn_fn(x, ffn[i])
        logits = self._head_fn(x, self.norm_w, self.norm_eps, self.lm_w, self.lm_b, self.norm_offset, self.softcap)
        self._advance(ws, logits, sampled)

    @staticmethod
    def _advance(ws: _Workspace, logits: torch.Tensor, sampled: bool) -> None:
        nxt = pick_tokens(logits, ws.temperature, ws.top_p, ws.noise if sampled else None)
        nxt = torch.where(ws.done, ws.pad_id, nxt)
        ws.done |= (nxt[:, None] == ws.stop[None, :]).any(-1)
        ws.col += 1
        ws.out.index_copy_(1, ws.col, nxt[:, None])
        ws.tokens.copy_(nxt)

    def prepare(self, mask: BlockMask, batch: int, max_len: int, sampled: bool = False, prompt: int = 1,
                kv_ratio: float = 1.0, kv_press: str | None = None, kv_bits: int | None = None) -> float:
        """Make sure (mask, batch bucket, cache length) has its cache and, on CUDA, its captured graph.

        max_len: prompt + new tokens; with kv_ratio < 1 the cache holds the compressed length.
        Returns the milliseconds spent (≈0 when cached: switching masks is a dictionary lookup).
        """
        t0 = time.perf_counter()
        T = bucket_length(max_len)
        layout = self._flat_layout(kv_ratio, kv_press, kv_bits)
        ws = self._workspace(bucket_batch(batch), self._kv_length(prompt, T, kv_ratio), T, layout)
        self._ensure_kv(ws, mask, prompt, kv_ratio)
        if self.use_graphs and (mask, sampled) not in ws.graphs:
            ws.graphs[(mask, sampled)] = self._capture(ws, mask, sampled)
        self.last_prepare_ms = (time.perf_counter() - t0) * 1e3
        return self.last_prepare_ms

    def _capture(self, ws: _Workspace, mask: BlockMask, sampled: bool) -> "torch.cuda.CUDAGraph":
        ws.col.zero_()
        ws.done.fill_(True)
        side = capture_stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):  # warm-up: compiles (if asked) and initialises cuBLAS outside the capture
                self._step(ws, mask, sampled)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=side), torch.no_grad():
            self._step(ws, mask, sampled)
        graph.replay()  # the first replay uploads the graph; keep that out of the first request
        torch.cuda.synchronize(self.device)
        log.info("captured decode graph for [%s] batch %d length %d", mask, ws.batch, ws.length)
        return graph

    # ---- prefill (eager; the same math, with transformers' SDPA wrapper for exactness) ----------------
    def _prefill(self, ws: _Workspace, mask: BlockMask, ids: torch.Tensor, pad: torch.Tensor,
                 plan: KeepPlan | None = None) -> torch.Tensor:
        """ids [n, P] left-padded; writes K/V of columns [0, P) for rows [0, n) (with a plan, the kept
        columns [0, plan.width)); returns logits [n, V]."""
        n, P = ids.shape
        rows = prefill_rows(P, self.prefill_chunk_tokens)
        logits = torch.empty(n, self.view.shape.vocab_size, device=self.device, dtype=torch.float32)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            part = None if plan is None else replace(
                plan, pad=plan.pad[r0:r1], kept=plan.kept[r0:r1],
                reserve=None if plan.reserve is None else plan.reserve[r0:r1])
            logits[r0:r1] = self._prefill_rows(ws, mask, ids[r0:r1], pad[r0:r1], r0, part)
        return logits

    def _prefill_rows(self, ws: _Workspace, mask: BlockMask, ids: torch.Tensor, pad: torch.Tensor, r0: int,
                      plan: KeepPlan | None) -> torch.Tensor:
        """The prefill of rows [r0, r0 + n) of the batch: every layer over these rows only (rows never
        attend to each other, so this equals the whole batch at once), K/V into their cache rows."""
        n, P = ids.shape
        cols = torch.arange(P, device=self.device)
        pos = (cols[None, :] - pad[:, None]).clamp_min(0)
        cos, sin = ws.cos[:, pos][:, :, None], ws.sin[:, pos][:, :, None]  # [R, n, 1, P, D]
        del pos
        padded = bool((pad > 0).any())
        masks: dict[int | None, torch.Tensor | None] = {}

        def mask_for(window: int | None):
            if window is not None and window >= P:
                window = None
            if window not in masks:
                if not padded and window is None:
                    masks[window] = None  # plain causal: SDPA's is_causal path, as generate uses
                else:
                    # [n, P, P] bool, built in place (no int64 [P, P] difference, no eye): query q sees
                    # key k iff k <= q, k is a real token and (window) q - k < window; a pad query sees
                    # itself, so its (unused) output stays finite
                    q_col, k_col = cols[:, None], cols[None, :]
                    m = (k_col <= q_col) & (k_col >= pad[:, None, None])
                    if window is not None:
                        m &= k_col > q_col - window
                    m.diagonal(dim1=-2, dim2=-1).fill_(True)
                    masks[window] = m[:, None]
            return masks[window]

        x = self._embed(ids)
        attn, ffn = self.block_weights(mask)
        for i in range(mask.num_layers):
            if mask.keep_attn[i]:
                a = attn[i]
                cache = ws.kv[i]
                if isinstance(cache, FlatLayerCache):
                    x = prefill_attention(x, a, cos[a.rope], sin[a.rope], None, None, mask_for(a.window),
                                          replace(plan, r0=r0), flat=cache)
                else:
                    kc, vc = cache
                    x = prefill_attention(x, a, cos[a.rope], sin[a.rope], kc[r0:r0 + n], vc[r0:r0 + n],
                                          mask_for(a.window), plan)
            if mask.keep_ffn[i]:
                x = ffn_block(x, ffn[i])
        return final_logits(x, self.norm_w, self.norm_eps, self.lm_w, self.lm_b, self.norm_offset, self.softcap)

    def _step_eager(self, ws: _Workspace, mask: BlockMask, sampled: bool, n: int) -> None:
        """The decode step without a graph: attends to the filled columns only, through transformers'
        SDPA wrapper with the mask `generate` would build, so float32 tokens equal generate's exactly."""

        col = int(ws.col)
        L = col + 1
        x = self._embed(ws.tokens[:n, None])
        pos = ws.col - ws.pad[:n] + ws.shift[:n]
        cos, sin = ws.cos[:, pos][:, :, None, None, :], ws.sin[:, pos][:, :, None, None, :]
        keys = ws.arange[:L]
        real = keys[None, :] >= ws.pad[:n, None]  # [n, L]
        padded = not bool(real.all())
        attn, ffn = self.block_weights(mask)
        for i in range(mask.num_layers):
            if mask.keep_attn[i]:
                a = attn[i]
                cache = ws.kv[i]
                if isinstance(cache, FlatLayerCache):  # attends over live rows only, as rap.kv's HF path
                    cache.max_length += 1
                    x = attn_decode_flat(x, a, cos[a.rope], sin[a.rope], cache, cache.max_length)
                    if mask.keep_ffn[i]:
                        x = ffn_block(x, ffn[i])
                    continue
                q, k, v = project_qkv(x, a, cos[a.rope], sin[a.rope])
                kc, vc = cache
                kc[:n, :, col] = k[:, :, 0]
                vc[:n, :, col] = v[:, :, 0]
                m = real
                if a.window is not None and L > a.window:
                    m = m & (keys[None, :] > col - a.window)
                m = m[:, None, None, :] if (padded or m is not real) else None
                o, _ = sdpa_attention(a.module, q, kc[:n, :, :L], vc[:n, :, :L], m, scaling=a.scaling)
                x = attn_output(x, o.reshape(n, 1, -1), a)
            if mask.keep_ffn[i]:
                x = ffn_block(x, ffn[i])
        logits = final_logits(x, self.norm_w, self.norm_eps, self.lm_w, self.lm_b, self.norm_offset, self.softcap)
        if n < ws.batch:  # bucket rows beyond the request are idle on this path
            logits = torch.cat([logits, logits.new_zeros(ws.batch - n, logits.shape[1])])
        self._advance(ws, logits, sampled)

    # ---- the public call --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, mask: BlockMask | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | Sequence[int | None] | None = None,
                 stop_token_ids: Sequence[int] | int | None = None, pad_token_id: int | None = None,
                 kv_ratio: float = 1.0, on_step: Callable[[torch.Tensor], Sequence[bool] | None] | None = None,
                 kv_press: str | None = None, kv_bits: int | None = None,
                 kv_scorer: SnapKVScorer | None = None) -> Generation:
        """Generate up to `max_new_tokens` per prompt under `mask` (default: the view's current mask).

        prompts: token id lists of any lengths (left-padded internally). temperature 0 = greedy.
        stop_token_ids: a row stops after emitting one of these (default: none). kv_ratio in (0, 1]:
        the share of each prompt's tokens every kept attention layer keeps per KV head (SnapKV, see
        the module docstring; 1.0 keeps all, exactly as before). kv_press: "adakv" (default: per
        layer, the row's Hkv * k tokens split over KV heads by Ada-KV, in a flat cache) or "snapkv"
        (k per head, dense buffers). kv_bits: 16 (the model's dtype, default) or 8 (int8 keys and
        values, flat cache). kv_scorer: the SnapKV scorer's parameters (default
        `rap.kv.scorer.DEFAULT_SCORER`). on_step: called with the [n] new
        tokens (CPU tensor) after prefill and after every decode step; rows that stopped repeat the
        pad token; it may return [n] booleans, rows to finish now (a stop string matched, a client
        gone), which then stop like a stop token (the loop ends when every row has). seed: one for
        the batch, or one per row (None: random), each row then drawing its noise from its own
        generator, so its tokens do not depend on what it is batched with. Returns the new tokens per prompt (up to and including its stop token) and the timing.
        """
        mask = mask or self.view.mask
        if mask.num_layers != self.view.num_layers:
            raise RequestError(f"mask has {mask.num_layers} layers, the model has {self.view.num_layers}")
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RequestError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise RequestError("temperature must be >= 0 and top_p in (0, 1]")
        if not 0.0 < kv_ratio <= 1.0:
            raise RequestError(f"kv_ratio must be in (0, 1], got {kv_ratio}")
        stops = [stop_token_ids] if isinstance(stop_token_ids, int) else list(stop_token_ids or [])
        if len(stops) > MAX_STOP_IDS:
            raise RequestError(f"at most {MAX_STOP_IDS} stop token ids")
        V = self.view.shape.vocab_size
        if any(t < 0 or t >= V for p in prompts for t in p):
            raise RequestError(f"prompt token ids must be in [0, {V})")
        pad_id = pad_token_id if pad_token_id is not None else (self.pad_token_id if self.pad_token_id is not None
                                                               else (stops[0] if stops else 0))
        sampled = temperature > 0
        n, P = len(prompts), max(len(p) for p in prompts)
        kv = layout_for(kv_press, kv_bits)  # RequestError for an unknown press or unsupported bits
        layout = self._flat_layout(kv_ratio, kv_press, kv_bits)
        window = self._smallest_window(mask)
        if (kv_ratio < 1.0 or layout is not None) and window is not None and P + max_new_tokens > window:
            windowed = [i for i, a in enumerate(self.attn) if a.window is not None and mask.keep_attn[i]]
            raise RequestError(f"KV compression ({kv.press} at ratio {kv_ratio:g}, {kv.bits}-bit) cannot run on the "
                               f"sliding-window attention layers {windowed} ({window} tokens) once prompt + new tokens "
                               f"({P + max_new_tokens}) exceed the window: use kv_ratio 1.0 and 16-bit KV")
        lengths = [len(p) for p in prompts]
        kept = [max(1, math.ceil(kv_ratio * L)) if kv_ratio < 1.0 else L for L in lengths]
        compress = kept != lengths
        K = max(kept)  # first decode column (= P without compression)
        capture_ms = 0.0
        B, T = bucket_batch(n), bucket_length(P + max_new_tokens)
        ws = self._workspace(B, self._kv_length(P, T, kv_ratio), T, layout)
        if self.use_graphs:
            cached = (mask, sampled) in ws.graphs and all(i in ws.kv for i in mask.kept_attn_layers)
            spent = self.prepare(mask, n, P + max_new_tokens, sampled, prompt=P, kv_ratio=kv_ratio,
                                 kv_press=kv_press, kv_bits=kv_bits)
            capture_ms = 0.0 if cached else spent
        else:
            self._ensure_kv(ws, mask, P, kv_ratio)
        gens: list[torch.Generator] = []
        if sampled:
            per_row = not isinstance(seed, int) and seed is not None
            for s in (seed if per_row else [seed]):
                gens.append(torch.Generator(self.device))
                gens[-1].manual_seed(s % 2**64 if s is not None else int(torch.randint(0, 2**62, ()).item()))

        def draw_noise(rows: int) -> None:
            if len(gens) == 1:
                ws.noise[:rows].uniform_(generator=gens[0])
            else:  # one generator per row: a row's noise is its seed's alone
                for r, g in enumerate(gens):
                    ws.noise[r].uniform_(generator=g)

        def finish_rows(finished) -> None:
            if finished is not None:
                ws.done[:n] |= torch.as_tensor(list(finished), dtype=torch.bool).to(dev)

        # request state
        dev = self.device
        ids = torch.full((n, P), pad_id, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, P - len(p):] = torch.tensor(p)
        prompt_pad = torch.tensor([P - L for L in lengths]).to(dev)
        pad = torch.full((B,), K - 1, dtype=torch.long)  # idle bucket rows see one column
        pad[:n] = torch.tensor([K - k for k in kept])
        shift = torch.zeros(B, dtype=torch.long)
        shift[:n] = torch.tensor([L - k for L, k in zip(lengths, kept)])
        scorer = kv_scorer or DEFAULT_SCORER
        kept_dev = torch.tensor(kept).to(dev)
        plan = KeepPlan(prompt_pad, kept_dev, K, scorer) if compress else None
        if layout is not None:  # flat cache: every head of row b gets T - k_b rows to decode into
            plan = KeepPlan(prompt_pad, kept_dev, K, scorer, adaptive=kv.press == "adakv",
                            reserve=ws.length - kept_dev, everything=not compress)
            for i in mask.kept_attn_layers:
                ws.kv[i].reset()
        ws.pad.copy_(pad)
        ws.shift.copy_(shift)
        ws.col.fill_(K)
        ws.stop.fill_(-1)
        if stops:
            ws.stop[:len(stops)] = torch.tensor(stops, device=dev)
        ws.pad_id.fill_(pad_id)
        ws.temperature.fill_(temperature if sampled else 1.0)
        ws.top_p.fill_(top_p)
        ws.out.fill_(pad_id)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda *a: None)

        sync(dev)
        t0 = time.perf_counter()
        logits = self._prefill(ws, mask, ids.to(dev), prompt_pad, plan)
        if sampled:
            draw_noise(n)
        first = pick_tokens(logits, ws.temperature, ws.top_p, ws.noise[:n] if sampled else None)
        ws.tokens.fill_(pad_id)
        ws.tokens[:n] = first
        ws.out[:, K] = ws.tokens
        ws.done.fill_(True)
        ws.done[:n] = (first[:, None] == ws.stop[None, :]).any(-1)
        if on_step is not None:
            finish_rows(on_step(first.to("cpu", copy=True)))
        sync(dev)
        t1 = time.perf_counter()

        steps = 0
        graph = ws.graphs.get((mask, sampled)) if self.use_graphs else None
        every = self.check_every if graph is not None and on_step is None else 1
        for _ in range(max_new_tokens - 1):
            if steps % every == 0 and bool(ws.done.all()):
                break
            if sampled:
                draw_noise(ws.batch)
            if graph is not None:
                graph.replay()
            elif self.step == "static":
                self._step(ws, mask, sampled)
            else:
                self._step_eager(ws, mask, sampled, n)
            steps += 1
            if on_step is not None:  # the one host sync per step streaming (and cancelling) costs
                finish_rows(on_step(ws.tokens[:n].to("cpu", copy=True)))
        sync(dev)
        t2 = time.perf_counter()

        out = ws.out[:n, K:K + 1 + steps].tolist()
        stopset = set(stops)
        tokens = []
        for row in out:
            cut = next((j + 1 for j, t in enumerate(row) if t in stopset), len(row))
            tokens.append(row[:cut])
        timing = Timing(prefill_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3, decode_steps=steps, rows=n,
                        capture_ms=capture_ms, graph=graph is not None)
        return Generation(tokens=tokens, timing=timing, mask=mask, kv_ratio=kv_ratio,
                          kv_press=kv.press if compress else None, kv_bits=kv.bits)
