# Shared by gpu_check.sh and judge_check.sh (source it after setting OUT, SUMMARY, DEADLINE_S):
#   note TEXT...              print and append to $SUMMARY
#   step NAME TIMEOUT_S CMD   run CMD with its limit cut to what is left of DEADLINE_S (skipped
#                             when under 20 s are left), output in $OUT/${STEP_PREFIX}NAME.txt,
#                             status line in $SUMMARY, last lines on the terminal; returns CMD's rc
note() { echo "$*" | tee -a "$SUMMARY"; }
step() {
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE_S - SECONDS))
  if [ "$left" -lt 20 ]; then
    note "- $name: SKIPPED (deadline: ${left} s of ${DEADLINE_S} s left)"
    return 125
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/${STEP_PREFIX:-}$name.txt" 2>&1
  local rc=$?
  note "- $name: rc=$rc ($((SECONDS - t0)) s, limit ${limit} s)$([ $rc -eq 124 ] && echo ' TIMED OUT')"
  tail -n 5 "$OUT/${STEP_PREFIX:-}$name.txt"
  return $rc
}
