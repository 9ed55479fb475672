#!/usr/bin/env bash
# A multi-node Ray cluster on this one machine, for fault tests: the head on a bridge at 198.18.N.1, the S3
# server in a namespace of its own, each worker node in its own network namespace (root and iproute2).
#
#   sudo infra/local/cluster.sh up [--nodes 3] [--net 0]
#   eval "$(infra/local/cluster.sh env)"          # RAY_ADDRESS, the S3 endpoint, MLFLOW_TRACKING_URI, ...
#   sudo infra/local/cluster.sh kill n2           # every process of node n2, SIGKILL
#   sudo infra/local/cluster.sh restart n2        # the node comes back
#   sudo infra/local/cluster.sh cut n2 | heal n2  # its link down / up (cut s3: S3 unreachable from all)
#   infra/local/cluster.sh status
#   sudo infra/local/cluster.sh down              # stops what `up` started, by process id; removes the links
#
# The logic lives in netcluster.py beside this script (the tests and benchmarks/faults.py import it).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${K2PIPE_PYTHON:-$HERE/../../.venv/bin/python}"
[[ -x "$PY" ]] || { echo "cluster.sh: no Python at $PY; run 'make install' first or set K2PIPE_PYTHON" >&2; exit 1; }
exec "$PY" "$HERE/netcluster.py" "$@"
