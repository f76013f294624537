"""Stock-transformers references for rap's own forward (helpers for the tests, not tests)."""

import contextlib

import torch

from rap.core.mask import BlockMask
from rap.core.model import BlockView


@contextlib.contextmanager
def zeroed_blocks(view: BlockView, mask: BlockMask):
    """Stock transformers forward with every block `mask` drops adding zero: forward hooks zero the
    dropped modules' outputs (the modules still run, their cache entries are simply never read by
    anything that matters). Independent of rap's patched HF path (`BlockView.masked`)."""
    handles = []
    for i in range(mask.num_layers):
        if not mask.keep_attn[i]:
            handles.append(view.attention_module(i).register_forward_hook(
                lambda m, args, out: (torch.zeros_like(out[0]), *out[1:])))
        if not mask.keep_ffn[i]:
            handles.append(view.mlp_module(i).register_forward_hook(lambda m, args, out: torch.zeros_like(out)))
    try:
        yield view
    finally:
        for h in handles:
            h.remove()


def reference_logits(view: BlockView, ids: torch.Tensor, mask: BlockMask, **kwargs) -> torch.Tensor:
    with torch.no_grad(), zeroed_blocks(view, mask):
        return view.model(input_ids=ids.to(view.device), use_cache=False, **kwargs).logits


def reference_generate(view: BlockView, mask: BlockMask, prompts, new_tokens: int, pad_id: int = 0):
    """Greedy `generate` on left-padded prompts under `mask` (zeroed blocks); new tokens per row."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, P - len(p):] = torch.tensor(p)
        attn[r, P - len(p):] = 1
    with torch.no_grad(), zeroed_blocks(view, mask):
        out = view.model.generate(input_ids=ids.to(view.device), attention_mask=attn.to(view.device),
                                  max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
    return [row[P:].tolist() for row in out]
