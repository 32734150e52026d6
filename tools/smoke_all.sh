#!/bin/bash
# Run every experiment's smoke preset into OUT (one folder per script), e.g. before and after a refactor:
#   tools/smoke_all.sh /tmp/before            # from a checkout of the old commit (SRC=that checkout)
#   tools/smoke_all.sh /tmp/after && python tools/compare_runs.py /tmp/before /tmp/after
# SRC (default: this checkout) is the tree whose learned_opt/ and experiments/ run; PY the interpreter.
set -u
OUT=$(realpath -m "$1")
HERE=$(cd "$(dirname "$0")/.." && pwd)
SRC=${SRC:-$HERE}
PY=${PY:-$HERE/.venv/bin/python}
cd "$SRC" || exit 1
export PYTHONPATH=$SRC OMP_NUM_THREADS=1 WANDB_MODE=disabled
mkdir -p "$OUT"
status=0
run() {
  name=$1; shift
  echo "== $name"
  "$PY" "$@" > "$OUT/$name.log" 2>&1 || { echo "FAILED $name (see $OUT/$name.log)"; status=1; }
}
run quadratic experiments/quadratic.py --preset smoke --out_dir "$OUT/quadratic"
run metanet experiments/metanet.py --preset smoke --out_dir "$OUT/metanet"
run digits experiments/digits.py --preset smoke --final true --out_dir "$OUT/digits"
run digits_ablation experiments/digits_ablation.py --preset smoke --out_dir "$OUT/digits_ablation"
run control experiments/control.py --preset smoke --out_dir "$OUT/control"
run estimators experiments/estimators.py --preset smoke --out_dir "$OUT/estimators"
run estimators_horizon experiments/estimators_horizon.py --preset smoke --out_dir "$OUT/estimators_horizon" \
  --estimators_summary "$OUT/estimators_horizon/est.json"
run general_train experiments/general_train.py --preset smoke --workers 1 --out_dir "$OUT/general_train"
run general experiments/general.py --preset smoke --train_dir "$OUT/general_train" --out_dir "$OUT/general"
exit $status
