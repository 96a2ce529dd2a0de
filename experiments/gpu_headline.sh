#!/usr/bin/env bash
# The headline row on a lent GPU (an H200): drmm5-nn-kl, N_L = 100, seed 0, the full protocol (Adam 1e-3 -> 1e-6,
# 100 labeled + 100 unlabeled per batch, all 60K training images, full 10K test set) shortened to as many epochs
# as fit in the time budget, measured on the machine itself before training starts.
#
# Run from the repository root on the device machine, with MNIST copied into the git-ignored local_data/mnist
# (the device has no network), e.g. through the `run` tool with carry=["local_data"]:
#     bash experiments/gpu_headline.sh
# Writes to $OUT (default ./out): install.log, headline.log (the raw training log), results/table1.csv (the CSV row),
# results/table1.md, results/throughput.json, results/runs/<run>/metrics.csv (+ checkpoints), timing.txt.
# Knobs: TOTAL_BUDGET_S (default 540: the whole script, install included, stays under a 600 s command limit),
# PYTHON (default python3), DRMM_GIT_COMMIT (recorded in the CSV when the copy is not a git checkout).
set -euo pipefail

OUT=${OUT:-out}
PYTHON=${PYTHON:-python3}
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-540}
export DRMM_DATA_DIR=${DRMM_DATA_DIR:-local_data}
mkdir -p "$OUT/results"
start=$SECONDS
stamp() { echo "[gpu_headline] $(date +%H:%M:%S) +$((SECONDS - start)) s: $*" | tee -a "$OUT/timing.txt"; }

if [ ! -d "$DRMM_DATA_DIR/mnist" ]; then
  echo "error: $DRMM_DATA_DIR/mnist not found; copy the four MNIST IDX files there (the device has no network)" >&2
  exit 2
fi
nvidia-smi -L | tee -a "$OUT/timing.txt" || true

# 1. install: CUDA + C++ kernels; if the CUDA build fails, fall back (Triton / reference backends still run on
#    the GPU) and say so in the log rather than losing the run.
stamp "install"
if ! $PYTHON -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
  stamp "full build failed (see install.log); retrying with DRMM_SKIP_CUDA_BUILD=1"
  DRMM_SKIP_CUDA_BUILD=1 $PYTHON -m pip install --no-deps --no-build-isolation -e . >>"$OUT/install.log" 2>&1
fi
$PYTHON -c "import torch, drmm_kernels as dk; print('torch', torch.__version__, 'cuda', torch.cuda.is_available()); \
print({k: v.available for k, v in dk.available_backends().items()})" | tee -a "$OUT/timing.txt"

# 2. throughput of the EG step at the training batch (200 = 100 + 100), to size the run.
stamp "throughput"
$PYTHON -m drmm experiment throughput --model conv_small --batch 200 --warmup 5 --repeats 20 --out "$OUT/results" \
  2>&1 | tee -a "$OUT/timing.txt"

# 3. epochs that fit: an epoch is (60000 - 100) / 100 = 599 EG steps of 200 images, plus a 10K-image evaluation;
#    30 % margin for the data gathers, the lr scheduler and checkpoints; 60 s kept for the final scoring and report.
EPOCHS=$($PYTHON - "$OUT/results/throughput.json" "$TOTAL_BUDGET_S" "$((SECONDS - start))" <<'PY'
import json, math, sys
measurement = json.load(open(sys.argv[1]))["measurements"][-1]
eg = next(s for s in measurement["steps"] if s["trainer"] == "eg")
seconds_per_epoch = 1.3 * 599 * eg["median_step_s"] + 2.0
budget = float(sys.argv[2]) - float(sys.argv[3]) - 60.0
print(max(1, math.floor(budget / seconds_per_epoch)))
PY
)
stamp "training drmm5-nn-kl N_L=100 seed 0 for $EPOCHS epochs (full protocol, shortened: schedule full-${EPOCHS}ep)"

# 4. the row: one CSV line in $OUT/results/table1.csv, the raw log beside it.
$PYTHON -m drmm experiment table1 --row drmm5-nn-kl --labels 100 --seeds 0 --schedule full --epochs "$EPOCHS" \
  --progress --out "$OUT/results" 2>&1 | tee "$OUT/headline.log"
stamp "done"
cat "$OUT/results/table1.csv"
