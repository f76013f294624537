"""Picking the next token on the device: greedy or temperature + nucleus, capturable, seeded per row."""

from __future__ import annotations

from typing import Sequence

import torch

from rap.decode.workspace import Workspace


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


def advance(ws: Workspace, logits: torch.Tensor, sampled: bool) -> None:
    """Pick every row's next token from `logits` [B, V] and write it at the next column; a row that
    stopped repeats the pad token, a row that emits a stop id is done. No host sync (capturable)."""
    nxt = pick_tokens(logits, ws.temperature, ws.top_p, ws.noise if sampled else None)
    nxt = torch.where(ws.done, ws.pad_id, nxt)
    ws.done |= (nxt[:, None] == ws.stop[None, :]).any(-1)
    ws.col += 1
    ws.out.index_copy_(1, ws.col, nxt[:, None])
    ws.tokens.copy_(nxt)


def row_generators(seed: int | Sequence[int | None] | None, device: torch.device) -> list[torch.Generator]:
    """One generator for the batch (an int or None seed), or one per row (a sequence; None: random)."""
    gens: list[torch.Generator] = []
    per_row = not isinstance(seed, int) and seed is not None
    for s in (seed if per_row else [seed]):
        gens.append(torch.Generator(device))
        gens[-1].manual_seed(s % 2**64 if s is not None else int(torch.randint(0, 2**62, ()).item()))
    return gens


def draw_noise(ws: Workspace, gens: list[torch.Generator], rows: int) -> None:
    """Fill the sampling noise of rows [0, rows) (one generator) or of each seeded row."""
    if len(gens) == 1:
        ws.noise[:rows].uniform_(generator=gens[0])
    else:  # one generator per row: a row's noise is its seed's alone
        for r, g in enumerate(gens):
            ws.noise[r].uniform_(generator=g)
