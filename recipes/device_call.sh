# Sourced (from the repository root) by the GPU-session recipes, h200_session.sh and h200_x4_session.sh: the
# environment of a lent-device call, its time budget, and a deadline for long work, so that a 10-minute call always
# keeps time to copy its results back.
#   OUT     where the results go back (default /tmp/out)     BUDGET  seconds this call may use (default 540)
#   left                             seconds left before the copy-back (20 s kept for it)
#   deadline <seconds> <command...>  SIGINT at the deadline (Lightning saves and stops), SIGKILL 15 s later
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
t_start=$SECONDS

left() { echo $(( BUDGET - 20 - (SECONDS - t_start) )); }

deadline() {
  local secs=$1 t=0; shift
  setsid "$@" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null && (( t < secs )); do sleep 2; t=$((t + 2)); done
  if kill -0 "$pid" 2>/dev/null; then
    echo "-- deadline after ${secs}s: interrupting $*"
    kill -INT -- "-$pid" 2>/dev/null; sleep 15; kill -KILL -- "-$pid" 2>/dev/null
  fi
  wait "$pid" 2>/dev/null
}
