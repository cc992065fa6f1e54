#!/usr/bin/env bash
# gpu_check.sh -- the first command on a new machine with a GPU: what it is, whether every stage runs at the
# reference sizes, and how fast. Each step runs under a time limit and prints straight to stdout; a failed or
# timed-out step is reported and the next one still runs, so one call tells the whole story:
#
#   1. device and versions (python, torch, CUDA, numpy, the GPU's name and memory)
#   2. a small data set at the preset's resolution (generate_spar.py)
#   3. a smoke of every stage (train.py --stage=geo, psfm, vlm: a few steps each, checkpoints written)
#   4. bench.py: samples/s, TFLOP/s and MFU per stage, and the data loader's samples/s (one process and a
#      DataLoader of 8 workers) against what the GPU consumes
#   5. the CUDA-only tests (which SDPA kernel each attention gets at the reference preset); skipped on a CPU
#   6. bench.py again with torch.compile and --profile: where each compiled step's time goes (last: compiling
#      takes the longest)
#
# Usage: bash gpu_check.sh [--size=gpu|test] [--out=DIR]      (PYTHON=/path/to/python picks the interpreter)
#   gpu   the reference preset (224 px, reference models) on the machine's accelerator: what README's GPU figures come from
#   test  the tiny preset on the CPU, without compile: what the test suite runs to keep this script working
# Exit status: the number of failed steps (0: all ran).
set -uo pipefail

SIZE=gpu
OUT=""
PYTHON=${PYTHON:-python}
for arg in "$@"; do
  case $arg in
    --size=*) SIZE=${arg#--size=} ;;
    --out=*) OUT=${arg#--out=} ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --size=gpu|test, --out=DIR)" >&2; exit 2 ;;
  esac
done
case $OUT in ''|/*) ;; *) OUT=$PWD/$OUT ;; esac
cd "$(dirname "$0")"
OUT=${OUT:-$PWD/out/gpu_check}
case $SIZE in
  gpu)  PRESET=reference; DATA="--scenes=16 --val_scenes=4 --res=224 --workers=8"; STEPS=20; LIMIT=180
        BENCH="--preset=reference --loader_workers=8"; COMPILE=1 ;;
  test) PRESET=tiny; DATA="--scenes=4 --val_scenes=2 --views=6 --random_views=2 --res=32 --qa_per_task=1 --vocab_size=320"
        STEPS=3; LIMIT=120; BENCH="--preset=tiny --device=cpu --steps=2 --warmup=1"; COMPILE=0 ;;
  *) echo "gpu_check.sh: --size must be gpu or test, got '$SIZE'" >&2; exit 2 ;;
esac
[ "$SIZE" = test ] && DEVICE="--device=cpu" || DEVICE=""
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  echo "gpu_check.sh: --out=$OUT is not empty: use another or remove it" >&2; exit 2
fi
mkdir -p "$OUT"

failed=0
step() {  # step NAME SECONDS COMMAND...: run it under a time limit, report ok / failed / timed out and the time
  local name=$1 limit=$2 start=$SECONDS code
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@"
  code=$?
  if [ $code -eq 0 ]; then echo "== $name: ok in $((SECONDS - start)) s"
  elif [ $code -eq 124 ]; then echo "== $name: TIMED OUT after $limit s"; failed=$((failed + 1))
  else echo "== $name: FAILED (exit $code) after $((SECONDS - start)) s"; failed=$((failed + 1)); fi
}

step "device and versions" 60 "$PYTHON" -c "
import platform, sys, numpy, torch
print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '| numpy', numpy.__version__, '|', platform.node(), '|', __import__('os').cpu_count(), 'CPU cores')
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f'{torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16:', torch.cuda.is_bf16_supported())
else:
    print('no CUDA device: the stages below run on', 'mps' if torch.backends.mps.is_available() else 'the CPU')
"
step "data: $DATA" "$LIMIT" "$PYTHON" generate_spar.py --out="$OUT/data" $DATA
# A GPU's share of the reference batch of 128 on 8 GPUs is 16: the smoke runs twice that, with a short validation.
COMMON="--preset=$PRESET $DEVICE --data=$OUT/data --steps=$STEPS --batch_size=32 --eval_samples=64 --probe_samples=64"
COMMON+=" --log_every=1 --eval_every=100000 --save_every=100000"
step "smoke: stage geo" "$LIMIT" "$PYTHON" train.py --stage=geo --out="$OUT/geo" $COMMON
step "smoke: stage psfm" "$LIMIT" "$PYTHON" train.py --stage=psfm --out="$OUT/psfm" --init_geo="$OUT/geo" $COMMON
step "smoke: stage vlm" "$LIMIT" "$PYTHON" train.py --stage=vlm --out="$OUT/vlm" --init_spa3r="$OUT/psfm" $COMMON
step "bench (eager)" 300 "$PYTHON" bench.py $BENCH
step "CUDA-only tests" 300 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_bench.py -k cuda
[ "$COMPILE" = 1 ] && step "bench (torch.compile)" 600 "$PYTHON" bench.py $BENCH --compile --profile --loader_workers=0
echo "== gpu_check.sh: $failed step(s) failed; output in $OUT"
exit $failed
