# Sourced by the H200 run scripts (h200_serving.sh, h200_features.sh): Ray's environment and
# run NAME TIMEOUT COMMAND..., which appends the command's output to $log, bounds it with
# timeout in its own session, and stops any Ray processes it left behind.
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
run() {  # name, timeout, command...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" >> "$log"
  setsid timeout -k 10 "$limit" "$@" >> "$log" 2>&1
  echo "== $name exit $?" >> "$log"
  python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1
}
# The lent GPU's kind for result names: h200 or h100 (the H200 is asked for; an H100 may come).
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -q H200 && echo h200 || echo h100)
