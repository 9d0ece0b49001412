"""`simex serve start`: start Serve, deploy a fleet, and (embedded) keep serving it in the foreground,
redeploying when its manifest changes, until Ctrl-C, SIGTERM or `simex serve stop`."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from ray import serve

from ...processes import this_process
from ..runtime import ray_session
from .deploy import ServeSettings, deploy, undeploy


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def serve_fleet(fleet: str, settings: ServeSettings, *, host: str, port: int, address: str | None,
                proxy_location: str, pidfile: Path | None, manifest_stamp: Callable[[], tuple],
                manifest: dict | None = None, stamp: tuple | None = None, grpc_port: int | None = None) -> int:
    """Deploy ``fleet``; with ``address`` return at once, else serve here until stopped.

    ``manifest``: the fleet's manifest as the caller checked it (``verify_fleet``), deployed as it is;
    ``stamp``: ``manifest_stamp()`` taken before that check, so a change after it is redeployed."""
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    t0 = time.perf_counter()
    if stamp is None:
        stamp = manifest_stamp()
    with ray_session(address):
        grpc = {}
        if grpc_port:
            from .grpc_api import SERVICER_FUNCTION

            grpc = {"grpc_options": {"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]}}
        serve.start(proxy_location=proxy_location, http_options={"host": host, "port": port}, **grpc)
        say(f"deploying {fleet} ...")
        deploy(fleet, settings, manifest=manifest)
        say(f"serving {fleet} at {url} ({time.perf_counter() - t0:.0f}s); API docs at {url}/docs"
            + (f"; gRPC simex.Scorer/Score at {host}:{grpc_port}" if grpc_port else ""))
        if address:
            return 0
        if pidfile is not None:
            pidfile.parent.mkdir(parents=True, exist_ok=True)
            pidfile.write_text(this_process().to_text())  # pid and start time: `serve stop` checks both
        stopping = []
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
        say("press Ctrl-C or run `simex serve stop` to stop; the fleet is reloaded when it changes")
        try:
            while not stopping:
                time.sleep(1)
                if (now := manifest_stamp()) != stamp:
                    stamp = now
                    try:
                        changes = deploy(fleet, settings)
                        say(f"fleet changed: {json.dumps(changes)}")
                    except Exception as e:  # noqa: BLE001 - keep serving the old fleet
                        say(f"fleet changed but cannot be served ({e}); still serving the previous one")
        except KeyboardInterrupt:
            pass
        finally:
            say("stopping ...")
            undeploy()
            serve.shutdown()
            if pidfile is not None:
                pidfile.unlink(missing_ok=True)
    return 0
