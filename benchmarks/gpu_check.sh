#!/usr/bin/env bash
# The one prepared run on a lent GPU (issue: the GPU path right by construction).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [PART ...]      PART: env tests bench peer (default: all)
#
# env    versions, and the APIs the GPU path needs, called (benchmarks/gpu_env.py): fails loudly
#        if F.grouped_mm or another is missing instead of letting the run take a fallback.
# tests  pytest -m cuda: the model in bf16 against fp32, the router in fp32 under autocast,
#        Newton-Schulz and a MuonClip step on the GPU against the CPU reference, NCCL's device
#        checks; the trainer on 2 ranks sharing the GPU over cuda:gloo (validation, checkpoints, a
#        stop and a bit-equal resume, ep 1 and 2) and on 1 rank over NCCL.
# bench  benchmarks.train --device cuda for the presets small and medium (medium at sequence 4096,
#        micro-batch 4, 8 micro-batches a step): tokens/s, MFU, peak memory, the step split.
# peer   benchmarks.peer: the same medium forward+backward (sequence 4096, micro-batch 4) in transformers'
#        DeepseekV3ForCausalLM, loaded from a k2pipe export whose logits are checked equal first: the
#        tokens/s ratio, side by side in one process.
#
# Each part is time-boxed and writes its JSON and log to $OUT (default: bench-results/gpu-check) as it
# goes, so what finished comes back even when a later part runs out of time. --dry-run (no GPU) runs
# the same parts on the CPU where they can run, says what it skipped and why, and ends in under a
# minute; the test suite runs it. The device image has no Ray, MLflow, boto3, moto or zstandard and
# nothing can be installed there: the dry run's Python refuses them too (benchmarks/device_image), and
# the tests part collects only the modules that hold cuda tests (CUDA_TEST_MODULES; the suite checks
# that list against the tree).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
PARTS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    env|tests|bench|peer) PARTS+=("$arg") ;;
    *) echo "gpu_check: unknown argument '$arg'; valid: --dry-run, env, tests, bench, peer" >&2; exit 2 ;;
  esac
done
[ ${#PARTS[@]} -eq 0 ] && PARTS=(env tests bench peer)
OUT="${OUT:-bench-results/gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
CUDA_TEST_MODULES=(tests/k2model/test_cuda.py tests/pipelines/train/test_trainer.py)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ $DRY -eq 1 ] && export PYTHONPATH="$PWD/benchmarks/device_image:$PYTHONPATH"
if [ $DRY -eq 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here; run with --dry-run" >&2
  exit 2
fi
FAILED=()

part() {  # part NAME SECONDS COMMAND...: run one part under a time box, log to $OUT/NAME.log
  local name=$1 seconds=$2; shift 2
  echo "== gpu_check $name (at most ${seconds}s)"
  local start=$SECONDS
  timeout "$seconds" "$@" > >(tee "$OUT/$name.log") 2>&1
  local rc=$?
  echo "== gpu_check $name: exit $rc in $((SECONDS - start))s"
  [ $rc -eq 0 ] || FAILED+=("$name")
}

for p in "${PARTS[@]}"; do
  case "$p" in
    env)
      if [ $DRY -eq 1 ]; then part env 60 "$PY" -m benchmarks.gpu_env --dry-run --out "$OUT/env.json"
      else part env 60 "$PY" -m benchmarks.gpu_env --out "$OUT/env.json"; fi ;;
    tests)
      if [ $DRY -eq 1 ]; then
        echo "gpu_check tests: skipped on this machine (no CUDA device); the cuda-marked tests it would run:"
        part tests 60 "$PY" -m pytest -q -p no:cacheprovider -m cuda --collect-only "${CUDA_TEST_MODULES[@]}"
      else
        part tests 150 "$PY" -m pytest -q -p no:cacheprovider -m cuda "${CUDA_TEST_MODULES[@]}" \
          --junitxml "$OUT/tests.xml"
      fi ;;
    bench)
      if [ $DRY -eq 1 ]; then
        echo "gpu_check bench: on the CPU with the tiny preset, one timed step (the figures mean nothing)"
        part bench 60 "$PY" -m benchmarks.train --device cpu --preset tiny --seq 64 --micro 2 --global-batch 4 \
          --steps 1 --out "$OUT/bench-dry.json"
      else
        part bench-small 60 "$PY" -m benchmarks.train --device cuda --preset small --nominal-tflops 989 \
          --out "$OUT/bench-small.json"
        part bench-medium 150 "$PY" -m benchmarks.train --device cuda --preset medium --seq 4096 --micro 4 \
          --global-batch 32 --steps 10 --nominal-tflops 989 --out "$OUT/bench-medium.json"
      fi ;;
    peer)
      if [ $DRY -eq 1 ]; then
        echo "gpu_check peer: on the CPU with the tiny preset, fp32 (the figures mean nothing)"
        part peer 60 "$PY" -m benchmarks.peer --device cpu --preset tiny --seq 64 --micro 2 --rounds 2 \
          --out "$OUT/peer-dry.json"
      else
        part peer 150 "$PY" -m benchmarks.peer --device cuda --preset medium --seq 4096 --micro 4 --rounds 5 \
          --out "$OUT/peer.json"
      fi ;;
  esac
done
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu_check: failed or missing: ${FAILED[*]} (logs in $OUT)"
  exit 1
fi
echo "gpu_check: all parts passed (logs and JSON in $OUT)"
