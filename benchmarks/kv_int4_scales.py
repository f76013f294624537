"""int4 KV: symmetric per-(token, KV head) scale vs per-token asymmetric scale + zero, by continuation NLL.

Why `rap.kv.decode_cache` stores int4 asymmetrically: this measures what the asymmetric per-token
quantiser (15 levels over [min, max] of each row, KIVI's per-token form) gains over the symmetric one. The variants run
as fake quantisation in front of a 16-bit flat store (`FlatLayerCache._store` patched: x ->
dequant(quant4(x)); keep ratio FLAT_ALL, just below 1, puts the decoder on its flat cache while
keeping every token, ceil(r * P) = P); rap's real int4 cache must equal the asymmetric row (a
check that its storage adds nothing). The 16-bit and int8 caches are the references. Teacher-forced NLL of a Paul Graham essay's continuation
(`rap.policy.kv_measure.decoder_continuation_nll`, keep 1.0), nats per token.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/kv_int4_scales.py --model smollm2-135m --prompt 1024
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import rap.kv.decode_cache as dc

FLAT_ALL = 0.99999  # a flat 16-bit cache keeping every token of prompts below 100k tokens


def fake_sym4(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int4 per row: scale = max|x| / 7, values in [-7, 7] (the alternative not taken)."""
    scale = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-8) / 7.0
    return torch.round(x.float() / scale).clamp_(-7, 7) * scale


def fake_asym4(x: torch.Tensor) -> torch.Tensor:
    """rap's int4 (`rap.kv.decode_cache.quantize_rows(x, 4)`): per-row (scale, zero) over [min, max]."""
    q, s = dc.quantize_rows(x, 4)
    return dc.dequantize_rows(q, s)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--continuation", type=int, default=64)
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args(argv)
    from rap import provenance
    from rap.decode.decoder import Decoder
    from rap.eval.needle import haystack_text
    from rap.policy.kv_measure import KVOption, decoder_continuation_nll
    from rap.sources import load_view

    torch.set_num_threads(1)
    view, tok = load_view(args.model, dtype=torch.float32, device="cpu")
    text = haystack_text()[:200_000]
    ids = torch.tensor([tok(text).input_ids[:args.prompt + args.continuation]])
    real_store = dc.FlatLayerCache._store
    rows = []
    for name, opt, fake in [("16-bit", KVOption(1.0, 16), None), ("int8", KVOption(1.0, 8), None),
                            ("int4 symmetric (fake)", KVOption(FLAT_ALL, 16), fake_sym4),
                            ("int4 asymmetric per-token (fake)", KVOption(FLAT_ALL, 16), fake_asym4),
                            ("int4, rap's cache (asymmetric)", KVOption(1.0, 4), None),
                            ("int4 asymmetric keys, symmetric values (fake)", KVOption(FLAT_ALL, 16),
                             (fake_asym4, fake_sym4))]:
        fk, fv = fake if isinstance(fake, tuple) else (fake, fake)

        def store(self, r, k, v, fk=fk, fv=fv):
            real_store(self, r, fk(k), fv(v)) if fk else real_store(self, r, k, v)
        dc.FlatLayerCache._store = store
        t0 = time.time()
        try:
            nll = decoder_continuation_nll(Decoder(view), ids, args.prompt, [opt])
        finally:
            dc.FlatLayerCache._store = real_store
        rows.append({"kv": name, "nll_per_token": nll[opt] / args.continuation,
                     "seconds": time.time() - t0})
        print(f"{name:46s} {rows[-1]['nll_per_token']:.4f} nats/token ({rows[-1]['seconds']:.0f} s)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({**provenance.environment(), "model": args.model, "prompt": args.prompt,
                                              "continuation": args.continuation, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
