"""BlockRunner: a model's forward pass one block at a time, so a search can start anywhere.

A block is a residual update of the hidden stream ``h`` (shape [batch, seq, hidden]):

    attn.i:  h = h + post_attn_norm?(self_attn(input_layernorm(h)))
    ffn.i:   h = h + post_ffn_norm?(mlp(pre_ffn_norm(h)))      # pre_ffn_norm = post_attention_layernorm (Llama)

computed by rap's own layer functions (`rap.core.forward.Forward.attn_block` / `ffn_block`, the ones
the decoder serves with), which reproduce the stock forward pass bit for bit in float32
(tests/test_forward.py). The runner counts how many (block, window) passes it has run: the unit in
which GSI's cost is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rap.errors import UnsupportedModelError
from rap.eval.perplexity import window_nll
from rap.core.forward import Forward, forward_for
from rap.core.mask import BlockMask
from rap.core.model import BlockView


@dataclass
class BlockRunner:
    view: BlockView
    block_window_passes: int = 0  # (block, window) pairs run so far
    head_window_passes: int = 0
    _forward: Forward | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if getattr(self.view.config, "use_bidirectional_attention", False):
            raise UnsupportedModelError("bidirectional-attention configs cannot be profiled block by block")
        self._forward = forward_for(self.view)

    # ---- block order ------------------------------------------------------------------------
    @property
    def all_blocks(self) -> list[str]:
        """attn.0, ffn.0, attn.1, ... : the order the stream passes through them."""
        return [b.name for b in self.view.blocks]

    def kept_blocks(self, mask: BlockMask) -> list[str]:
        return [name for name in self.all_blocks if mask.keeps(name)]

    # ---- pieces of the forward pass -----------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq] token ids -> [batch, seq, hidden] stream entering attn.0."""
        return self._forward.embed(ids)

    @torch.no_grad()
    def run_block(self, name: str, h: torch.Tensor, windows: int | None = None) -> torch.Tensor:
        """Apply block `name` to a stream [rows, seq, hidden]; `windows` (default rows) is what gets counted."""
        out = self._forward.block(name, h)
        self.block_window_passes += h.shape[0] if windows is None else windows
        return out

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self._forward.head(h)

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
