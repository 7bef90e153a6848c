#!/usr/bin/env bash
# Trains the checkpoint shipped in megamed/pretrained/small/ -- the exact recorded command.
#
#   bash scripts/train_pretrained_small.sh [WORK_DIR]                 all stages
#   bash scripts/train_pretrained_small.sh [WORK_DIR] --export-only   stage 3 only: export the newest
#        EMA model of WORK_DIR/run (the trainer re-exports RUN/model at every checkpoint, so this
#        also works while stage 2 is still running)
#   WORK_DIR defaults to /tmp/megamed-pretrained-small; it holds data/ and run/.
#   TRAIN_MINUTES (default 52) then RESUME_MINUTES (default 0) of training; see TRAINING.md for
#   the schedule the shipped checkpoint actually got.
#
# Data: only the project's own CT-rendered example set with our template prompts (no IU or
# CheXpert text). Model: the `small` config at 128x128, condition dropout 0.1 (for CFG),
# trained for a fixed wall-clock budget on a 2-core CPU shared with other jobs.
#
# Stages: 1. render the example set (resumable)  2. train for TRAIN_MINUTES; at the budget
# `timeout` sends SIGTERM, the trainer finishes the step, checkpoints and exports RUN/model
# 3. export RUN/model as float16 (+ tokenizer) into the package with its training log.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/megamed-pretrained-small}
EXPORT_ONLY=${2:-}
PY=${PY:-.venv/bin/python}
MEGAMED=${MEGAMED:-.venv/bin/megamed}
TRAIN_MINUTES=${TRAIN_MINUTES:-52}
SIZE=128
DEST=megamed/pretrained/small
DATA_CMD=($MEGAMED data example --out "$WORK/data" --count 640 --size $SIZE --seed 0 --workers 2 --bodies 32)
TRAIN_CMD=($MEGAMED train --config small --data "$WORK/data" --out "$WORK/run" --size $SIZE --batch 8
           --lr 5e-4 --warmup-steps 100 --cond-drop 0.1 --max-steps 100000 --save-every 250
           --log-every 10 --seed 0 --no-tensorboard --no-progress)
mkdir -p "$WORK"

if [ "$EXPORT_ONLY" != "--export-only" ]; then
  # 1. example data set: 640 images at 128^2 from 32 bodies (train/val/test split by body)
  "${DATA_CMD[@]}"
  # 2. train from scratch (exit status 124 from timeout is the expected end)
  START=$(date +%s)
  timeout --signal=TERM "${TRAIN_MINUTES}m" "${TRAIN_CMD[@]}" || true
  # 2b. optionally continue (bit-exact resume; one thread pinned to a core is far faster than two
  #     threads on a machine whose other core is busy)
  if [ "${RESUME_MINUTES:-0}" -gt 0 ]; then
    OMP_NUM_THREADS=1 timeout --signal=TERM "${RESUME_MINUTES}m" \
      $MEGAMED train --out "$WORK/run" --resume --no-progress || true
  fi
  echo $(( $(date +%s) - START )) > "$WORK/run/train_wall_s"
fi

# 3. float16 export of the newest EMA model. default_resolution is set to the training size,
#    so `megamed sample` and the quickstart draw at the resolution the model learned.
rm -rf "$DEST" && mkdir -p "$DEST"
$PY - "$WORK/run/model" "$DEST" $SIZE <<'PYEOF'
import dataclasses, sys
from megamed.models.io import from_pretrained, save_pretrained
model, tokenizer, data = from_pretrained(sys.argv[1])
model.config = dataclasses.replace(model.config, default_resolution=int(sys.argv[3]))
save_pretrained(model, sys.argv[2], tokenizer=tokenizer, half=True,
                extra={k: v for k, v in data.items() if k != "model"})
PYEOF
# the log up to the exported step (a running trainer may already be further)
STEP=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$DEST/config.json")
awk -F, -v s="$STEP" '{ sub(/\r$/, "") } NR == 1 || $1 <= s' "$WORK/run/logs/metrics.csv" > "$DEST/train_log.csv"
LAST=$(tail -n 1 "$DEST/train_log.csv")
WALL=$(cat "$WORK/run/train_wall_s" 2>/dev/null | sed 's/$/ s (the whole run)/' \
       || printf '%.0f s to the exported step (the run was still going)' "${LAST##*,}")
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
cat > "$DEST/TRAINING.md" <<MD
# megamed/pretrained/small

Made by \`bash scripts/train_pretrained_small.sh\` (source tree: git $COMMIT plus the uncommitted work of that day).

- data: \`${DATA_CMD[*]}\` -- rendered from the project's CT, template prompts only
- train: \`${TRAIN_CMD[*]}\` under \`timeout ${TRAIN_MINUTES}m\`
- model: the \`small\` config at ${SIZE}x${SIZE}; the EMA weights of step ${STEP}, stored as float16
- last logged row (step, loss, lr, grad_norm, images/s, epoch, wall s): \`${LAST}\`
- training wall time: ${WALL}, on $(nproc) CPU cores shared with other jobs
- log: \`train_log.csv\` (metrics.csv of the run, up to the exported step)
MD
chmod -R a+rX "$DEST"   # safetensors writes 0600; a package file must be readable by everyone
du -sh "$DEST"
echo "exported $DEST (step $STEP)"
