"""`rap train-policy` and `rap decide`: parse, call the library, print."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import typer

from rap.errors import RapError
from rap.sources import planning_memory


def read_profile(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise RapError(f"cannot read profile {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise RapError(f"profile {path} is not valid JSON: {e.msg} (line {e.lineno})") from None


def register(app: typer.Typer) -> None:
    @app.command("train-policy")
    def train_policy(
        model: str,
        profile: Path = typer.Option(..., help="profile.json (block removal order) from rap profile"),
        out: Path = typer.Option(Path("policy.zip"), help="where to write the trained policy"),
        steps: int = typer.Option(200_000, help="RL environment steps (one decision each)"),
        seed: int = typer.Option(0, help="seed for scenarios, network init and sampling"),
        resume: bool = typer.Option(False, "--resume", help="continue training the policy already at --out"),
        calib_seq: int = typer.Option(256, help="calibration window length (WikiText-2 valid)"),
        calib_tokens: int = typer.Option(512, help="calibration tokens (windows x length)"),
        design: int = typer.Option(150, help="random masks measured to fit the quality surrogate"),
        kv_samples: int = typer.Option(2, help="spans per prompt length when measuring the KV penalty"),
        ladder_step: int = typer.Option(5, help="measure the mask ladder at every N-th count pair (0: none)"),
        dtype: str = typer.Option("bf16", help="dtype the model will run in (what the memory model plans for)"),
        cache: Optional[Path] = typer.Option(None, help="measurement cache (default: OUT + .cache.json)"),
        progress: bool = typer.Option(True, help="show progress bars"),
    ) -> None:
        """Train the runtime policy: measure quality on calibration data, then MaskablePPO."""
        from rich.console import Console

        from rap.cli import load_view_for_cli
        from rap.data import WIKITEXT2_VALID, read_text
        from rap.eval.perplexity import needs_bos, token_windows
        from rap.policy.context import PolicyContext
        from rap.policy.evaluator import MeasuredEvaluator
        from rap.policy.rl import Bundle
        from rap.policy.train import TrainConfig, base_meta, prepare_quality, train_agent, validate_profile

        console = Console(highlight=False, stderr=True)
        import importlib.util

        if importlib.util.find_spec("sb3_contrib") is None:
            raise RapError("training needs the rl extra: pip install 'rap-runtime[rl]'")
        prof = read_profile(profile)
        memory = planning_memory(model, dtype)
        validate_profile(prof, memory.shape.num_layers)
        if resume and out.is_file():
            # the quality model and ladder were measured before training started: reuse them
            old = Bundle.load(out)
            if old.order != list(prof["order"]):
                raise RapError(f"{out} was trained with another profile order; resume with the same --profile")
            quality, ladder, meta = old.quality, old.ladder, {k: v for k, v in old.meta.items() if k != "training"}
            console.print(f"resuming {out}: reusing its quality model ({len(quality.measured)} measured masks)")
        else:
            view, tok = load_view_for_cli(model, dtype="fp32", device="cpu")
            text = read_text(WIKITEXT2_VALID)
            bos = needs_bos(tok, view.config.model_type)
            windows = token_windows(text[:400_000], tok, calib_seq, calib_tokens, bos=bos)
            evaluator = MeasuredEvaluator(view, windows, cache_path=cache or out.with_name(out.name + ".cache.json"),
                                          label=f"{WIKITEXT2_VALID} {tuple(windows.shape)}")
            stream = tok(text[400_000:], add_special_tokens=False, return_tensors="pt").input_ids[0]
            t0 = time.perf_counter()
            quality, ladder = prepare_quality(view, prof, evaluator, kv_stream=stream, design_count=design,
                                              kv_samples=kv_samples, ladder_step=ladder_step, seed=seed,
                                              progress=progress)
            quality.calibration.update(chars=400_000, seq_len=calib_seq, max_tokens=calib_tokens,
                                       source=WIKITEXT2_VALID)
            console.print(f"quality model: {len(quality.measured)} masks measured on {evaluator.tokens} calibration "
                          f"tokens, surrogate held-out rmse {quality.surrogate.cv_rmse:.3f} (log1p), "
                          f"{time.perf_counter() - t0:.0f} s")
            meta = base_meta(model, view.num_layers, prof, quality, ladder, dtype)
        ctx = PolicyContext(memory, prof["order"], quality, prof.get("scores"), model, ladder=ladder)
        cfg = TrainConfig(steps=steps, seed=seed)
        bundle = train_agent(ctx, meta, out, cfg, resume=resume, progress=progress)
        t = bundle.meta["training"]
        console.print(f"wrote {out}: {t['timesteps']:,} steps in {t['seconds']:.0f} s (seed {seed})")

    @app.command()
    def decide(
        model: str,
        budget: str = typer.Option(..., help="memory budget, e.g. 6GiB"),
        batch: int = typer.Option(1, help="sequences in the batch"),
        prompt: int = typer.Option(512, help="prompt tokens per sequence"),
        new: int = typer.Option(128, help="new tokens per sequence"),
        policy: Optional[str] = typer.Option(None, help="a trained policy .zip, or: solver, int8-only, int4-only "
                                             "(a level per block, over the shipped level profile), rl, ladder, "
                                             "precision, gsi-order, knapsack, ffn-first, attn-first, oracle "
                                             "(default: solver where a level profile ships, else precision: "
                                             "int8 then int4 before any drop, then the best drop policy)"),
        bundle: Optional[Path] = typer.Option(None, help="trained policy .zip providing the quality model for "
                                              "named policies"),
        profile: Optional[Path] = typer.Option(None, help="profile.json, for named policies without a bundle"),
        dtype: str = typer.Option("bf16", help="dtype the model runs in"),
        as_json: bool = typer.Option(False, "--json", help="print JSON"),
    ) -> None:
        """Pick blocks and a KV keep ratio for one request under a memory budget."""
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        from rap.core.memory import Request, format_bytes, parse_bytes
        from rap.policy import make_policy

        console = Console(highlight=False)
        request = Request(batch, prompt, new)
        budget_bytes = parse_bytes(budget)
        memory = planning_memory(model, dtype)
        from rap.policy import DEFAULT_LEVEL_POLICY, LEVEL_POLICY_NAMES, bundled_level_profile, make_level_policy

        level_path = bundled_level_profile(model)
        level_path = level_path if level_path is not None and level_path.exists() else None
        name = policy or (DEFAULT_LEVEL_POLICY if level_path is not None and bundle is None and profile is None
                          else "precision")
        if name.endswith(".zip"):
            bundle, name = Path(name), "rl"
        if name in LEVEL_POLICY_NAMES:  # a level for every block (rap.policy.solver) over the shipped level profile
            if level_path is None:
                raise RapError(f"policy {name!r} needs a level profile; none ships for {model} "
                               "(rap profile MODEL --method levels)")
            from rap.profile.levels import load_level_profile

            level_prof = load_level_profile(level_path)
            pol = make_level_policy(name, memory, level_prof)
            dense, kv_note = level_prof.dense_ppl, False
            L = memory.shape.num_layers
        else:
            ctx, loaded = _context(memory, model, bundle, profile)
            pol = make_policy(name, ctx, loaded)
            dense, L = ctx.quality.dense_ppl, ctx.num_layers
            kv_note = not math.isfinite(dense) or ctx.quality.kv_penalty.method.startswith("none")
        t0 = time.perf_counter()
        d = pol.decide(request, budget_bytes)
        ms = (time.perf_counter() - t0) * 1e3
        if as_json:
            print(json.dumps({**d.to_dict(), "decision_ms": ms, "model": model}, indent=2))
            return
        br = d.breakdown
        console.print(escape(f"{model}: batch {batch}, prompt {prompt}, new {new}, budget {format_bytes(budget_bytes)} "
                             f"-> policy {d.policy} ({ms:.2f} ms)"))
        console.print(f"keep {d.kept_attn}/{L} attention and {d.kept_ffn}/{L} FFN blocks, KV keep ratio {d.kv_ratio:g}")
        console.print(escape(f"dropped: {', '.join(d.mask.dropped) or 'nothing'}"))
        if getattr(d.mask, "is_quantized", False):
            counts = ", ".join(f"{n} {lv}" for lv, n in d.mask.counts().items())
            console.print(escape(f"plan: {d.mask} ({counts})"))
        table = Table("term", "bytes", "")
        for label, n in (("parameters", br.param_bytes), ("KV cache", br.kv_bytes),
                         ("activations", br.activation_bytes), ("total peak", br.total_bytes),
                         ("budget", d.budget_bytes)):
            table.add_row(label, f"{n:,}", format_bytes(n))
        console.print(table)
        ppl = f" (calibration PPL {dense * d.predicted_ppl_ratio:.2f} vs dense {dense:.2f})" if math.isfinite(dense) else ""
        console.print(f"predicted quality: PPL ratio to dense {d.predicted_ppl_ratio:.3f}{ppl}")
        if kv_note:
            console.print("[dim]predicted from the profile's curve only (no trained policy bundle): "
                          "KV compression not considered[/dim]")


def _context(memory, model: str, bundle: Optional[Path], profile: Optional[Path]):
    """PolicyContext from a trained bundle, or from a profile alone."""
    from rap.policy.context import PolicyContext
    from rap.policy.evaluator import QualityModel
    from rap.policy.rl import Bundle

    if bundle is None and profile is None:
        from rap.sources import bundled_policy

        shipped = bundled_policy(model, memory.shape.num_layers)
        if shipped is not None and shipped.suffix == ".zip":
            bundle = shipped
        else:
            profile = shipped
    if bundle is not None:
        loaded = Bundle.load(bundle)
        return loaded.context(memory), loaded
    if profile is None:
        raise RapError(f"no profile ships for {model}: give a trained policy (--policy policy.zip or --bundle "
                       "policy.zip) or --profile profile.json (from `rap profile`)")
    prof = read_profile(profile)
    from rap.policy.train import validate_profile

    validate_profile(prof, memory.shape.num_layers)
    return PolicyContext(memory, prof["order"], QualityModel.from_profile(prof), prof.get("scores"), model), None
