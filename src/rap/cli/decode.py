"""`rap generate MODEL --prompt ... --drop ...`: the fast masked decode path from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer


def generate(
    model: str,
    prompt: List[str] = typer.Option(..., "--prompt", "-p", help="a prompt; repeat for a batch"),
    max_new: int = typer.Option(64, "--max-new", help="new tokens per prompt"),
    drop: Optional[str] = typer.Option(None, help="blocks to drop: attn.3,ffn.7 | a count/fraction with --profile | mask.json"),
    profile: Optional[Path] = typer.Option(None, help="profile.json giving the removal order"),
    plan: Optional[str] = typer.Option(None, help="a level per block: ffn.3=int4,attn.7=drop,ffn.*=int8 | plan.json "
                                       "(see rap memory --help)"),
    kv_ratio: float = typer.Option(1.0, "--kv-ratio", help="KV keep ratio in (0, 1]: prompt tokens kept after prefill"),
    kv_press: str = typer.Option("adakv", "--kv-press", help="below ratio 1: adakv (head-adaptive) | snapkv (uniform) | "
                                  "pyramidkv (per-layer pyramid) | ada-pyramidkv (both)"),
    kv_bits: int = typer.Option(16, "--kv-bits", help="16 (the model's dtype) | 8 (int8 keys and values) | 4 "
                                                           "(int4 keys and values, two per byte)"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling mass, in (0, 1]"),
    seed: Optional[int] = typer.Option(None, help="seed for sampling (same seed, same tokens)"),
    stop: Optional[str] = typer.Option(None, help="comma-separated stop token ids (default: the tokenizer's EOS)"),
    dtype: Optional[str] = typer.Option(None, help="bf16 | fp32 (default: bf16 on GPU, fp32 on CPU)"),
    device: Optional[str] = typer.Option(None, help="cuda | cpu (default: cuda when available)"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                           help="torch.compile the block functions (default: on CUDA only)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON (texts, tokens, timing)"),
) -> None:
    """Generate with rap's decoder: static KV cache for kept attention blocks, one CUDA graph per mask."""
    from rich.markup import escape

    from rap.cli import console, load_view_for_cli, parse_mask
    from rap.decode.decoder import Decoder
    from rap.errors import RequestError

    view, tok = load_view_for_cli(model, dtype=dtype, device=device)
    mask = parse_mask(view, drop, profile, plan)
    if stop is not None:
        try:
            stops = [int(s) for s in stop.split(",") if s.strip()]
        except ValueError:
            raise RequestError(f"--stop takes token ids like 2 or 2,13, got {stop!r}") from None
    else:
        stops = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if any(not p.strip() for p in prompt):
        raise RequestError("the prompt is empty: give some text with --prompt")
    ids = [tok(p).input_ids for p in prompt]
    decoder = Decoder(view, compile=compile)
    if not 0 < kv_ratio <= 1:
        raise RequestError(f"--kv-ratio must be in (0, 1], got {kv_ratio}")
    result = decoder.generate(ids, max_new, mask=mask, temperature=temperature, top_p=top_p, seed=seed,
                              stop_token_ids=stops, pad_token_id=tok.pad_token_id, kv_ratio=kv_ratio,
                              kv_press=kv_press, kv_bits=kv_bits)
    texts = [tok.decode(t, skip_special_tokens=True) for t in result.tokens]
    t = result.timing
    if as_json:
        print(json.dumps({"model": view.name, "mask": str(mask), "kv_ratio": kv_ratio,
                          "kv_press": result.kv_press, "kv_bits": result.kv_bits, "texts": texts, "tokens": result.tokens,
                          "timing": t.to_dict(), "device": str(view.device)}, indent=2))
        return
    for p, text in zip(prompt, texts):
        console.print(f"[bold]{escape(p)}[/bold]{escape(text)}")
    graph = f", graph capture {t.capture_ms:.0f} ms" if t.capture_ms else (", cached graph" if t.graph else "")
    kv = f" ({result.kv_press})" if result.kv_press else ""
    kv += f", int{result.kv_bits} KV" if result.kv_bits != 16 else ""
    console.print(escape(f"[{mask}] kv ratio {kv_ratio:g}{kv}, {len(prompt)} prompt(s) on {view.device}: prefill {t.prefill_ms:.1f} ms, "
                         f"{t.decode_steps} decode steps at {t.ms_per_step:.2f} ms ({t.tokens_per_s:.1f} tok/s){graph}"),
                  style="dim")


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
