#!/usr/bin/env bash
# cluster/local/down.sh
# Stops the loopback cluster cluster/local/up.sh started: its processes by id (never `ray stop`, which would stop
# every Ray on the machine), then removes its temp dirs. The state file is $VAEPIPE_CLUSTER_STATE
# (default /tmp/vaepipe-loopback.json).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$(command -v python)}"
[ -x "$here/../../.venv/bin/python" ] && python="${PYTHON:-$here/../../.venv/bin/python}"
exec "$python" "$here/loopback.py" down "$@"
