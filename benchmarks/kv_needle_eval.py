"""Issue 16's needle (and L-Eval) evaluation: every press on the same cases, accuracy vs the KV bytes really held.

Two parts, each runnable alone (two processes share the box's cores), each rewriting its partial
JSON after every case so a killed run still yields what it measured; `--part merge` joins them,
writes the result JSON and the plot (accuracy vs mean KV bytes, one line per press).

* `--part decoder`: rap's decoder (what `rap serve` runs), one recorded prefill per case
  (`rap.eval.needle_decoder.PrefillReplay`) replayed for: full cache, int8 KV at 100%, uniform
  SnapKV and Ada-KV at each budget, PyramidKV's per-layer budgets (uniform over heads, and split by
  Ada-KV: "pyramidkv" / "ada-pyramidkv") at each `--decoder-pyramid-budgets`, int8 + Ada-KV at
  `--int8-budget`, int4 KV at 100% ("int4") and int4 + Ada-KV at `--int4-budget` (default: the
  int8 budget; `--presses int4,int4+adakv` runs just those beside the full cache). Bytes:
  `Decoder.kv_resident_bytes` after the answer.
* `--part hf`: the HF path, one plain-transformers prefill per case (SDPA, full attention over
  the prompt, as both rap.kv and kvpress prefill), recorded per layer (attention input, RoPE
  (cos, sin), cache position, the layer's full keys / values). Each press then compresses those
  recorded tensors exactly as its own forward hook would after that layer:
  - rap.kv's `AdaKV(SnapKV())` (and `PyramidKV`) via `press.keep` into a `VarlenCache`, decoded by
    `model.generate` on a model with rap's varlen attention (as `rap.kv.compress.generate`);
  - NVIDIA kvpress 0.5.5's `SnapKVPress` and `AdaKVPress(SnapKVPress)` by calling the press's own
    `forward_hook` on a `DynamicCache` holding the recorded keys / values, then kvpress's own
    greedy loop (`KVPressTextGenerationPipeline.generate_answer`: explicit position ids, the
    patched attention masking AdaKV's dropped keys). kvpress pins transformers<5.3; it is imported
    from `--kvpress-path` (installed there with --no-deps beside transformers 5.24), and the
    JSON says which version ran. Bytes: the cache's tensors (kvpress's AdaKV keeps the full cache).
  The prefill's hidden states do not depend on the press (compression happens after each layer's
  full attention), so replaying one prefill is what each press's own prefill would compute.

    nice -n 10 python benchmarks/kv_needle_eval.py --part decoder --out /tmp/kvn &
    KVPRESS_PATH=/path/to/kvpress-site nice -n 10 python benchmarks/kv_needle_eval.py --part hf --out /tmp/kvn &
    python benchmarks/kv_needle_eval.py --part merge --out /tmp/kvn --results benchmarks/results
    (--resume continues a part from its partial JSON; --device cuda runs it on a GPU)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

NEEDLES = [
    None,  # gkamradt's default: San Francisco, sandwich, Dolores Park
    ("\nThe secret ingredient in Grandma Rosa's famous soup is smoked paprika.\n",
     "What is the secret ingredient in Grandma Rosa's famous soup?", ("smoked", "paprika")),
    ("\nThe password for the old lighthouse door is blue pelican.\n",
     "What is the password for the old lighthouse door?", ("blue", "pelican")),
]


def cases(lengths: list[int], n_depths: int, needles: list[int], seed: int = 0) -> list[tuple[int, int, float]]:
    """(needle, length, depth) in a fixed shuffled order, so a run cut short covers every length and needle."""
    depths = [i / (n_depths - 1) for i in range(n_depths)]
    out = [(k, n, d) for k in needles for n in lengths for d in depths]
    random.Random(seed).shuffle(out)
    return out


def found_all(tok, spec, tokens) -> bool:
    """Every key phrase is in the answer so far: its score is 1 whatever follows, so decoding may stop
    there (score-preserving; it only saves CPU time)."""
    text = tok.decode(tokens, skip_special_tokens=True).lower()
    return all(p in text for p in spec.key_phrases)


def spec_of(k: int):
    from rap.eval.needle import NeedleSpec, default_spec

    return default_spec() if NEEDLES[k] is None else NeedleSpec(*NEEDLES[k])


def resume(path: Path) -> list[dict]:
    """Rows of an earlier (partial) run of this part, to skip its finished cases (`--resume`)."""
    return json.loads(path.read_text())["rows"] if path.exists() else []


@dataclass
class Case:
    key: dict  # the row fields naming the case: needle / length / depth, or task / doc / question
    ids: list[int]  # the whole prompt (question-aware: the question is compressed with the context)
    score: Callable[[str], float]
    done: Callable[[list[int]], bool]  # True once the score can no longer change (decoding may stop)


def case_key(row_or_key: dict) -> tuple:
    return tuple(row_or_key[k] for k in CASE_FIELDS[row_or_key.get("eval", "needle")])


CASE_FIELDS = {"needle": ("needle", "length", "depth"), "leval": ("task", "doc", "question")}


def make_cases(args, tok, rows: list[dict]) -> Iterator[Case]:
    """The eval's cases not already in `rows` (built lazily: a 4k needle case tokenizes fast, L-Eval reads
    its documents once)."""
    finished = {case_key(r) for r in rows}
    if args.eval == "needle":
        from rap.eval.needle import build_case, score_answer

        for k, n, d in cases(args.lengths_list, args.depths, args.needles_list)[: args.max_cases]:
            key = {"eval": "needle", "needle": k, "length": n, "depth": d}
            if case_key(key) in finished:
                continue
            spec = spec_of(k)
            c = build_case(tok, n, d, spec)
            yield Case(key, c.context_ids[0].tolist() + c.question_ids[0].tolist(),
                       lambda a, spec=spec: score_answer(a, spec), lambda t, spec=spec: found_all(tok, spec, t))
        return
    from rap.eval.leval import load_documents, score_answer as leval_score

    made = 0
    for task in args.tasks.split(","):
        docs = load_documents(tok, task, args.max_context, None, args.questions, args.max_new)
        for doc in docs:
            for q, (qids, gold) in enumerate(zip(doc.questions, doc.golds)):
                key = {"eval": "leval", "task": task, "doc": doc.index, "question": q, "gold": gold[:120]}
                made += 1
                if case_key(key) in finished or (args.max_cases and made > args.max_cases):
                    continue
                yield Case(key, doc.context_ids[0].tolist() + qids[0].tolist(),
                           lambda a, task=task, gold=gold: leval_score(task, a, gold), lambda t: False)


def write(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)


def run_decoder(args, out: Path) -> None:
    from rap import provenance
    from rap.decode.decoder import Decoder
    from rap.eval.needle_decoder import KVSetting, PrefillReplay
    from rap.sources import load_view

    view, tok = load_view(args.model, dtype=torch.float32, device=args.device)
    budgets = [float(b) for b in args.budgets.split(",")]
    settings = [KVSetting("full"), KVSetting("int8", 1.0, None, 8)]
    settings += [KVSetting("snapkv (decoder)", b, "snapkv") for b in budgets]
    settings += [KVSetting("adakv (decoder)", b, "adakv") for b in budgets]
    pyr = budgets if args.decoder_pyramid_budgets is None else [
        float(b) for b in args.decoder_pyramid_budgets.split(",") if b.strip()]
    settings += [KVSetting(f"{p} (decoder)", b, p) for p in ("pyramidkv", "ada-pyramidkv") for b in pyr]
    settings.append(KVSetting("int8+adakv (decoder)", args.int8_budget, "adakv", 8))
    int4_budget = args.int8_budget if args.int4_budget is None else args.int4_budget
    settings += [KVSetting("int4", 1.0, None, 4), KVSetting("int4+adakv (decoder)", int4_budget, "adakv", 4)]
    wanted = {p.strip() for p in args.presses.split(",")} if args.presses else None
    if wanted is not None:  # the full cache records the case's prefill either way; only wanted presses make rows
        settings = settings[:1] + [s for s in settings[1:] if s.name.split(" (")[0] in wanted]
    name = f"decoder{args.part_suffix}"
    dec = Decoder(view)
    head = {**provenance.environment(), "part": "decoder", "eval": args.eval, "model": args.model,
            "max_new_tokens": args.max_new, "settings": [vars(s) for s in settings]}
    rows, t0 = resume(out / f"{name}.json") if args.resume else [], time.time()
    per_case = len(settings) - (wanted is not None and "full" not in wanted)
    for case in make_cases(args, tok, rows):
        ids = case.ids
        replay = PrefillReplay(dec)
        for j, s in enumerate(settings):
            dec.release()
            seen: list[int] = []

            def on_step(new, seen=seen):
                seen.append(int(new[0]))
                return [case.done(seen)]

            kw = dict(kv_ratio=s.kv_ratio, kv_press=s.kv_press, kv_bits=s.kv_bits, stop_token_ids=tok.eos_token_id,
                      on_step=on_step)
            if j == 0:
                replay.capture_logits()
                gen = replay.record([ids], args.max_new, **kw)
                dec._prefill = replay._real_prefill
            else:
                gen = replay.replay([ids], args.max_new, **kw)
            answer = tok.decode(gen.tokens[0], skip_special_tokens=True)
            if j == 0 and wanted is not None and "full" not in wanted:
                continue
            rows.append({"press": s.name, "budget": s.kv_ratio, "kv_bits": s.kv_bits, **case.key,
                         "score": case.score(answer), "kv_bytes": dec.kv_resident_bytes,
                         "prompt_tokens": len(ids), "answer": answer.strip()[:120]})
        dec.release()
        write(out / f"{name}.json", {**head, "seconds": time.time() - t0, "rows": rows})
        print(f"{name}: {len(rows) // per_case} cases, {time.time() - t0:.0f} s", flush=True)


class Recorder:
    """Forward hooks on every attention module: its kwargs (attention input, RoPE, cache position)."""

    def __init__(self, model):
        self.seen: dict[int, dict] = {}
        self.handles = [layer.self_attn.register_forward_hook(self._hook, with_kwargs=True)
                        for layer in model.model.layers]

    def _hook(self, module, args, kwargs, output):
        self.seen[module.layer_idx] = {"hidden_states": kwargs["hidden_states"],
                                       "position_embeddings": kwargs["position_embeddings"],
                                       "cache_position": kwargs.get("cache_position"),
                                       "attention_mask": kwargs.get("attention_mask")}

    def remove(self):
        for h in self.handles:
            h.remove()


def run_hf(args, out: Path) -> None:
    from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

    class PhrasesFound(StoppingCriteria):
        def __init__(self, done, P):
            self.done, self.P = done, P

        def __call__(self, input_ids, scores, **kw):
            done = self.done(input_ids[0, self.P:].tolist())
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    from rap import provenance
    from rap.core.hf import cache_kwargs
    from rap.kv import AdaKV, Budget, PyramidKV, SnapKV
    from rap.kv.attention import use_varlen_attention
    from rap.kv.base import LayerInputs
    from rap.kv.cache import VarlenCache, VarlenLayer, cache_nbytes
    from rap.sources import load_view

    # kvpress wraps every attention function registered when it is imported: import it before rap
    # registers its varlen attention (use_varlen_attention), which must stay unwrapped
    kvp, kvp_error = None, None
    if args.kvpress_path:
        sys.path.insert(0, args.kvpress_path)
    try:
        import kvpress
        from kvpress import AdaKVPress, SnapKVPress

        kvp = {"version": getattr(kvpress, "__version__", None) or _dist_version(args.kvpress_path),
               "file": kvpress.__file__}
    except Exception as exc:  # recorded in the JSON: the rows are then absent, not faked
        kvp_error = f"{type(exc).__name__}: {exc}"
    budgets = [float(b) for b in args.budgets.split(",")]
    pyr_budgets = [float(b) for b in args.pyramid_budgets.split(",") if b.strip()]
    plain, tok = load_view(args.model, dtype=torch.float32, device=args.device)  # prefill + kvpress
    rapv, _ = load_view(args.model, dtype=torch.float32, device=args.device)  # rap's varlen attention for decoding
    use_varlen_attention(rapv.model)
    model = plain.model
    head = {**provenance.environment(), "part": "hf", "eval": args.eval, "model": args.model, "max_new_tokens": args.max_new,
            "kvpress": kvp, "kvpress_error": kvp_error,
            "kvpress_shim": "kvpress 0.5.5 pins transformers<5.3 and was installed --no-deps beside transformers "
                            "5.24; 5.24 no longer passes cache_position to attention modules, which kvpress's "
                            "forward_hook reads (is_prefilling), so the hook is given cache_position = arange(P), "
                            "what transformers < 5.3 passed at prefill. Nothing else of kvpress is changed."}
    cfg = model.config
    eos = tok.eos_token_id
    rows, t0 = resume(out / "hf.json") if args.resume else [], time.time()
    dev = plain.device
    for case in make_cases(args, tok, rows):
        ids = torch.tensor([case.ids], device=dev)
        P = ids.shape[1]
        rec = Recorder(model)
        full = DynamicCache(config=cfg)
        with torch.no_grad():
            logits = model(input_ids=ids, **cache_kwargs(full), use_cache=True, logits_to_keep=1).logits[:, -1]
        rec.remove()
        first = int(logits.argmax(-1))
        kv = [(layer.keys, layer.values) for layer in full.layers]
        del full

        def row(press, budget, answer, nbytes):
            rows.append({"press": press, "budget": budget, "kv_bits": 16, **case.key, "score": case.score(answer),
                         "kv_bytes": int(nbytes), "prompt_tokens": P, "answer": answer.strip()[:120]})

        # rap.kv's presses (HF path), from the recorded layers
        rap_presses = [("adakv (hf path)", AdaKV(SnapKV()), b) for b in budgets]
        rap_presses += [("pyramidkv (hf path)", PyramidKV(), b) for b in pyr_budgets]
        for name, press, b in rap_presses:
            L = len(kv)
            plan = press.layer_budgets(L, P, Budget(kv_ratio=b).tokens_for(P))
            layers = []
            with torch.no_grad():
                for i, (keys, values) in enumerate(kv):
                    if plan[i] >= P:
                        layers.append(VarlenLayer.from_dense(keys, values, args.max_new))
                        continue
                    s = rec.seen[i]
                    x = LayerInputs(model.model.layers[i].self_attn, s["hidden_states"], keys, values,
                                    s["position_embeddings"], i, L)
                    layers.append(VarlenLayer.from_keep_mask(keys, values, press.keep(x, plan[i]), args.max_new))
                cache = VarlenCache(layers)
                nbytes = cache.nbytes
                stop = StoppingCriteriaList([PhrasesFound(case.done, P)])
                gen = rapv.model.generate(torch.cat([ids, torch.tensor([[first]], device=dev)], 1), **cache_kwargs(cache),
                                          max_new_tokens=args.max_new - 1, do_sample=False, temperature=None,
                                          top_p=None, top_k=None, eos_token_id=eos, pad_token_id=eos,
                                          stopping_criteria=stop)
            row(name, b, tok.decode([first] + gen[0, P + 1:].tolist(), skip_special_tokens=True), nbytes)

        # NVIDIA kvpress, its own forward_hook on the same recorded layer inputs, its own greedy loop
        if kvp is not None:
            for name, make in (("kvpress snapkv", lambda r: SnapKVPress(compression_ratio=r)),
                               ("kvpress adakv", lambda r: AdaKVPress(SnapKVPress(compression_ratio=r)))):
                for b in budgets:
                    press = make(1.0 - b)
                    press.post_init_from_model(model)
                    cache = DynamicCache(config=cfg)
                    with torch.no_grad():
                        for i, (keys, values) in enumerate(kv):
                            attn = model.model.layers[i].self_attn
                            attn.rotary_emb = model.model.rotary_emb  # as BasePress.__call__ sets it
                            cache.update(keys, values, i)
                            s = rec.seen[i]
                            kw = {**s, "past_key_values": cache}
                            if kw["cache_position"] is None:  # transformers >= 5.3 no longer passes it
                                kw["cache_position"] = torch.arange(P, device=dev)
                            press.forward_hook(attn, [], kw, (None, None))
                        nbytes = cache_nbytes(cache)
                        answer = kvpress_answer(model, cache, first, P, args.max_new, eos,
                                                case.done)
                    for layer in model.model.layers:
                        layer.self_attn.masked_key_indices = None
                    row(name, b, tok.decode(answer, skip_special_tokens=True), nbytes)
        del kv, rec
        write(out / "hf.json", {**head, "seconds": time.time() - t0, "rows": rows})
        per = 1 + len(rap_presses) + (2 * len(budgets) if kvp else 0)
        print(f"hf: {len(rows) // max(1, per - 1)} cases, {time.time() - t0:.0f} s", flush=True)


def _dist_version(path: str) -> str | None:
    for p in Path(path).glob("kvpress-*.dist-info"):
        return p.name[len("kvpress-"):-len(".dist-info")]
    return None


def kvpress_answer(model, cache, first: int, P: int, max_new: int, eos, done=lambda t: False) -> list[int]:
    """kvpress's `generate_answer` loop (explicit positions P, P+1, ...), starting from the prefill's token.

    The pipeline feeds the question through the compressed context first; here the question is part
    of the compressed prompt (question-aware, as rap's rows), so the loop starts at the first answer token.
    """
    stop = [eos] if isinstance(eos, int) else list(eos)
    out, pos, dev = [first], P, model.device
    while len(out) < max_new and out[-1] not in stop and not done(out):
        logits = model(input_ids=torch.tensor([[out[-1]]], device=dev), past_key_values=cache,
                       position_ids=torch.tensor([[pos]], device=dev)).logits
        out.append(int(logits[0, -1].argmax()))
        pos += 1
    return out


def merge(args, out: Path) -> int:
    # every part file in --out: decoder.json, hf.json, and decoder<suffix>.json of runs with --presses
    parts = {f.stem: json.loads(f.read_text()) for f in sorted(out.glob("*.json"))
             if f.stem.startswith(("decoder", "hf"))}
    rows = [r for p in parts.values() for r in p["rows"]]
    # each part alone, on every case it finished (the decoder's claims use all of its cases)
    by_part = {}
    for name, p in parts.items():
        acc = {}
        for r in p["rows"]:
            acc.setdefault(r["press"], {}).setdefault(f"{r['budget']:g}", []).append(r["score"])
        by_part[name] = {"cases": len({case_key(r) for r in p["rows"]}),
                         "score_sum": {q: {b: sum(v) for b, v in d.items()} for q, d in acc.items()},
                         "summary": {q: {b: sum(v) / len(v) for b, v in d.items()} for q, d in acc.items()},
                         "n": {q: {b: len(v) for b, v in d.items()} for q, d in acc.items()}}
    # the side-by-side table: only cases every part finished, so every press is scored on the same cases
    done = None
    for p in parts.values():
        keys = {case_key(r) for r in p["rows"]}
        done = keys if done is None else done & keys
    done = done or set()
    rows = [r for r in rows if case_key(r) in done]
    summary, kv = {}, {}
    for r in rows:
        summary.setdefault(r["press"], {}).setdefault(f"{r['budget']:g}", []).append(r["score"])
        kv.setdefault(r["press"], {}).setdefault(f"{r['budget']:g}", []).append(r["kv_bytes"])
    ncases = {p: {b: len(v) for b, v in d.items()} for p, d in summary.items()}
    correct = {p: {b: sum(v) for b, v in d.items()} for p, d in summary.items()}
    summary = {p: {b: sum(v) / len(v) for b, v in d.items()} for p, d in summary.items()}
    kv = {p: {b: sum(v) / len(v) for b, v in d.items()} for p, d in kv.items()}
    from rap import provenance
    from rap.kv.report import table_text
    from rap.kv.scorer import DEFAULT_SCORER

    if args.eval == "needle":
        lengths = sorted({c[1] for c in done})
        title = (f"needle on {args.model}: {len(done)} cases (lengths {lengths}, {args.depths} depths, "
                 f"{len(args.needles_list)} needles)")
    else:
        per = {t: sum(1 for c in done if c[0] == t) for t in args.tasks.split(",")}
        title = f"L-Eval on {args.model}, {args.max_context} tokens: " + ", ".join(f"{t} {n} q" for t, n in per.items())
        per_task = {}
        for r in rows:
            per_task.setdefault(r["task"], {}).setdefault(r["press"], {}).setdefault(f"{r['budget']:g}", []).append(
                r["score"])
        per_task = {t: {p: {b: sum(v) / len(v) for b, v in d.items()} for p, d in ps.items()}
                    for t, ps in per_task.items()}
    print(table_text(summary, "{:.3f}", title))
    print(table_text({p: {b: v / 2**20 for b, v in d.items()} for p, d in kv.items()}, "{:.2f}", "mean KV MiB"))
    checks = verdicts(summary, correct, ncases)
    checks["vs_full_per_case"] = {p: per_case_vs_full(rows, p) for p in ("int8", "int4") if p in summary}
    for p, d in checks["vs_full_per_case"].items():
        line = (f"{p} KV at 100% vs full, case by case: {d['equal']} equal, {d['differing']} differing "
                f"({d['better']} better, {d['worse']} worse) of {d['cases']}")
        checks["lines"].append(line)
    for line in checks["lines"]:
        print(line)
    if "decoder" in by_part and by_part["decoder"]["cases"] > len(done):
        d = by_part["decoder"]
        print(table_text(d["summary"], "{:.3f}", f"decoder part alone: all {d['cases']} cases it finished"))
        d["checks"] = verdicts(d["summary"], d["score_sum"], d["n"])
        for line in d["checks"]["lines"]:
            print(line)
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    stem = f"kv-{args.eval}-eval-{args.model}-{args.date}{args.tag}"
    payload = {**provenance.environment(), "eval": f"{args.eval}, issue 16", "model": args.model,
               "parts": {p: {k: v for k, v in d.items() if k != "rows"} for p, d in parts.items()},
               "scorer": DEFAULT_SCORER.describe(), "cases_scored": len(done), "summary": summary,
               "score_sum": correct, "cases": ncases, "mean_kv_bytes": kv, "checks": checks,
               "per_task": per_task if args.eval == "leval" else None, "by_part": by_part,
               "rows": [r for p in parts.values() for r in p["rows"]]}
    write(res / f"{stem}.json", payload)
    from benchmarks.kv_needle_decoder import plot

    plot(summary, kv, res / f"{stem}.png", title)
    print(f"wrote {res / stem}.json and .png")
    return 0


def per_case_vs_full(rows: list[dict], press: str) -> dict:
    """`press` at keep 1 against the full cache on the cases both ran: equal / differing scores."""
    full = {case_key(r): r["score"] for r in rows if r["press"] == "full"}
    mine = {case_key(r): r["score"] for r in rows if r["press"] == press and r["budget"] == 1.0}
    both = sorted(set(full) & set(mine))
    diff = [mine[k] - full[k] for k in both]
    return {"cases": len(both), "equal": sum(d == 0 for d in diff), "differing": sum(d != 0 for d in diff),
            "better": sum(d > 0 for d in diff), "worse": sum(d < 0 for d in diff)}


def verdicts(summary: dict, correct: dict, ncases: dict) -> dict:
    """The issue's two claims, stated from the measured sums (a case scores 0, 0.5 or 1)."""
    lines, ada_ge = [], {}
    for b, s in summary.get("snapkv (decoder)", {}).items():
        if float(b) <= 0.2 and b in summary.get("adakv (decoder)", {}):
            a = correct["adakv (decoder)"][b]
            ada_ge[b] = a >= correct["snapkv (decoder)"][b]
            lines.append(f"budget {b}: Ada-KV (decoder) {a:g} vs uniform SnapKV {correct['snapkv (decoder)'][b]:g} "
                         f"of {ncases['adakv (decoder)'][b]} cases -> {'>=' if ada_ge[b] else 'BELOW'}")
    int8_ok = None
    if "int8" in correct and "full" in correct:
        diff = abs(correct["int8"]["1"] - correct["full"]["1"])
        int8_ok = diff <= 1.0
        lines.append(f"int8 KV at 100%: {correct['int8']['1']:g} vs full {correct['full']['1']:g} "
                     f"(difference {diff:g} case{'s' if diff != 1 else ''}) -> "
                     f"{'within one case' if int8_ok else 'NOT within one case'}")
    if "int4" in correct and "full" in correct:  # measured, not a claim of the issue: stated either way
        diff = correct["int4"]["1"] - correct["full"]["1"]
        lines.append(f"int4 KV at 100%: {correct['int4']['1']:g} vs full {correct['full']['1']:g} "
                     f"(difference {diff:+g})" + (f", int8 {correct['int8']['1']:g}" if "int8" in correct else ""))
    return {"adakv_ge_snapkv_at_budget": ada_ge, "adakv_ge_snapkv_all_le_20pct": all(ada_ge.values()) if ada_ge
            else None, "int8_full_within_one_case": int8_ok, "lines": lines}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("decoder", "hf", "merge"), required=True)
    ap.add_argument("--eval", choices=("needle", "leval"), default="needle")
    ap.add_argument("--tasks", default="topic_retrieval_longchat,coursera", help="L-Eval tasks (--eval leval)")
    ap.add_argument("--max-context", type=int, default=4096, help="L-Eval: documents truncated to this prompt")
    ap.add_argument("--questions", type=int, default=None, help="L-Eval: questions per task (default all)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--depths", type=int, default=7)
    ap.add_argument("--needles", default="0,1,2")
    ap.add_argument("--budgets", default="0.05,0.1,0.2,0.5")
    ap.add_argument("--pyramid-budgets", default="0.1,0.2", help="PyramidKV (HF path) budgets ('' to skip)")
    ap.add_argument("--decoder-pyramid-budgets", default=None,
                    help="PyramidKV / Ada-PyramidKV on the decoder: budgets (default: --budgets; '' to skip)")
    ap.add_argument("--presses", default=None, help="decoder part: only these presses (e.g. pyramidkv,ada-pyramidkv; "
                    "'full' adds the full cache's rows), written to decoder<--part-suffix>.json beside a full run")
    ap.add_argument("--part-suffix", default="", help="decoder part: its file is decoder<suffix>.json")
    ap.add_argument("--int8-budget", type=float, default=0.2)
    ap.add_argument("--int4-budget", type=float, default=None, help="int4 + Ada-KV's budget (default --int8-budget)")
    ap.add_argument("--max-new", type=int, default=20)
    ap.add_argument("--max-cases", type=int, default=None)
    ap.add_argument("--resume", action="store_true", help="keep the part's earlier rows in --out, run the rest")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kvpress-path", default=os.environ.get("KVPRESS_PATH"),
                    help="a directory holding kvpress 0.5.5 and the three modules it imports that rap lacks: "
                         "pip install --no-deps --target DIR kvpress==0.5.5 'cachetools>=5.5.2,<6' fire termcolor")
    ap.add_argument("--out", default="out/kv-needle-eval", help="partial JSON per part")
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    args.lengths_list = [int(x) for x in args.lengths.split(",")]
    args.needles_list = [int(x) for x in args.needles.split(",")]
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "merge":
        return merge(args, out)
    (run_decoder if args.part == "decoder" else run_hf)(args, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
