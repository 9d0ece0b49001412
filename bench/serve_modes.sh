#!/usr/bin/env bash
# Serve HTTP throughput of the three layouts (one app per member; one fused app; the fleet in the ingress)
# against in-process scoring,
# at 1, 8 and 32 clients, each on a fresh embedded Ray (loopback only, bounded requests).
#   bash bench/serve_modes.sh FLEET [DATA] [PORT]
set -euo pipefail
FLEET=${1:?fleet directory}
DATA=${2:-digits}
PORT=${3:-8765}
# members: one replica per member (0.25 CPU each); fused: two replicas of the whole fleet (0.75 CPU each)
# behind one ingress replica; embedded: two ingress replicas holding the whole fleet (0.75 CPU each)
MODES=${MODES:-members fused embedded}
for mode in $MODES; do
  case $mode in
    members) flags=${MEMBERS_FLAGS:-"--cpus-per-replica 0.25"} ;;
    fused) flags=${FUSED_FLAGS:-"--replicas 2 --cpus-per-replica 0.75"} ;;
    embedded) flags=${EMBEDDED_FLAGS:-"--replicas 2 --cpus-per-replica 0.75"} ;;
  esac
  simex serve start --fleet "$FLEET" --port "$PORT" --mode "$mode" $flags >"/tmp/simex-serve-$mode.log" 2>&1 &
  server=$!
  for _ in $(seq 1 180); do
    python -c "import requests,sys; sys.exit(requests.get('http://127.0.0.1:$PORT/healthz', timeout=2).status_code != 200)" \
        >/dev/null 2>&1 && break
    kill -0 $server 2>/dev/null || { cat "/tmp/simex-serve-$mode.log"; exit 1; }
    sleep 1
  done
  echo "== --mode $mode $flags"
  python serve/load.py --url "http://127.0.0.1:$PORT" --fleet "$FLEET" --data "$DATA" --requests 200 --seconds 20
  simex serve stop --port "$PORT"
  wait $server || true
done
