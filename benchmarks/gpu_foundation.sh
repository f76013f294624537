#!/usr/bin/env bash
# Foundation results on the GPU machine (issue 3): dense WikiText-2 PPL of SmolLM2-135M at 2,048-token
# windows, and memory-model predictions vs measured peaks. Expects /root/smol.gguf (sent in parts, see
# ../shared/tools/split-for-device.sh), .whl/ with gguf, and .devdata/ holding the WikiText files.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=src:.:/tmp/site RAP_DATA=$PWD/.devdata RAP_CACHE=/root/rapcache PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
date=$(date -u +%F)
if [ -f /root/smol.gguf ]; then
  python3 -m rap models fetch smollm2-135m --gguf /root/smol.gguf 2>/dev/null
  for dt in ${PPL_DTYPES:-bf16 fp32}; do
    python3 -m rap ppl smollm2-135m --seq-len 2048 --dtype $dt --out "$OUT/ppl-dense-$date.json" 2>/dev/null
  done
fi
python3 -m benchmarks.memory_model --path decoder
python3 -m benchmarks.memory_model --path hf
