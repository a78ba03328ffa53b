# Sourced by the GPU-session recipes: run a command in its own process group and interrupt it at a deadline,
# so a 10-minute device call always keeps time to copy its results back.
#   deadline <seconds> <command...>     SIGINT at the deadline (Lightning saves and stops), SIGKILL 15 s later
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
