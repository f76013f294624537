#!/usr/bin/env bash
# One device call: the SmolLM2-135M level profile gains its plan library (resumed from the shipped profile:
# only the library's plans are measured, on the profile's 65,536 calibration tokens: rap.policy.library), then
# the level policies' frontier on the full WikiText-2 test at 2,048-token windows, budgets as fractions of the
# bf16 dense need, once with the CPU memory model (parameter bytes as the table counts them) and once
# with the CUDA one (tinygemm padding, compiled-block buffers).
# Needs smollm2-135m fetched (benchmarks/gpu_h200.sh assembles it) and the wheels in $RAP_SITE. Writes under $OUT.
set -u
export PYTHONPATH=src:.:${RAP_SITE:-/tmp/site} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export OUT=${OUT:-out}; mkdir -p "$OUT"
prof=${LEVEL_PROFILE_OUT:-/tmp/smollm2-135m-levels.json}
cp src/rap/assets/profiles/smollm2-135m-levels.json "$prof"
timeout "${PROFILE_S:-300}" python3 -m rap profile smollm2-135m --method levels --tokens 65536 --seq-len 2048 --dtype bf16 \
  --device cuda --batch-windows 16 --remeasure 8 --bytes-device cuda --library --out "$prof" 2>&1 | grep -v "it/s\]" | tail -4
cp "$prof" "$OUT/smollm2-135m-levels-with-library.json"
for bytes in cpu cuda; do
  timeout "${LEVELS_S:-200}" python3 -m benchmarks.levels --profile "$prof" --windows 0 --seq-len 2048 --device cuda \
    --dtype bf16 --bytes-device $bytes ${LEVELS_ARGS:-} 2>&1 | grep -v "it/s\]\|Warning\|warn(" | tail -${TAIL:-30}
  for f in "$OUT"/levels-smollm2-135m-cuda-*.json "$OUT"/levels-smollm2-135m-cuda-*.png; do
    [ -e "$f" ] && mv "$f" "${f/-cuda-/-h200-${bytes}bytes-}"
  done
done
ls -la "$OUT"
