#!/usr/bin/env bash
# Print deploy/rayservice.yaml with its serveConfigV2 generated for your fleet by
# `simex serve config --format kuberay` (everything else in the manifest is kept as it is):
#
#   SIMEX_API_KEY=... deploy/make_rayservice.sh FLEET_DIR [simex serve config flags...] > rayservice.yaml
#   kubectl apply -f rayservice.yaml
#
# FLEET_DIR is a local copy of the fleet (its manifest.json is enough); the config points the replicas at
# $FLEET_PATH on the cluster (default /mnt/shared/simex/main/fleet, where deploy/rayjob.yaml writes it).
# Extra flags go to `simex serve config`, e.g. --device cuda --gpus-per-replica 0.25 --mode fused.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fleet=${1:?usage: SIMEX_API_KEY=... $0 FLEET_DIR [simex serve config flags...]}
shift
: "${SIMEX_API_KEY:?set SIMEX_API_KEY: the service is reachable from the cluster network}"
"${PYTHON:-python3}" -m simex_ray.cli serve config --format kuberay --fleet "$fleet" \
    --fleet-path "${FLEET_PATH:-/mnt/shared/simex/main/fleet}" --api-key "$SIMEX_API_KEY" "$@" \
  | "${PYTHON:-python3}" -c '
import sys
begin, end = "# >>> serveConfigV2", "# <<< serveConfigV2"
template = open(sys.argv[1]).read().splitlines(keepends=True)
marks = [i for i, line in enumerate(template) if line.strip().startswith((begin, end))]
if len(marks) != 2:
    sys.exit(f"{sys.argv[1]}: expected one {begin!r} and one {end!r} line")
block = sys.stdin.read()
if not block.startswith("serveConfigV2: |"):
    sys.exit("simex serve config printed no serveConfigV2")
indent = template[marks[0]][: len(template[marks[0]]) - len(template[marks[0]].lstrip())]
body = "".join(indent + line if line.strip() else line for line in block.splitlines(keepends=True))
sys.stdout.write("".join(template[: marks[0] + 1]) + body + "".join(template[marks[1]:]))
' "$here/rayservice.yaml"
