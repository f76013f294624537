"""rap's layer math: one transformer layer as plain functions over the HF modules' own tensors.

    a, f = attn_weights(view, i), ffn_weights(view, i)        # layer i, read from the HF modules (no copies)
    q, k, v = project_qkv(x, a, cos, sin)                     # norm -> q/k/v -> (q/k norm) -> RoPE
    x = attn_output(x, attend(q, k, v), a)                    # x + post_norm?(o_proj(o))
    x = ffn_block(x, f)                                       # x + post_norm?(down(act(gate) * up))
    h = head_weights(view); x = h.embed(ids); ...; logits = final_logits(x, *h.args)   # embed ... norm -> lm_head

Every job runs these: `rap.core.forward.Forward` over whole windows (perplexity, GSI, zero-shot, the
policy's measurements) and `rap.decode.decoder.Decoder` for prefill and decode steps (static cache,
flat Ada-KV / int8 cache, captured graphs). The math mirrors transformers' Llama / Mistral / Qwen2 /
Qwen3 code op for op (checked against transformers 5.17 and 5.23), and Gemma 3's (checked against
5.24: (1 + w) RMSNorms in fp32, q/k norms, post-attention and pre/post-feedforward norms,
sqrt(hidden)-scaled embeddings, gelu-tanh MLP, local and global RoPE tables, sliding-window layers,
final logit softcapping), so greedy tokens and logits equal transformers' (tests/test_forward.py,
tests/test_decode.py, tests/test_gemma3.py). The functions are pure, so torch.compile traces each once
and every layer of a model shares the compiled code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rap.core.hf import rotary_tables
from rap.core.model import BlockView, same_tensor
from rap.errors import UnsupportedModelError

if TYPE_CHECKING:
    from rap.kv.decode_cache import FlatLayerCache

DECODE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
# RoPE variants whose cos/sin depend only on the position (not on the current sequence length)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


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


def head_linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The lm_head's linear. An int8 head on torchao's `Int8Tensor` (CPU) runs in vocabulary chunks of
    `HEAD_CHUNK_ROWS`: that tensor's linear casts its whole weight to the dtype first, which for the head
    is the size of the dense head again (rap.core.memory counts one chunk)."""
    from rap.core.quant import HEAD_CHUNK_ROWS

    if type(w).__name__ != "Int8Tensor" or w.shape[0] <= HEAD_CHUNK_ROWS:
        return F.linear(h, w, b)
    out = h.new_empty(*h.shape[:-1], w.shape[0])
    for i in range(0, w.shape[0], HEAD_CHUNK_ROWS):
        j = min(i + HEAD_CHUNK_ROWS, w.shape[0])
        out[..., i:j] = F.linear(h, w[i:j], None if b is None else b[i:j])
    return out


def lm_logits(x: torch.Tensor, norm_w, eps: float, lm_w, lm_b, offset: bool = False,
              softcap: float | None = None) -> torch.Tensor:
    """Logits of every position in the model dtype, as transformers' forward returns them: final norm ->
    lm_head; `softcap` (Gemma's final_logit_softcapping): cap * tanh(logits / cap). x [..., hidden]."""
    logits = head_linear(rms_norm(x, norm_w, eps, offset), lm_w, lm_b)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def final_logits(x: torch.Tensor, norm_w, eps: float, lm_w, lm_b, offset: bool = False,
                 softcap: float | None = None) -> torch.Tensor:
    """Last position's logits in fp32, as `generate` sees them. x [B, S, hidden] -> [B, V]."""
    return lm_logits(x[:, -1], norm_w, eps, lm_w, lm_b, offset, softcap).float()


@dataclass(eq=False)
class HeadWeights:
    """What surrounds the layers: the token embedding (Gemma: scaled by sqrt(hidden)), the final norm and
    the lm_head (Gemma: softcapped). `args` are `lm_logits` / `final_logits`'s arguments after x."""

    embed_w: torch.Tensor
    embed_scale: torch.Tensor | None
    norm_w: torch.Tensor
    norm_eps: float
    norm_offset: bool
    lm_w: torch.Tensor
    lm_b: torch.Tensor | None
    softcap: float | None

    @property
    def args(self) -> tuple:
        return self.norm_w, self.norm_eps, self.lm_w, self.lm_b, self.norm_offset, self.softcap

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, S] token ids -> [B, S, hidden], the stream entering attn.0."""
        w = self.embed_w
        if hasattr(w, "qdata"):  # an int8 head (torchao Int8Tensor or gemlite): gather rows, then scale them
            x = (w.qdata[ids].to(torch.float32) * w.scale.reshape(-1)[ids][..., None]).to(self.norm_w.dtype)
        else:
            x = F.embedding(ids, w)
        return x if self.embed_scale is None else x * self.embed_scale

    @property
    def level(self) -> str:
        from rap.core.quant import weight_level

        return weight_level(self.embed_w)

    def at(self, level: str, fake: bool) -> "HeadWeights":
        """These weights with the head at `level`: fake=True holds the level's values dequantized (what
        rap.core.forward measures), fake=False the kernel's tensor (what the decoder runs). A tied lm_head
        stays one tensor with the embedding."""
        from rap.core.quant import fake_quantize, quantize_weight

        if level == self.level:
            return self
        if self.level != "dtype":
            raise ValueError(f"the head is resident at {self.level}; it can only run there")
        make = (lambda w: fake_quantize(w, level)) if fake else (lambda w: quantize_weight(w, level, "head"))
        embed = make(self.embed_w)
        return replace(self, embed_w=embed, lm_w=embed if same_tensor(self.lm_w, self.embed_w) else make(self.lm_w))


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


def head_weights(view: BlockView) -> HeadWeights:
    """The embedding, final norm and lm_head as rap's layer functions read them (the HF modules' tensors)."""
    inner, head = view.model.model, view.model.lm_head
    return HeadWeights(embed_w=inner.embed_tokens.weight, embed_scale=embed_scale(view), norm_w=inner.norm.weight,
                       norm_eps=norm_eps(inner.norm), norm_offset=is_gemma(view), lm_w=head.weight, lm_b=head.bias,
                       softcap=getattr(view.config, "final_logit_softcapping", None))


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
