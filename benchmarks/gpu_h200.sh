#!/usr/bin/env bash
# GPU runs of one device call, each step bounded (seconds in the variables; 0 skips a step). Every step prints a
# short table and writes JSON (and plots) under $OUT. Run from the repository root on the device machine:
#   DECODE_S=170 MEMORY_S=60 TRACE_S=110 STAGED_S=110 bash benchmarks/gpu_h200.sh
#   SUITE_S=560 SUITE_ARGS="--sections throughput,kv-heavy --shapes llama-2-7b,llama-3-8b,qwen2.5-7b" bash benchmarks/gpu_h200.sh
# Wheels the device image lacks (gguf, torchao) travel in .whl/ (benchmarks/GPU.md); they are installed into
# $RAP_SITE (default /tmp/site), never over the image's torch.
set -u
site=${RAP_SITE:-/tmp/site}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
export PYTHONPATH=src:.:$site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export OUT=${OUT:-out}
# SmolLM2-135M's GGUF travels in parts (../shared/tools/split-for-device.sh); the call that brings the last part
# assembles it and converts it once: SMOL_SHA256=<sha of the whole file> PARTS_DIR=/root/parts
if [ -n "${SMOL_SHA256:-}" ] && ls .device-parts/*.part* >/dev/null 2>&1; then
  mkdir -p "${PARTS_DIR:-/root/parts}" && cp .device-parts/*.part* "${PARTS_DIR:-/root/parts}/"
  if cat "${PARTS_DIR:-/root/parts}"/smol.gguf.part* > /tmp/smol.gguf 2>/dev/null && echo "$SMOL_SHA256  /tmp/smol.gguf" | sha256sum -c --quiet; then
    python3 -m rap models fetch smollm2-135m --gguf /tmp/smol.gguf && echo "smollm2-135m ready"
  else
    echo "smollm2-135m: parts so far: $(ls "${PARTS_DIR:-/root/parts}" | tr '\n' ' ')"
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
step() {  # step NAME SECONDS COMMAND...
  local name=$1 secs=$2; shift 2
  [ "$secs" = 0 ] && return
  echo "== $name (limit ${secs}s): $*"
  local t0=$SECONDS
  timeout "$secs" "$@" 2>&1 | grep -v "it/s\]\|Warning\|warn(" | tail -${TAIL:-30}
  echo "== $name: ${PIPESTATUS[0]} after $((SECONDS - t0))s"
}
step decode "${DECODE_S:-0}" python3 -m benchmarks.decode --batches 1,8,32 --prompts 512 --new 128 --max-seconds $(( ${DECODE_S:-0} - 40 ))
step memory "${MEMORY_S:-0}" python3 -m benchmarks.memory_model --path decoder
step trace "${TRACE_S:-0}" python3 -m benchmarks.engine_trace --shape llama-2-7b --batch 8 --prompt 512 --new 64 --batches-per-level 6
step trace-staged "${STAGED_S:-0}" python3 -m benchmarks.engine_trace --shape llama-2-7b --batch 8 --prompt 512 --new 64 --batches-per-level 6 --stage-host
step precision "${PRECISION_S:-0}" python3 -m benchmarks.precision --max-seconds $(( ${PRECISION_S:-0} - 40 )) ${PRECISION_ARGS:-}
step levels "${LEVELS_S:-0}" ${LEVELS_CMD:-true}
step suite "${SUITE_S:-0}" python3 -m benchmarks.run --suite gpu --max-minutes $(( ${SUITE_S:-0} / 60 - 1 )) ${SUITE_ARGS:-}
ls -la "$OUT"
