"""Start or join Ray once; shut down only what we started."""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None, log_to_driver: bool = False):
    """Use the running Ray, join ``address``, or start an embedded local Ray.

    An embedded instance is shut down on exit; a joined or pre-existing one
    is left running.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    # Fleet members are many small actors on few cores: let them start together
    # (and keep the raylet from warning that they do).
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", "16")
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_QuietTokenNotice())
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=logging.WARNING)
    else:
        log.info("starting an embedded local Ray (no --address given)")
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=log_to_driver, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()


class _QuietTokenNotice(logging.Filter):
    """Token auth is right for clusters; its notice only clutters a local CLI run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled" not in record.getMessage()
