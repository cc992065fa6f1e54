#!/usr/bin/env bash
# speedrun.sh -- one command from nothing to the headline ablation of nanoSpa3R:
#
#   install check -> generate_spar.py -> train geo -> train psfm -> train vlm twice (with the PSFM-pretrained
#   Spa3R branch, and --spa3r=none at equal steps) -> eval.py on held-out scenes for both -> OUT/report.md
#
# Usage: bash speedrun.sh [--size=cpu|gpu|test] [--out=DIR]       (or SIZE=... OUT=... bash speedrun.sh)
#   cpu   the default: tiny models on a small data set, about 8 minutes on a 2-core CPU
#   gpu   reference-size models and data for one GPU (not yet run on a GPU: budgets are estimates)
#   test  a smaller still version that the test suite runs
# Every size runs the same code; only the numbers below differ.
set -euo pipefail
cd "$(dirname "$0")"

SIZE=${SIZE:-cpu}
OUT=${OUT:-}
for arg in "$@"; do
  case $arg in
    --size=*) SIZE=${arg#--size=} ;;
    --out=*) OUT=${arg#--out=} ;;
    *) echo "speedrun.sh: unknown argument $arg (use --size=cpu|gpu|test, --out=DIR)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-out}

case $SIZE in
  test)
    DATA="--scenes=6 --val_scenes=2 --views=8 --random_views=2 --res=32 --qa_per_task=1 --vocab_size=400"
    COMMON="--preset=tiny --log_every=10 --eval_every=0 --save_every=1000"
    GEO="--steps=15"; PSFM="--steps=15"; VLM="--steps=15 --batch_size=8" ;;
  cpu)
    DATA="--scenes=96 --val_scenes=16 --views=12 --random_views=4 --res=32 --qa_per_task=3 --vocab_size=1024"
    COMMON="--preset=tiny --log_every=50 --eval_every=0 --save_every=1000"
    GEO="--steps=600"; PSFM="--steps=600"; VLM="--steps=1200 --batch_size=32" ;;
  gpu)
    DATA="--scenes=512 --val_scenes=32 --res=224 --workers=8"
    COMMON="--preset=reference --log_every=20 --eval_every=500 --save_every=500"
    GEO="--steps=3000 --batch_size=32"; PSFM="--steps=3000 --batch_size=32"; VLM="--steps=2000 --batch_size=32" ;;
  *) echo "speedrun.sh: --size must be cpu, gpu or test, got '$SIZE'" >&2; exit 2 ;;
esac

start=$(date +%s)
python -c "import torch, numpy, safetensors, tokenizers, tqdm" \
  || { echo "speedrun.sh: install first: pip install torch==2.13.0 && pip install -r requirements.txt" >&2; exit 1; }
mkdir -p "$OUT"

echo "== data"
[ -f "$OUT/data/qa_val.jsonl" ] || python generate_spar.py --out="$OUT/data" --seed=0 $DATA
echo "== stage geo"
python train.py --stage=geo --data="$OUT/data" --out="$OUT/geo" $COMMON $GEO
echo "== stage psfm"
python train.py --stage=psfm --data="$OUT/data" --init_geo="$OUT/geo" --out="$OUT/psfm" $COMMON $PSFM
echo "== stage vlm: Spa3-VLM, then the baseline without the spatial branch, at equal steps"
python train.py --stage=vlm --data="$OUT/data" --init_spa3r="$OUT/psfm" --out="$OUT/vlm" $COMMON $VLM
python train.py --stage=vlm --spa3r=none --data="$OUT/data" --init_geo="$OUT/geo" --out="$OUT/vlm_none" $COMMON $VLM
echo "== eval on held-out scenes"
python eval.py --ckpt="$OUT/vlm" --data="$OUT/data" --split=val --json_out="$OUT/eval_vlm.json" > "$OUT/eval_vlm.txt"
python eval.py --ckpt="$OUT/vlm_none" --data="$OUT/data" --split=val --json_out="$OUT/eval_vlm_none.json" > "$OUT/eval_vlm_none.txt"

# The report: both systems side by side with the chance baselines, the stages' last logged numbers, the time.
wall=$(( $(date +%s) - start ))
{
  echo "# nanoSpa3R speedrun, size $SIZE"
  echo
  echo "Machine: $(python -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only")'), $(nproc) CPU cores. Wall time: $((wall / 60)) min $((wall % 60)) s. Command: \`bash speedrun.sh --size=$SIZE\`."
  echo
  echo "## Held-out scenes: Spa3-VLM vs the baseline VLM (--spa3r=none), equal steps"
  echo
  python eval.py --compare="Spa3-VLM=$OUT/eval_vlm.json,baseline (no Spa3R)=$OUT/eval_vlm_none.json"
  echo
  python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
scores = {name: json.load(open(f"{out}/{name}.json"))["model"]["overall"] for name in ("eval_vlm", "eval_vlm_none")}
frequency = json.load(open(f"{out}/eval_vlm.json"))["chance_frequency"]["overall"]
gain = scores["eval_vlm"] - scores["eval_vlm_none"]
print(f"Overall: Spa3-VLM {scores['eval_vlm']:.2f}, baseline {scores['eval_vlm_none']:.2f} "
      f"({'+' if gain >= 0 else ''}{gain:.2f}); chance (frequency) {frequency:.2f}. "
      + ("The PSFM branch beats the baseline here." if gain > 0 else
         "The PSFM branch does NOT beat the baseline here."))
PY
  echo
  echo "## Training: each stage's last logged lines"
  echo
  for stage in geo psfm vlm vlm_none; do
    echo "- \`$stage\`: $(grep -v ' val ' "$OUT/$stage/log.txt" | grep ' step ' | tail -n 1)"
    val=$(grep ' val ' "$OUT/$stage/log.txt" | tail -n 1 || true)
    [ -n "$val" ] && echo "  - $val"
  done
} > "$OUT/report.md"
cat "$OUT/report.md"
echo "wrote $OUT/report.md"
