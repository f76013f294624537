"""rap's full-sequence forward: the decoder's own layer functions over a whole window, no KV cache.

    fwd = Forward(view)
    logits = fwd.logits(ids, mask)                       # [B, S, V], what HF's forward(...).logits is
    logits = fwd.logits(ids, mask, keep=positions)       # only these positions (zero-shot scoring)
    h = fwd.embed(ids); h = fwd.attn_block(0, h); h = fwd.ffn_block(0, h); ...   # one block at a time (GSI)

Perplexity, GSI calibration, zero-shot scoring and the policy's measurements run on this; serving
runs `rap.decode.decoder.Decoder`, whose prefill and decode step call the same functions (rap.core.layers: `project_qkv`,
`attn_output`, `ffn_block`, `rms_norm`, read from the HF modules by `attn_weights` / `ffn_weights`).
transformers supplies the weights, the rotary tables (its own rotary module, so the values are its
values) and the SDPA wrapper, and is the reference in tests (tests/test_forward.py compares logits
with stock `forward` for every supported family).

A dropped block is simply not run: nothing is patched into the HF model, so a `BlockMask` costs
nothing to change and the view's own mask is never touched.

Masks. Without `positions`/`attn_mask`, rows are unpadded windows: full-attention layers take SDPA's
is_causal path (as transformers does for unpadded input) and sliding-window layers a boolean
[S, S] band. With a custom `attn_mask` ([B, 1, S, S] bool, True = may attend; every query must see
at least itself) and `positions` ([B, S] RoPE positions), sliding-window layers additionally drop
keys whose position is `window` or more behind the query's, so packed rows (zero-shot) stay exact
for sliding-window models too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rap.core.layers import (DECODE_MODEL_TYPES, AttnWeights, attn_output, attn_weights, check_static_rope, ffn_block,
                             ffn_weights, head_weights, lm_logits, project_qkv, rope_kinds, rope_tables)
from rap.errors import UnsupportedModelError
from rap.core.hf import sdpa_attention
from rap.core.mask import BlockMask
from rap.core.plan import DROP, DTYPE
from rap.core.quant import fake_quantize, weight_level
from rap.core.model import BlockView

FORWARD_MODEL_TYPES = DECODE_MODEL_TYPES


def attn_block(x: torch.Tensor, a: AttnWeights, cos: torch.Tensor, sin: torch.Tensor,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One attention block over whole rows, no cache: x [B, S, hidden] -> x + attention update.

    cos/sin [B or 1, 1, S, D]; attn_mask None (causal, SDPA's is_causal path) or bool [B or 1, 1, S, S].
    Through transformers' SDPA wrapper, as the decoder's prefill, so values equal the stock forward's.
    """
    B, S, _ = x.shape
    q, k, v = project_qkv(x, a, cos, sin)
    o, _ = sdpa_attention(a.module, q, k, v, attn_mask, scaling=a.scaling)
    del q, k, v
    return attn_output(x, o.reshape(B, S, -1), a)


@dataclass
class _Rows:
    """What every attention layer needs for one batch of rows: RoPE rows and masks per window."""

    cos: torch.Tensor  # [R, B or 1, 1, S, D]
    sin: torch.Tensor
    masks: dict  # window (None = full attention) -> bool mask or None


class Forward:
    """A view's forward pass on rap's layer functions; any `BlockMask`, no KV cache.

    Holds no copies: the weights are the HF modules' own tensors. `mask` arguments default to the
    full model (not the view's mask: jobs pass the mask they measure).
    """

    def __init__(self, view: BlockView):
        model_type = view.config.model_type
        if model_type not in FORWARD_MODEL_TYPES:
            raise UnsupportedModelError(f"rap's forward supports {', '.join(FORWARD_MODEL_TYPES)}, not {model_type!r}")
        if getattr(view.config, "use_bidirectional_attention", False):
            raise UnsupportedModelError("bidirectional-attention configs are not causal LMs")
        check_static_rope(view)
        self.view = view
        self.kinds = rope_kinds(view)
        self.attn = [attn_weights(view, i, self.kinds) for i in range(view.num_layers)]
        self.ffn = [ffn_weights(view, i) for i in range(view.num_layers)]
        self.head_w = head_weights(view)  # embedding, final norm, lm_head: the decoder reads the same
        self._cos: torch.Tensor | None = None  # [R, T, D], grown on demand
        self._sin: torch.Tensor | None = None
        self._plain: dict[int, _Rows] = {}  # S -> the unpadded-window context
        self._quantized: dict = {}  # (first field, layer, level) -> weights with quantized values
        self._heads: dict = {}  # head level -> HeadWeights holding that level's values

    @property
    def num_layers(self) -> int:
        return self.view.num_layers

    def weights(self, mask: BlockMask) -> tuple[list[AttnWeights], list]:
        """Per-layer weights under `mask`. A `Plan`'s int8 / int4 blocks carry their quantized values
        (`rap.core.quant.fake_quantize`: what the kernels hold, dequantized), so perplexity, zero-shot and
        the demo's probe measure the model that serves. A block already resident quantized (moved by
        `rap.serve.residency`) runs its kernels' tensors as they are. Copies are cached per (block, level)."""
        if not getattr(mask, "is_quantized", False):
            return self.attn, self.ffn
        return ([self._at(self.attn[i], ("wq", "wk", "wv", "wo"), i, lv) for i, lv in enumerate(mask.attn_levels)],
                [self._at(self.ffn[i], ("wg", "wu", "wd"), i, lv) for i, lv in enumerate(mask.ffn_levels)])

    def _at(self, w, fields: tuple[str, ...], layer: int, level: str):
        if level in (DTYPE, DROP) or weight_level(getattr(w, fields[0])) != DTYPE:
            return w
        key = (fields[0], layer, level)
        if key not in self._quantized:
            self._quantized[key] = replace(w, **{f: fake_quantize(getattr(w, f), level) for f in fields})
        return self._quantized[key]

    @property
    def device(self) -> torch.device:
        return self.view.device

    # ---- pieces ----------------------------------------------------------------------------------------
    def _tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[1] < length:
            self._cos, self._sin = rope_tables(self.view, 64 * -(-length // 64), self.kinds)
        return self._cos, self._sin

    def _rows(self, S: int, positions: torch.Tensor | None, attn_mask: torch.Tensor | None) -> _Rows:
        if positions is None and attn_mask is None:
            if S not in self._plain:
                cos, sin = self._tables(S)
                self._plain[S] = _Rows(cos[:, None, None, :S], sin[:, None, None, :S], {})
            rows = self._plain[S]
            for a in self.attn:
                w = a.window if a.window is not None and a.window < S else None
                if w not in rows.masks:
                    if w is None:
                        rows.masks[w] = None
                    else:
                        q, k = torch.arange(S, device=self.device)[:, None], torch.arange(S, device=self.device)[None]
                        rows.masks[w] = ((k <= q) & (k > q - w))[None, None]
            return rows
        if positions is None:
            positions = torch.arange(S, device=self.device)[None]
        positions = positions.to(self.device)
        cos, sin = self._tables(int(positions.max()) + 1)
        masks: dict = {}
        base = attn_mask.to(self.device) if attn_mask is not None else \
            torch.ones(S, S, dtype=torch.bool, device=self.device).tril()[None, None]
        for a in self.attn:
            if a.window not in masks:
                if a.window is None:
                    masks[None] = base
                else:
                    near = (positions[:, :, None] - positions[:, None, :]) < a.window  # [B, S, S]
                    masks[a.window] = base & near[:, None]
        return _Rows(cos[:, positions][:, :, None], sin[:, positions][:, :, None], masks)

    def head_weights(self, mask: BlockMask | None = None):
        """The embedding / final norm / lm_head under `mask`: a `Plan`'s int8 head holds its quantized values."""
        return self.head_at(getattr(mask, "head_level", "dtype"))

    def head_at(self, level: str):
        """The head's weights at `level` ("dtype" or "int8"), as fake-quantized values (cached)."""
        if level == "dtype" or self.head_w.level != "dtype":
            return self.head_w
        if level not in self._heads:
            self._heads[level] = self.head_w.at(level, fake=True)
        return self._heads[level]

    def embed(self, ids: torch.Tensor, mask: BlockMask | None = None) -> torch.Tensor:
        """[B, S] token ids -> [B, S, hidden], the stream entering attn.0."""
        return self.head_weights(mask).embed(ids.to(self.device))

    def attn_block(self, i: int, x: torch.Tensor, positions: torch.Tensor | None = None,
                   attn_mask: torch.Tensor | None = None, rows: _Rows | None = None) -> torch.Tensor:
        """Layer i's attention block on a stream [B, S, hidden] (x + its update)."""
        rows = rows or self._rows(x.shape[1], positions, attn_mask)
        a = self.attn[i]
        w = a.window if a.window is not None and (a.window < x.shape[1] or positions is not None
                                                  or attn_mask is not None) else None
        return attn_block(x, a, rows.cos[a.rope], rows.sin[a.rope], rows.masks[w])

    def ffn_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Layer i's FFN block on a stream [B, S, hidden] (x + its update)."""
        return ffn_block(x, self.ffn[i])

    def block(self, name: str, x: torch.Tensor, rows: _Rows | None = None) -> torch.Tensor:
        """Block `name` ("attn.3", "ffn.0") on a stream."""
        kind, layer = name.split(".")
        return self.attn_block(int(layer), x, rows=rows) if kind == "attn" else self.ffn_block(int(layer), x)

    def head(self, x: torch.Tensor, keep: int | torch.Tensor | None = None, mask: BlockMask | None = None) -> torch.Tensor:
        """Final norm, lm_head and (Gemma) logit softcapping, in the model dtype as transformers returns
        them. keep: None = every position; an int k = the last k; a tensor = those positions."""
        if isinstance(keep, int) and keep > 0:
            x = x[:, -keep:]
        elif isinstance(keep, torch.Tensor):
            x = x[:, keep.to(x.device)]
        return lm_logits(x, *self.head_weights(mask).args)

    # ---- whole passes ------------------------------------------------------------------------------------
    @torch.no_grad()
    def hidden(self, ids: torch.Tensor, mask: BlockMask | None = None, positions: torch.Tensor | None = None,
               attn_mask: torch.Tensor | None = None, streams: list | None = None) -> torch.Tensor:
        """The stream [B, S, hidden] after the last kept block (before the final norm).

        streams: if a list, it receives the stream entering every kept block, then the final one
        (len = kept blocks + 1): the block inputs, and each block's output as the next entry.
        """
        mask = mask or BlockMask.full(self.num_layers)
        if mask.num_layers != self.num_layers:
            from rap.errors import MaskError

            raise MaskError(f"mask has {mask.num_layers} layers, the model has {self.num_layers}")
        x = self.embed(ids, mask)
        rows = self._rows(x.shape[1], positions, attn_mask)
        custom = positions is not None or attn_mask is not None
        attn, ffn = self.weights(mask)
        for i in range(self.num_layers):
            if mask.keep_attn[i]:
                if streams is not None:
                    streams.append(x)
                a = attn[i]
                w = a.window if a.window is not None and (custom or a.window < x.shape[1]) else None
                x = attn_block(x, a, rows.cos[a.rope], rows.sin[a.rope], rows.masks[w])
            if mask.keep_ffn[i]:
                if streams is not None:
                    streams.append(x)
                x = ffn_block(x, ffn[i])
        if streams is not None:
            streams.append(x)
        return x

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, mask: BlockMask | None = None, *, positions: torch.Tensor | None = None,
               attn_mask: torch.Tensor | None = None, keep: int | torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, S or len(keep), V] of rows `ids` [B, S] under `mask` (model dtype)."""
        return self.head(self.hidden(ids, mask, positions, attn_mask), keep, mask)


def forward_for(model) -> Forward:
    """A BlockView's Forward, cached on the view (weights are shared, so one per view is enough)."""
    if isinstance(model, Forward):
        return model
    if not isinstance(model, BlockView):
        raise TypeError(f"rap's forward needs a BlockView, got {type(model).__name__}")
    fwd = getattr(model, "_rap_forward", None)
    if fwd is None:
        fwd = Forward(model)
        model._rap_forward = fwd
    return fwd
