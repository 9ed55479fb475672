#!/usr/bin/env bash
# The local development stack on loopback: an S3 server (moto), an MLflow server with its artifacts in that
# S3, and a Ray head with the dashboard / Jobs API -- everything `k2pipe submit` needs, on one machine.
#
#   infra/local/stack.sh up        # start all three; writes infra/local/.env
#   source infra/local/.env
#   k2pipe submit ci --storage "$K2PIPE_STORAGE" --wait
#   k2pipe compare --out runs.png
#   infra/local/stack.sh status
#   infra/local/stack.sh down      # stops exactly what `up` started, by process id
#
# Each service runs in its own session (process group) whose id is recorded; `down` signals those groups
# (SIGTERM, then SIGKILL after 10 s) and the Ray processes that name this stack's Ray temp dir. It never runs
# `ray stop`, which kills every Ray process on the machine, other people's clusters included.
#
# Settings (environment variables, with defaults):
#   K2PIPE_STACK_DIR      infra/local/.state  (pids, logs, the MLflow database; gitignored)
#   K2PIPE_RAY_TEMP_DIR   /tmp/k2pipe-ray-$UID  (short: Unix socket paths are limited to 107 bytes)
#   K2PIPE_PYTHON         <repo>/.venv/bin/python (its bin/ must hold ray and mlflow)
#   K2PIPE_S3_PORT 9000, K2PIPE_MLFLOW_PORT 5000, K2PIPE_RAY_PORT 6380 (GCS; outside Ray's worker ports
#   10002-19999), K2PIPE_RAY_DASHBOARD_PORT 8265, K2PIPE_RAY_CPUS 4, K2PIPE_BUCKET k2pipe
#   K2PIPE_RAY_AUTH_MODE  disabled (a loopback-only dev head); "token" uses ~/.ray/auth_token (see README)
# moto keeps its objects in memory: `down` discards the stack's S3 data (the MLflow database stays).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PY="${K2PIPE_PYTHON:-$REPO/.venv/bin/python}"
BIN="$(dirname "$PY")"
STACK_DIR="${K2PIPE_STACK_DIR:-$HERE/.state}"
RAY_TEMP_DIR="${K2PIPE_RAY_TEMP_DIR:-/tmp/k2pipe-ray-$(id -u)}"
S3_PORT="${K2PIPE_S3_PORT:-9000}"
MLFLOW_PORT="${K2PIPE_MLFLOW_PORT:-5000}"
RAY_PORT="${K2PIPE_RAY_PORT:-6380}"
DASHBOARD_PORT="${K2PIPE_RAY_DASHBOARD_PORT:-8265}"
RAY_CPUS="${K2PIPE_RAY_CPUS:-4}"
BUCKET="${K2PIPE_BUCKET:-k2pipe}"
AUTH_MODE="${K2PIPE_RAY_AUTH_MODE:-disabled}"
ENV_FILE="$HERE/.env"
S3_URL="http://127.0.0.1:$S3_PORT"
MLFLOW_URL="http://127.0.0.1:$MLFLOW_PORT"
DASHBOARD_URL="http://127.0.0.1:$DASHBOARD_PORT"
SERVICES=(s3 mlflow ray)

# moto accepts any credentials; these are placeholders, not secrets.
S3_ENV=(AWS_ENDPOINT_URL_S3="$S3_URL" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
        AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1 MLFLOW_S3_ENDPOINT_URL="$S3_URL")

die() { echo "stack.sh: $*" >&2; exit 1; }
pid_file() { echo "$STACK_DIR/$1.pid"; }

alive() {  # alive SERVICE: its leader (until it has called setsid) or a member of its process group lives
  local f pid; f="$(pid_file "$1")"
  [[ -s "$f" ]] || return 1
  pid="$(cat "$f")"
  kill -0 "$pid" 2>/dev/null || kill -0 -- "-$pid" 2>/dev/null
}

port_free() {
  "$PY" - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
}

free_port() {
  "$PY" - <<'EOF'
import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    if not 10002 <= port <= 19999:
        print(port); break
EOF
}

wait_http() {  # wait_http NAME URL SECONDS
  local name="$1" url="$2" deadline=$((SECONDS + $3))
  until "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$url" 2>/dev/null; do
    alive "$name" || die "$name exited during start; see $STACK_DIR/$name.log"
    (( SECONDS < deadline )) || die "$name did not answer at $url within $3 s; see $STACK_DIR/$name.log"
    sleep 1
  done
}

launch() {  # launch NAME CMD...: run CMD in a new session, output to NAME.log, record the session id
  local name="$1"; shift
  "$PY" -c 'import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])' "$@" \
    > "$STACK_DIR/$name.log" 2>&1 < /dev/null &
  echo $! > "$(pid_file "$name")"
}

up() {
  [[ -x "$PY" ]] || die "no Python at $PY; run 'make install' first or set K2PIPE_PYTHON"
  [[ -x "$BIN/ray" && -x "$BIN/mlflow" ]] || die "$BIN lacks ray or mlflow; install the project into that venv"
  mkdir -p "$STACK_DIR"
  local name running=0
  for name in "${SERVICES[@]}"; do
    if alive "$name"; then running=1; fi
  done
  if (( running )); then
    echo "stack.sh: the stack is already (partly) up; 'stack.sh down' first to restart it" >&2
    status
    return 1
  fi
  local port
  for port in "$S3_PORT" "$MLFLOW_PORT" "$RAY_PORT" "$DASHBOARD_PORT"; do
    port_free "$port" || die "port $port on 127.0.0.1 is taken; choose another with the K2PIPE_*_PORT variables"
  done

  echo "starting S3 (moto) on $S3_URL"
  launch s3 "$PY" -m moto.server -H 127.0.0.1 -p "$S3_PORT"
  wait_http s3 "$S3_URL/" 60
  env "${S3_ENV[@]}" "$PY" -c "
import boto3, sys
s3 = boto3.client('s3')
if sys.argv[1] not in [b['Name'] for b in s3.list_buckets()['Buckets']]:
    s3.create_bucket(Bucket=sys.argv[1])" "$BUCKET"

  echo "starting MLflow on $MLFLOW_URL (artifacts s3://$BUCKET/mlflow)"
  launch mlflow env "${S3_ENV[@]}" MLFLOW_HOST=127.0.0.1 MLFLOW_PORT="$MLFLOW_PORT" MLFLOW_BIN="$BIN/mlflow" \
    MLFLOW_DATA_DIR="$STACK_DIR/mlflow" MLFLOW_ARTIFACTS_DESTINATION="s3://$BUCKET/mlflow" \
    bash "$REPO/infra/mlflow/run_server.sh"
  wait_http mlflow "$MLFLOW_URL/health" 120

  echo "starting the Ray head (GCS 127.0.0.1:$RAY_PORT, dashboard $DASHBOARD_URL, auth $AUTH_MODE)"
  mkdir -p "$RAY_TEMP_DIR"
  # The venv first on PATH: a job's `python` is the head's. Agent and client-server ports are chosen free:
  # their defaults (52365, 10001) are taken by any other Ray cluster on the machine.
  launch ray env PATH="$BIN:$PATH" RAY_AUTH_MODE="$AUTH_MODE" RAY_USAGE_STATS_ENABLED=0 "${S3_ENV[@]}" \
    MLFLOW_TRACKING_URI="$MLFLOW_URL" \
    "$BIN/ray" start --head --block --node-ip-address 127.0.0.1 --port "$RAY_PORT" \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --include-dashboard true \
    --dashboard-agent-listen-port "$(free_port)" --ray-client-server-port "$(free_port)" \
    --num-cpus "$RAY_CPUS" --disable-usage-stats --temp-dir "$RAY_TEMP_DIR"
  wait_http ray "$DASHBOARD_URL/api/version" 180

  umask 077
  cat > "$ENV_FILE" <<EOF
# Written by infra/local/stack.sh up; removed by 'stack.sh down'. Local placeholders, no real credentials.
export AWS_ENDPOINT_URL_S3=$S3_URL
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_REGION=us-east-1
export AWS_DEFAULT_REGION=us-east-1
export MLFLOW_S3_ENDPOINT_URL=$S3_URL
export MLFLOW_TRACKING_URI=$MLFLOW_URL
export RAY_API_SERVER_ADDRESS=$DASHBOARD_URL
export RAY_AUTH_MODE=$AUTH_MODE
export K2PIPE_STORAGE=s3://$BUCKET/k2pipe
EOF
  echo "stack is up; settings in $ENV_FILE:"
  echo "  source $ENV_FILE && k2pipe submit ci --storage \"\$K2PIPE_STORAGE\" --wait"
}

stop_service() {  # stop_service NAME [MARKER]: end its process group, then processes naming MARKER
  local name="$1" marker="${2:-}" f pgid i
  f="$(pid_file "$name")"
  if [[ -s "$f" ]]; then
    pgid="$(cat "$f")"
    if kill -TERM -- "-$pgid" 2>/dev/null; then
      for i in $(seq 10); do
        kill -0 -- "-$pgid" 2>/dev/null || break
        sleep 1
      done
      kill -KILL -- "-$pgid" 2>/dev/null || true
      echo "stopped $name (process group $pgid)"
    fi
    rm -f "$f"
  fi
  if [[ -n "$marker" ]]; then
    # Workers the raylet started outside the group: only those whose command line names this stack's dir.
    local pid
    for pid in $(pgrep -u "$(id -u)" -f -- "$marker" || true); do
      [[ "$pid" == "$$" ]] || kill -KILL "$pid" 2>/dev/null || true
    done
  fi
}

down() {
  stop_service ray "$RAY_TEMP_DIR/"
  stop_service mlflow
  stop_service s3
  rm -f "$ENV_FILE"
}

status() {
  local name url
  for name in "${SERVICES[@]}"; do
    case "$name" in
      s3) url="$S3_URL (bucket $BUCKET)" ;;
      mlflow) url="$MLFLOW_URL" ;;
      ray) url="$DASHBOARD_URL (GCS 127.0.0.1:$RAY_PORT)" ;;
    esac
    if alive "$name"; then
      printf '%-7s running  pid %-8s %s\n' "$name" "$(cat "$(pid_file "$name")")" "$url"
    else
      printf '%-7s stopped\n' "$name"
    fi
  done
  [[ -f "$ENV_FILE" ]] && echo "settings: source $ENV_FILE"
  return 0
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 {up|down|status}" >&2; exit 2 ;;
esac
