#!/usr/bin/env bash
# speedrun.sh -- one command from nothing to the headline ablation of nanoSpa3R:
#
#   generate_spar.py -> train geo -> train psfm -> train the VLM in three or four arms, each with SEEDS seeds:
#     Spa3-VLM  (--spa3r=psfm: the adapter reads the PSFM-pretrained Spa3R latent)
#     baseline  (--spa3r=none: no spatial branch, all else equal)
#     oracle    (--spa3r=oracle: the adapter reads true 3D quantities; if it cannot beat the baseline, the
#                setup cannot detect a useful latent at all)
#     random Spa3R  (--spa3r=random, all sizes but cpu: Spa3-VLM with its Spa3R encoder untrained, the control
#                that says whether PSFM pretraining, not the extra branch, makes any difference)
#   -> eval.py on held-out scenes -> OUT/report.md: every stage's gates (vs its trivial baseline, PASS/FAIL),
#      the ablation with paired bootstrap intervals, the per-task table.
#
# Usage: bash speedrun.sh [--size=cpu|ablation|gpu|test] [--out=DIR] [--data_seed=N]   (or SIZE=... OUT=... bash speedrun.sh)
#   cpu       the default: the whole chain with its gates, under 10 minutes on a 2-core CPU
#   ablation  the decisive size: more data, steps and seeds, under 30 minutes on a 2-core CPU
#   gpu       reference-size models and data for one GPU: at most about 45 minutes by the step rates measured on an
#             H200 (README, Benchmarks); the whole run has not been made yet
#   test      a smaller still version that the test suite runs
#   PYTHON=/path/to/python picks the interpreter (default: the python on PATH)
#   --data_seed=N  the generator's seed (default 0, the held-out data the README reports; 1 is the dev data every
#             choice was made on): the same run on another draw of scenes, to see how far a result carries
#   --out=DIR relative to the current directory; default out/ beside this script. Data already in DIR is
#             reused only if it was generated for the same size (DIR/data.args records the generator's arguments).
# Every size runs the same code; only the numbers below differ.
set -euo pipefail

SIZE=${SIZE:-cpu}
OUT=${OUT:-}
DATA_SEED=${DATA_SEED:-0}
PYTHON=${PYTHON:-python}
for arg in "$@"; do
  case $arg in
    --size=*) SIZE=${arg#--size=} ;;
    --out=*) OUT=${arg#--out=} ;;
    --data_seed=*) DATA_SEED=${arg#--data_seed=} ;;
    *) echo "speedrun.sh: unknown argument $arg (use --size=cpu|ablation|gpu|test, --out=DIR, --data_seed=N)" >&2; exit 2 ;;
  esac
done
case $DATA_SEED in ''|*[!0-9]*)
  echo "speedrun.sh: --data_seed must be a non-negative integer, got '$DATA_SEED'" >&2; exit 2 ;;
esac
# A relative --out is relative to the caller's directory: made absolute before the cd into the repository.
case $OUT in ''|/*) ;; *) OUT=$PWD/$OUT ;; esac
cd "$(dirname "$0")"
OUT=${OUT:-$PWD/out}
# The report hands eval.py lists NAME=path,NAME=path (seeds joined by '+'): the path must not hold those characters.
case $OUT in *[,=+]*)
  echo "speedrun.sh: --out must not contain ',', '=' or '+' (eval.py's list separators), got '$OUT'" >&2; exit 2 ;;
esac

# Validation and gates run once, at the end of each stage (--eval_every larger than any stage's steps).
# geo learns relative pose from pairs of views that overlap (--view_sampling=near --num_views=2: the nearer the
# pair, the more it shares; four "near" views turn 55 degrees from view 0 on average and taught no turn at all);
# psfm predicts views anywhere in the room from the ground-truth query cameras (the latent must hold the room,
# not the neighbourhood of its context), 8 of them, 4 as context: the VLM's room-size questions show 8 frames
# (on dev data a latent trained on 4 views read the floor area of 8 no better than a random encoder: R² 0.437 vs
# 0.438; trained on 8, 0.464, interval excluding 0).
# At the ablation size the geo and psfm gates read 400 held-out samples (2 per validation scene) and the probes are
# fitted on all 1000 training scenes (on dev data, probes fitted on 256 passed 2 gates that fail fitted on 1000).
# The VLM arms train and are scored on TASKS: the task the ablation weighs (README says why).
TASKS=room_size_estimation
ARMS="none psfm random oracle"  # the baseline first: the ablation compares every arm with it
GEO_VIEWS="--view_sampling=near --num_views=2"
PSFM_VIEWS="--view_sampling=random --num_views=8 --psfm.pose_source=gt"
case $SIZE in
  test)
    DATA="--scenes=6 --val_scenes=2 --views=8 --random_views=2 --res=32 --qa_per_task=1 --vocab_size=400"
    COMMON="--preset=tiny --log_every=10 --eval_every=100000 --eval_samples=8 --save_every=1000"
    GEO="--steps=15"; PSFM="--steps=15 --probe_samples=16"; VLM="--steps=15 --batch_size=8"; SEEDS=1; TASKS= ;;
  cpu)
    DATA="--scenes=400 --val_scenes=100 --views=12 --random_views=4 --res=32 --qa_per_task=1 --vocab_size=1024 --workers=2"
    COMMON="--preset=tiny --log_every=100 --eval_every=100000 --eval_samples=128 --save_every=100000"
    GEO="--steps=2000 --batch_size=16"; PSFM="--steps=400"; VLM="--steps=300 --batch_size=32"; SEEDS=1
    ARMS="none psfm oracle" ;;  # the control arm waits for the ablation size (the cpu size has 10 minutes)
  ablation)
    DATA="--scenes=1000 --val_scenes=200 --views=12 --random_views=4 --res=32 --qa_per_task=1 --vocab_size=1024 --workers=2"
    COMMON="--preset=tiny --log_every=100 --eval_every=100000 --eval_samples=400 --save_every=100000"
    GEO="--steps=10000 --batch_size=16"; PSFM="--steps=2500 --probe_samples=1000"; VLM="--steps=400 --batch_size=32"; SEEDS=3 ;;
  gpu)  # H200, eager: geo 173 (4 views; pairs cost less), psfm 91 (4 views; 8 cost twice), vlm 90 samples/s at batch 32
        # -> at most 5 + 9 + 12 x 2.4 min (the psfm and random arms read cached latents: less)
    DATA="--scenes=512 --val_scenes=32 --res=224 --workers=8"
    COMMON="--preset=reference --workers=8 --log_every=20 --eval_every=100000 --eval_samples=512 --save_every=500"
    GEO="--steps=1500 --batch_size=32"; PSFM="--steps=750 --batch_size=32"; VLM="--steps=400 --batch_size=32"; SEEDS=3 ;;
  *) echo "speedrun.sh: --size must be cpu, ablation, gpu or test, got '$SIZE'" >&2; exit 2 ;;
esac

# Data already in OUT is reused only if the generator made it with the same arguments (recorded in OUT/data.args).
GEN_ARGS="--seed=$DATA_SEED $DATA"
if [ -f "$OUT/data/qa_val.jsonl" ]; then
  recorded=$(cat "$OUT/data.args" 2>/dev/null || echo "unrecorded arguments")
  [ "$recorded" = "$GEN_ARGS" ] || { echo "speedrun.sh: $OUT/data was generated with '$recorded'," \
    "--size=$SIZE needs '$GEN_ARGS': use another --out or remove $OUT/data" >&2; exit 1; }
fi

start=$(date +%s)
"$PYTHON" -c "import torch, numpy, safetensors, tokenizers, tqdm" \
  || { echo "speedrun.sh: install first: pip install torch==2.13.0 && pip install -r requirements.txt" >&2; exit 1; }
mkdir -p "$OUT"

echo "== data"
if [ ! -f "$OUT/data/qa_val.jsonl" ]; then
  "$PYTHON" generate_spar.py --out="$OUT/data" $GEN_ARGS
  echo "$GEN_ARGS" > "$OUT/data.args"
fi
# --resume: a rerun goes on where the last one stopped, and a finished stage is skipped (train.py refuses to
# start over in a folder that holds a checkpoint).
echo "== stage geo"
"$PYTHON" train.py --resume --stage=geo --data="$OUT/data" --out="$OUT/geo" $COMMON $GEO_VIEWS $GEO
echo "== stage psfm"
"$PYTHON" train.py --resume --stage=psfm --data="$OUT/data" --init_geo="$OUT/geo" --out="$OUT/psfm" $COMMON $PSFM_VIEWS $PSFM
for seed in $(seq 0 $((SEEDS - 1))); do
  for arm in $ARMS; do
    echo "== stage vlm: --spa3r=$arm, seed $seed"
    dir="$OUT/vlm_${arm}_s$seed"
    # the frozen Spa3R's latent of each record is computed once, not at each of the dozen times a record is seen
    case $arm in psfm|random) CACHE="--cache_latent=true" ;; *) CACHE="" ;; esac
    "$PYTHON" train.py --resume --stage=vlm --spa3r=$arm --seed=$seed --data="$OUT/data" --init_geo="$OUT/geo" \
      --init_spa3r="$OUT/psfm" --out="$dir" --tasks="$TASKS" $COMMON $VLM $CACHE
    "$PYTHON" eval.py --ckpt="$dir" --data="$OUT/data" --split=val --tasks="$TASKS" --json_out="$dir/eval.json" > "$dir/eval.txt"
  done
done

# The report: gates, the ablation with its intervals, the per-task table of seed 0, the time.
declare -A NAME=([none]="baseline" [psfm]="Spa3-VLM" [random]="random Spa3R" [oracle]="oracle")
declare -A RUNS
gates="geo=$OUT/geo/metrics.jsonl,psfm=$OUT/psfm/metrics.jsonl"
arms=""; per_task=""
for arm in $ARMS; do
  runs=""
  for seed in $(seq 0 $((SEEDS - 1))); do
    dir="$OUT/vlm_${arm}_s$seed"
    # the control's latent swap is no gate: whether a VLM reads an untrained encoder's latent is not asked of it
    [ "$arm" = random ] || gates+=",${NAME[$arm]} seed $seed=$dir/metrics.jsonl"
    gates+=",${NAME[$arm]} seed $seed=$dir/eval.json"
    runs+="${runs:++}$dir/eval.json"
  done
  RUNS[$arm]=$runs
  arms+="${arms:+,}${NAME[$arm]}=$runs"
  per_task+="${per_task:+,}${NAME[$arm]}=$OUT/vlm_${arm}_s0/eval.json"
done
wall=$(( $(date +%s) - start ))
{
  echo "# nanoSpa3R speedrun, size $SIZE"
  echo
  echo "Machine: $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only")'), $(nproc) CPU cores. Wall time: $((wall / 60)) min $((wall % 60)) s. Command: \`bash speedrun.sh --size=$SIZE$([ "$DATA_SEED" = 0 ] || echo " --data_seed=$DATA_SEED")\`."
  echo
  echo "## Gates: every stage against its trivial baseline on held-out scenes"
  echo
  echo "Each row: the model's mean error (lower is better; R² and scores: higher) and its baseline's on the same"
  echo "held-out samples; PASS when the paired bootstrap 95 % interval of the difference excludes 0 on the right side."
  echo
  "$PYTHON" eval.py --gates="$gates"
  echo
  echo "## The ablation: held-out score, $SEEDS seed(s) per arm, each compared with the baseline"
  echo
  "$PYTHON" eval.py --ablation="$arms"
  echo
  if [ -n "${RUNS[random]:-}" ]; then
    echo "## PSFM pretraining: Spa3-VLM against the same model with its Spa3R encoder untrained"
    echo
    "$PYTHON" eval.py --ablation="${NAME[random]}=${RUNS[random]},${NAME[psfm]}=${RUNS[psfm]}"
    echo
  fi
  echo "## Per task, seed 0 of each arm"
  echo
  "$PYTHON" eval.py --compare="$per_task"
} > "$OUT/report.md"
cat "$OUT/report.md"
echo "wrote $OUT/report.md"
