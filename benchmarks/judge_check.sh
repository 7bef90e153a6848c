#!/usr/bin/env bash
# Issue 6's judge check at a resolution the 2-core CPU machine cannot afford (default 512 px on a
# GPU): render the example set, train the judge (docs/eval/judge.md's recipe; only --size,
# --device and --workers differ) and its shuffled-label control, score both on the test split,
# print the verdict.
#
#   OUT=DIR [PY=python3] [DEVICE=cuda] [SIZE=512] [COUNT=4000] [BODIES=200] [EPOCHS=40] \
#     [WORKERS=$(nproc)] [LOADER_WORKERS=8] [DATA=/tmp/megamed_judge_$SIZE] [DEADLINE_S=540] \
#     bash benchmarks/judge_check.sh
#
# At 256 px on CPU the judge misses only lung lesion (mild nodules are ~14 px; docs/eval/judge.md):
# at 512 px a mild nodule spans ~28 px. The rendered images stay in DATA (4000 x 512^2 16-bit PNGs
# are ~1.5 GB; they must not go under OUT, which comes back from a device machine).
#
# The device machine reaches no package registry, so the CT must come in a megamed cache: carry
# the folder that `bash benchmarks/judge_check.sh --pack-cache DIR` fills (28 MB: the preprocessed
# CT volume, its label map and the structure names) and run with MEGAMED_CACHE=DIR. Each step writes under OUT as it
# goes (judge_check.md, judge_*.txt, judge_test/, control_test/), so a step cut by the deadline
# still leaves what came before.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}

if [ "${1:-}" = "--pack-cache" ]; then
  # copy the CT files megamed needs offline from this machine's cache into DIR (MEGAMED_CACHE layout)
  dest=${2:?usage: judge_check.sh --pack-cache DIR}
  "$PY" -c "import sys; from megamed.data.ct import pack_cache; print(f'packed {pack_cache(sys.argv[1]) / 1e6:.1f} MB into {sys.argv[1]}')" "$dest"
  exit $?
fi

OUT=${OUT:-benchmarks/out}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-512}
COUNT=${COUNT:-4000}
BODIES=${BODIES:-200}
EPOCHS=${EPOCHS:-40}
WORKERS=${WORKERS:-$(nproc)}
# DataLoader workers of the classifier: they decode the images into the cache once (512 px: ~15 ms
# an image on one core, a minute for 4000 in one process) and pass batches through /dev/shm, which a
# container may cap at 64 MB: with under 4 GB free there, the main process does it all
shm_free_mb=$(df -Pm /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
if [ "${shm_free_mb:-0}" -ge 4096 ]; then
  LOADER_WORKERS=${LOADER_WORKERS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}
else
  LOADER_WORKERS=${LOADER_WORKERS:-0}
fi
DATA=${DATA:-/tmp/megamed_judge_$SIZE}
DEADLINE_S=${DEADLINE_S:-540}
mkdir -p "$OUT"
SUMMARY="$OUT/judge_check.md"

STEP_PREFIX=judge_
source benchmarks/steps.sh            # note, step (outputs in $OUT/judge_NAME.txt)

note "# judge_check $(date -u +%FT%TZ): size $SIZE, $COUNT images, $EPOCHS epochs, device $DEVICE, $LOADER_WORKERS loader workers (/dev/shm free: ${shm_free_mb:-?} MB)"
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')" | tee -a "$SUMMARY"
if ! "$PY" -c "from megamed.data.ct import load_ct; load_ct(2)" > "$OUT/judge_ct.txt" 2>&1; then
  note "STOP: the CT is not in the megamed cache (MEGAMED_CACHE=${MEGAMED_CACHE:-unset}) and cannot be fetched here: $(tail -n 1 "$OUT/judge_ct.txt")"
  exit 2
fi

# the recipe of docs/eval/judge.md; only --size, --device and --workers differ
RECIPE=(--size "$SIZE" --epochs "$EPOCHS" --growth 8 --blocks 2,4,6,4 --init-features 32 --pool lse --localize 3
        --schedule cosine --balanced --batch-size 32 --lr 2e-3 --cache-images --device "$DEVICE" --workers "$LOADER_WORKERS" --no-progress)
step render 300 "$PY" -m megamed data example --out "$DATA" --count "$COUNT" --size "$SIZE" --bodies "$BODIES" \
  --seed 0 --workers "$WORKERS" || { note "STOP: rendering failed or ran out of time"; exit 3; }
for run in judge control; do
  extra=(--patience "$EPOCHS")
  [ "$run" = control ] && extra=(--patience 6 --shuffle-labels)
  step "train_$run" 400 "$PY" -m megamed eval classifier train --data "$DATA" --out "$OUT/$run" "${RECIPE[@]}" "${extra[@]}" \
    && step "predict_$run" 60 "$PY" -m megamed eval classifier predict --checkpoint "$OUT/$run" --data "$DATA" \
         --split test --size "$SIZE" --device "$DEVICE" --no-progress --out "$OUT/${run}_test"
done
# the verdict (megamed.eval.classifier.judge_check: every visible (finding, bin) >= 0.9, control ~0.5)
"$PY" - "$OUT" <<'EOF' | tee -a "$SUMMARY"
import json, sys
from pathlib import Path
from megamed.eval.classifier import judge_check
out = Path(sys.argv[1])
got = {r: out / f"{r}_test" / "classifier.json" for r in ("judge", "control")}
if not got["judge"].is_file():
    sys.exit(print("no verdict: the judge did not finish"))
bins = {r: json.loads(p.read_text())["severity_bin_auroc"] if p.is_file() else {} for r, p in got.items()}
r = judge_check(bins["judge"], bins["control"])
print(f"verdict: {'MET' if r['ok'] else 'not met'}: {r['passed']} of {r['pairs']} visible pairs >= 0.9; "
      f"misses {r['misses'] or 'none'}; control mean AUROC {r['control_mean']}")
EOF
note "done in $SECONDS s"
