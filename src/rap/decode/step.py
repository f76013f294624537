"""The decoder's decode step: one token for every row, from the workspace's buffers.

`static_step` is the step a CUDA graph captures (rap.decode.graphs): no host syncs, no
data-dependent shapes, attention over the whole static cache, masked. `exact_step` runs eagerly over
the filled columns only, through transformers' SDPA wrapper with the mask `generate` would build, so
float32 tokens equal `generate`'s exactly (the default on CPU).
Each function takes the `rap.decode.decoder.Decoder` as `dec` (its weights, head and settings).
"""

from __future__ import annotations

import torch

from rap.core.hf import sdpa_attention
from rap.core.layers import attn_decode_flat, attn_output, ffn_block, final_logits, project_qkv
from rap.core.mask import BlockMask
from rap.decode.sampling import advance
from rap.decode.workspace import Workspace
from rap.kv.decode_cache import FlatLayerCache


def static_step(dec, ws: Workspace, mask: BlockMask, sampled: bool) -> None:
    """One decode step over static buffers: capturable (no host syncs, no data-dependent shapes)."""
    x = dec.head_for(mask).embed(ws.tokens[:, None])  # [B, 1, hidden]
    pos = ws.col - ws.pad + ws.shift  # [B] true positions (columns of a compressed cache are fewer)
    cos, sin = ws.cos[:, pos][:, :, None, None, :], ws.sin[:, pos][:, :, None, None, :]  # [R, B, 1, 1, D]
    valid = (ws.arange[None, :] >= ws.pad[:, None]) & (ws.arange[None, :] <= ws.col)
    windowed: dict[int, torch.Tensor] = {}
    attn, ffn = dec.block_weights(mask)
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
                x = dec._attn_fn(x, a, cos[a.rope], sin[a.rope], kc, vc, ws.col, v, dec.attention)
        if mask.keep_ffn[i]:
            x = dec._ffn_fn(x, ffn[i])
    logits = dec._head_fn(x, *dec.head_for(mask).args)
    advance(ws, logits, sampled)


def exact_step(dec, ws: Workspace, mask: BlockMask, sampled: bool, n: int) -> None:
    """The decode step without a graph: attends to the filled columns only, through transformers'
    SDPA wrapper with the mask `generate` would build, so float32 tokens equal generate's exactly."""

    col = int(ws.col)
    L = col + 1
    x = dec.head_for(mask).embed(ws.tokens[:n, None])
    pos = ws.col - ws.pad[:n] + ws.shift[:n]
    cos, sin = ws.cos[:, pos][:, :, None, None, :], ws.sin[:, pos][:, :, None, None, :]
    keys = ws.arange[:L]
    real = keys[None, :] >= ws.pad[:n, None]  # [n, L]
    padded = not bool(real.all())
    attn, ffn = dec.block_weights(mask)
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
    logits = final_logits(x, *dec.head_for(mask).args)
    if n < ws.batch:  # bucket rows beyond the request are idle on this path
        logits = torch.cat([logits, logits.new_zeros(ws.batch - n, logits.shape[1])])
    advance(ws, logits, sampled)
