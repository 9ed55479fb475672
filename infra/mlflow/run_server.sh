#!/usr/bin/env bash
# The MLflow tracking server for k2pipe: runs and metrics in a SQL store, artifacts proxied to S3.
#
#   MLFLOW_ARTIFACTS_DESTINATION=s3://BUCKET/mlflow infra/mlflow/run_server.sh
#   k2pipe submit ... --tracking-uri http://127.0.0.1:5000
#
# Every setting is an environment variable with a default:
#   MLFLOW_HOST                   127.0.0.1 (loopback: the server has no authentication; to serve a cluster,
#                                 bind its private address and set MLFLOW_ALLOWED_HOSTS)
#   MLFLOW_PORT                   5000
#   MLFLOW_BACKEND_STORE_URI      sqlite:///$MLFLOW_DATA_DIR/mlflow.db (SQLite takes one writer at a time;
#                                 use postgresql://... for a team server)
#   MLFLOW_DATA_DIR               ./mlflow-server (made absolute; holds the SQLite file)
#   MLFLOW_ARTIFACTS_DESTINATION  s3://k2pipe/mlflow (clients upload through the server: they need no S3 access)
#   MLFLOW_WORKERS                1
#   MLFLOW_ALLOWED_HOSTS          unset: MLflow's default (localhost); e.g. "mlflow.k2pipe.svc.cluster.local:5000"
# S3 access for the artifacts comes from the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
# AWS_REGION or an instance role) and, for MinIO or moto, MLFLOW_S3_ENDPOINT_URL. Job execution (MLflow 3's
# background job runner) is off: 2 processes instead of 10 and a 6 s start on a small machine.
set -euo pipefail

MLFLOW_HOST="${MLFLOW_HOST:-127.0.0.1}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
MLFLOW_DATA_DIR="${MLFLOW_DATA_DIR:-./mlflow-server}"
MLFLOW_ARTIFACTS_DESTINATION="${MLFLOW_ARTIFACTS_DESTINATION:-s3://k2pipe/mlflow}"
MLFLOW_WORKERS="${MLFLOW_WORKERS:-1}"
MLFLOW_BIN="${MLFLOW_BIN:-mlflow}"

mkdir -p "$MLFLOW_DATA_DIR"
MLFLOW_DATA_DIR="$(cd "$MLFLOW_DATA_DIR" && pwd)"
MLFLOW_BACKEND_STORE_URI="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$MLFLOW_DATA_DIR/mlflow.db}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

case "$MLFLOW_ARTIFACTS_DESTINATION" in
  s3://*) ;;
  *) echo "run_server.sh: MLFLOW_ARTIFACTS_DESTINATION=$MLFLOW_ARTIFACTS_DESTINATION: expected s3://BUCKET/PREFIX" >&2
     exit 2 ;;
esac
if [[ "$MLFLOW_HOST" != "127.0.0.1" && "$MLFLOW_HOST" != "localhost" && -z "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  echo "run_server.sh: MLFLOW_HOST=$MLFLOW_HOST is not loopback; set MLFLOW_ALLOWED_HOSTS to the host:port" \
       "clients use (the server has no authentication: keep it on a private network)" >&2
  exit 2
fi

args=(server
  --host "$MLFLOW_HOST"
  --port "$MLFLOW_PORT"
  --workers "$MLFLOW_WORKERS"
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION")
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi

# The store URI may hold a database password: print it without user information.
shown_store="$(printf '%s' "$MLFLOW_BACKEND_STORE_URI" | sed -E 's#//[^/@]*@#//***@#')"
echo "mlflow server on http://$MLFLOW_HOST:$MLFLOW_PORT (store $shown_store," \
     "artifacts $MLFLOW_ARTIFACTS_DESTINATION)" >&2
exec "$MLFLOW_BIN" "${args[@]}"
