#!/usr/bin/env bash
# The SmolLM2-135M level profile and its plan library made on the GPU, then the level policies' frontier.
#  1. `rap profile --method levels --library` on 65,536 cleaned WikiText-2 valid tokens (rap.profile.calibration),
#     the library measured on the selection split, the 65,536 tokens after them (rap.policy.library). A matching
#     checkpoint at $LEVEL_PROFILE_OUT is resumed, so a call cut by its time limit is continued by the next one
#     (PROFILE_S=0 skips this step and uses that file as it is).
#  2. the frontier on the full WikiText-2 test at 2,048-token windows, budgets as fractions of the bf16 dense need,
#     once with the CPU memory model (parameter bytes as the table counts them) and once with the CUDA one
#     (tinygemm padding, compiled-block buffers); plans already measured by the earlier H200 runs on the same
#     eval settings are reused (rows say 'reused'), so only new picks are measured (LEVELS_S=0 skips this step).
# Needs smollm2-135m fetched (benchmarks/gpu_h200.sh assembles it) and the wheels in $RAP_SITE. Writes under $OUT.
set -u
export PYTHONPATH=src:.:${RAP_SITE:-/tmp/site} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export OUT=${OUT:-out}; mkdir -p "$OUT"
prof=${LEVEL_PROFILE_OUT:-/tmp/smollm2-135m-levels.json}
if [ "${PROFILE_S:-300}" != 0 ]; then
  timeout "${PROFILE_S:-300}" python3 -m rap profile smollm2-135m --method levels --tokens 65536 --seq-len 2048 \
    --dtype bf16 --device cuda --batch-windows 16 --remeasure 8 --bytes-device cuda --library --out "$prof" 2>&1 \
    | grep -v "it/s\]" | tail -4
  echo "== profile: ${PIPESTATUS[0]} after ${SECONDS}s"
fi
cp "$prof" "$OUT/smollm2-135m-levels-with-library.json"
reuse=""
for f in benchmarks/results/levels-smollm2-135m-h200-c*bytes*-2026-12-0*.json; do reuse="$reuse --reuse $f"; done
if [ "${LEVELS_S:-200}" != 0 ]; then
  for bytes in cpu cuda; do
    timeout "${LEVELS_S:-200}" python3 -m benchmarks.levels --profile "$prof" --windows 0 --seq-len 2048 --device cuda \
      --dtype bf16 --bytes-device $bytes $reuse ${LEVELS_ARGS:-} 2>&1 | grep -v "it/s\]\|Warning\|warn(" | tail -${TAIL:-30}
    for f in "$OUT"/levels-smollm2-135m-cuda-*.json "$OUT"/levels-smollm2-135m-cuda-*.png; do
      [ -e "$f" ] && mv "$f" "${f/-cuda-/-h200-${bytes}bytes-}"
    done
  done
fi
ls -la "$OUT"
