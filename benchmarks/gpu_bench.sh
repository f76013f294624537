#!/usr/bin/env bash
# Issue 9 suite on the GPU machine: python -m benchmarks.run --suite gpu (planned to finish in < 8 min on one H100).
# Carry: .whl/ (torchao-0.18.0 wheel, plus gguf for converting the model) and .devdata/ (wikitext-2/,
# wikitext-2-raw/, piqa/, hellaswag/, winogrande/, arc/, boolq/, openbookqa/, lambada_openai/ from shared/data).
# SmolLM2: /root/smol.gguf (converted here once), or MODEL=<HF folder>. PROFILE=<GSI profile JSON> if there is one.
set -euo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=src:.:/tmp/site RAP_DATA=${RAP_DATA:-$PWD/.devdata} RAP_CACHE=/root/rapcache PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -z "${MODEL:-}" ] && [ -f /root/smol.gguf ]; then
  python3 -m rap models fetch smollm2-135m --gguf /root/smol.gguf 2>/dev/null
fi
python3 -m benchmarks.run --suite gpu ${MODEL:+--model "$MODEL"} ${PROFILE:+--profile "$PROFILE"} "$@" 2>&1 | tee "$OUT/bench-log.txt"
