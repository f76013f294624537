#!/usr/bin/env bash
# The last GPU call of a session, bounded per step: needle-in-a-haystack on SmolLM2-135M (issue 5),
# GSI step timing on a Llama-2-7B shape with random weights (issue 4), an engine budget trace on a
# Llama-2-7B shape with random weights (issue 8). NEEDLE_S / GSI_S / TRACE_S: seconds per step, 0 skips it. Needs /root/smol.gguf (sent in parts), .whl/ (gguf),
# .devdata/ (wikitext + needle-haystack-paulgraham from ../shared/data).
set -u
if ls .whl/gguf*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/gguf*.whl
fi
export PYTHONPATH=src:.:/tmp/site RAP_DATA=${RAP_DATA:-$PWD/.devdata} RAP_CACHE=/root/rapcache PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
[ -f /root/smol.gguf ] && python3 -m rap models fetch smollm2-135m --gguf /root/smol.gguf 2>/dev/null
[ "${NEEDLE_S:-230}" = 0 ] || timeout ${NEEDLE_S:-230} python3 -m rap kv needle smollm2-135m --lengths ${NEEDLE_LENGTHS:-2048,4096,8128} \
  --depths 0,0.5,1 --budgets 0.05,0.1,0.2,0.4 --out "$OUT" 2>&1 | grep -v "Warning\|warn(\|enable_gqa\|it/s" | tail -25
[ "${GSI_S:-150}" = 0 ] || timeout ${GSI_S:-150} python3 benchmarks/gsi.py timing --time-limit $(( ${GSI_S:-150} - 30 )) 2>&1 | grep -v "it/s" | tail -12
[ "${TRACE_S:-150}" = 0 ] || timeout ${TRACE_S:-150} python3 -m benchmarks.engine_trace --shape llama-2-7b --batch 8 --prompt 512 --new 64 \
  --batches-per-level 6 2>&1 | grep -v "it/s" | tail -15
ls -la "$OUT"
