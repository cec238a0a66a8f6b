#!/usr/bin/env bash
# cluster/local/up.sh [--workers N] [--worker-cpus C] [--head-cpus C]
# A Ray head and N worker nodes (default 2) on this machine, every process bound to 127.0.0.1, each node with its own
# logical CPUs, a custom resource node_<name> and the label vaepipe-node=<name>. Stop it with cluster/local/down.sh.
#   RAY_AUTH_MODE=disabled cluster/local/up.sh      # no token (loopback only); default: Ray's token auth
#   export RAY_ADDRESS=127.0.0.1:PORT               # printed by up.sh: `vaepipe run` then uses this cluster
#   vaepipe submit configs/demo.yaml --address http://127.0.0.1:PORT --no-pip
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$(command -v python)}"
[ -x "$here/../../.venv/bin/python" ] && python="${PYTHON:-$here/../../.venv/bin/python}"
exec "$python" "$here/loopback.py" up "$@"
