"""The decoder's prefill: every kept layer over the whole prompt (eager), K/V straight into the cache.

One SDPA call per kept attention block (cuDNN / flash / memory-efficient kernels), writing keys and
values into the static cache (or, with a `KeepPlan`, only the tokens rap.decode.compress keeps); each
block's tensors are freed before the next block runs, so the peak is one block's transients (what
`rap.core.memory` counts). Prompts run a few rows at a time (`prefill_rows` of `rap.core.memory`), so
the transients stay bounded however large the batch is.
Each function takes the `rap.decode.decoder.Decoder` as `dec` (its weights, head and settings).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from rap.core.hf import sdpa_attention
from rap.core.layers import AttnWeights, attn_output, ffn_block, final_logits, project_qkv
from rap.core.mask import BlockMask
from rap.core.memory import prefill_rows as rows_per_chunk
from rap.decode.compress import KeepPlan, keep_prompt, keep_prompt_flat
from rap.decode.workspace import Workspace
from rap.kv.decode_cache import FlatLayerCache


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


def prefill(dec, ws: Workspace, mask: BlockMask, ids: torch.Tensor, pad: torch.Tensor,
            plan: KeepPlan | None = None) -> torch.Tensor:
    """ids [n, P] left-padded; writes K/V of columns [0, P) for rows [0, n) (with a plan, the kept
    columns [0, plan.width)); returns logits [n, V]."""
    n, P = ids.shape
    rows = rows_per_chunk(P, dec.prefill_chunk_tokens)
    logits = torch.empty(n, dec.view.shape.vocab_size, device=dec.device, dtype=torch.float32)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        part = None if plan is None else plan.rows(r0, r1)
        logits[r0:r1] = prefill_rows(dec, ws, mask, ids[r0:r1], pad[r0:r1], r0, part)
    return logits


def prefill_rows(dec, ws: Workspace, mask: BlockMask, ids: torch.Tensor, pad: torch.Tensor, r0: int,
                 plan: KeepPlan | None) -> torch.Tensor:
    """The prefill of rows [r0, r0 + n) of the batch: every layer over these rows only (rows never
    attend to each other, so this equals the whole batch at once), K/V into their cache rows."""
    n, P = ids.shape
    cols = torch.arange(P, device=dec.device)
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

    x = dec.head_for(mask).embed(ids)
    attn, ffn = dec.block_weights(mask)
    for i in range(mask.num_layers):
        if mask.keep_attn[i]:
            a = attn[i]
            cache = ws.kv[i]
            if isinstance(cache, FlatLayerCache):
                x = prefill_attention(x, a, cos[a.rope], sin[a.rope], None, None, mask_for(a.window),
                                      replace(plan.for_layer(i), r0=r0), flat=cache)
            else:
                kc, vc = cache
                x = prefill_attention(x, a, cos[a.rope], sin[a.rope], kc[r0:r0 + n], vc[r0:r0 + n],
                                      mask_for(a.window), plan)
        if mask.keep_ffn[i]:
            x = ffn_block(x, ffn[i])
    return final_logits(x, *dec.head_for(mask).args)
