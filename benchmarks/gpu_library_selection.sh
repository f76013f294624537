#!/usr/bin/env bash
# One device call (after parts 00 / 01 + 02 of SmolLM2 arrived, benchmarks/gpu_h200.sh): the shipped level
# profile's plan library measured again on the selection split (the 65,536 WikiText-2 valid tokens after the
# profile's calibration windows: rap profile --library-tokens, the default), then the frontier on the full test
# set with CPU bytes for the library and the single knobs, reusing every plan the earlier run measured
# (--reuse: only the new library picks are measured). Writes the profile and the levels JSON under $OUT.
set -u
export PYTHONPATH=src:.:${RAP_SITE:-/tmp/site} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export OUT=${OUT:-out}; mkdir -p "$OUT"
prof="$OUT/smollm2-135m-levels-selection.json"
cp src/rap/assets/profiles/smollm2-135m-levels.json "$prof"
timeout "${PROFILE_S:-130}" python3 -m rap profile smollm2-135m --method levels --tokens 65536 --seq-len 2048 --dtype bf16 \
  --device cuda --batch-windows 16 --remeasure 8 --bytes-device cuda --library --out "$prof" 2>&1 | grep -v "it/s\]" | tail -3
timeout "${LEVELS_S:-80}" python3 -m benchmarks.levels --profile "$prof" --windows 0 --seq-len 2048 --device cuda --dtype bf16 \
  --bytes-device cpu --policies library,int8-only,int4-only,drop-only,int8-then-drop,solver \
  --reuse benchmarks/results/levels-smollm2-135m-h200-cpubytes-library-2026-12-02.json 2>&1 \
  | grep -v "it/s\]\|Warning\|warn(" | tail -${TAIL:-14}
ls -la "$OUT"
