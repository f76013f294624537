"""BlockRunner: a model's forward pass one block at a time, so a search can start anywhere.

A block is a residual update of the hidden stream ``h`` (shape [batch, seq, hidden]):

    attn.i:  h = h + post_attn_norm?(self_attn(input_layernorm(h)))
    ffn.i:   h = h + post_ffn_norm?(mlp(pre_ffn_norm(h)))      # pre_ffn_norm = post_attention_layernorm (Llama)

which is exactly what the Hugging Face decoder layer computes (Llama, Mistral, Qwen2/3, Gemma3;
checked against transformers 5.17 and 5.23), so running the kept blocks in order reproduces
the stock forward pass bit for bit (tests/test_profile_runner.py). The runner prepares what the
layers need once per window length (rotary tables, the causal / sliding masks) and counts how
many (block, window) passes it has run: the unit in which GSI's cost is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..hf import causal_masks, rotary_tables
from ..eval.perplexity import window_nll
from ..mask import BlockMask
from ..model import BlockView


@dataclass
class _Prepared:
    """Per window length: rotary (cos, sin) and mask for each layer, batch dimension 1 (broadcast)."""

    position_embeddings: list[tuple[torch.Tensor, torch.Tensor]]
    attention_masks: list[torch.Tensor | None]


@dataclass
class BlockRunner:
    view: BlockView
    block_window_passes: int = 0  # (block, window) pairs run so far
    head_window_passes: int = 0
    _prepared: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        config = self.view.config
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedModelError("bidirectional-attention configs cannot be profiled block by block")
        inner = self.view.model.model
        self._embed = inner.embed_tokens
        self._norm = inner.norm
        self._rotary = inner.rotary_emb
        self._lm_head = self.view.model.lm_head
        self._softcap = getattr(config, "final_logit_softcapping", None)
        self._layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * self.view.num_layers)

    # ---- block order ------------------------------------------------------------------------
    @property
    def all_blocks(self) -> list[str]:
        """attn.0, ffn.0, attn.1, ... : the order the stream passes through them."""
        return [b.name for b in self.view.blocks]

    def kept_blocks(self, mask: BlockMask) -> list[str]:
        return [name for name in self.all_blocks if mask.keeps(name)]

    # ---- pieces of the forward pass -----------------------------------------------------------
    def _prepare(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> _Prepared:
        key = (seq_len, str(device), dtype)
        if key not in self._prepared:
            dummy = torch.zeros(1, seq_len, self.view.config.hidden_size, device=device, dtype=dtype)
            position_ids = torch.arange(seq_len, device=device).unsqueeze(0)
            masks = causal_masks(self.view.config, seq_len, device, dtype, self._layer_types)
            rotary = {t: rotary_tables(self._rotary, dummy, position_ids, t) for t in set(self._layer_types)}
            self._prepared[key] = _Prepared([rotary[t] for t in self._layer_types],
                                            [masks[t] for t in self._layer_types])
        return self._prepared[key]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq] token ids -> [batch, seq, hidden] stream entering attn.0."""
        return self._embed(ids.to(self.view.device))

    def run_block(self, name: str, h: torch.Tensor, windows: int | None = None) -> torch.Tensor:
        """Apply block `name` to a stream [rows, seq, hidden]; `windows` (default rows) is what gets counted."""
        b = self.view.block(name)
        layer = self.view.layers[b.layer]
        if b.kind == "attn":
            prep = self._prepare(h.shape[1], h.device, h.dtype)
            out, _ = self.view.attention_module(b.layer)(
                hidden_states=layer.input_layernorm(h),
                position_embeddings=prep.position_embeddings[b.layer],
                attention_mask=prep.attention_masks[b.layer],
            )
            if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma-style sandwich norm
                out = layer.post_attention_layernorm(out)
        else:
            pre = layer.pre_feedforward_layernorm if hasattr(layer, "pre_feedforward_layernorm") \
                else layer.post_attention_layernorm
            out = self.view.mlp_module(b.layer)(pre(h))
            if hasattr(layer, "post_feedforward_layernorm"):
                out = layer.post_feedforward_layernorm(out)
        self.block_window_passes += h.shape[0] if windows is None else windows
        return h + out

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self._lm_head(self._norm(h))
        if self._softcap is not None:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def window_nll(self, h: torch.Tensor, ids: torch.Tensor, rows_per_call: int = 4) -> torch.Tensor:
        """Summed next-token NLL of each row, fp32 [rows]; h [rows, seq, hidden], ids [rows, seq]."""
        ids = ids.to(h.device)
        out = [window_nll(self.logits(h[i:i + rows_per_call]), ids[i:i + rows_per_call])
               for i in range(0, h.shape[0], rows_per_call)]
        self.head_window_passes += h.shape[0]
        return torch.cat(out)

    # ---- whole passes -------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, mask: BlockMask | None = None) -> torch.Tensor:
        """Final stream [batch, seq, hidden] of the model under `mask` (default: the view's mask)."""
        h = self.embed(ids)
        for name in self.kept_blocks(mask or self.view.mask):
            h = self.run_block(name, h)
        return h

    @torch.no_grad()
    def nll(self, windows: torch.Tensor, mask: BlockMask | None = None, batch_size: int = 4) -> torch.Tensor:
        """Summed NLL per window [num_windows] under `mask`."""
        return torch.cat([self.window_nll(self.forward(windows[i:i + batch_size], mask), windows[i:i + batch_size])
                          for i in range(0, windows.shape[0], batch_size)]).cpu()


def check_block_layout(view: BlockView) -> None:
    """Fail early, with a clear message, for layers whose blocks are not plain residual updates."""
    for i, layer in enumerate(view.layers):
        for attr in ("input_layernorm", "post_attention_layernorm"):
            if not isinstance(getattr(layer, attr, None), nn.Module):
                raise UnsupportedModelError(f"layer {i} ({type(layer).__name__}) has no {attr}")
