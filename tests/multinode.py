"""A fault to inject into Ray Train for the multi-node tests (the cluster itself: simex_ray.local_cluster)."""

from __future__ import annotations

import os
import time
from pathlib import Path



class SlowOnce:
    """Put in a Train run's config: the first time a Train worker unpickles it while Ray Train
    launches the training function (``run_train_fn``), it writes its pid to ``marker`` and
    sleeps, holding the worker in that step; later unpickles are instant.

    Lets a test lose a node at exactly that moment (deterministically, not by luck of timing).
    """

    def __init__(self, marker: str, sleep_s: float = 60):
        self.marker, self.sleep_s = marker, sleep_s

    def __reduce__(self):
        return _slow_once, (self.marker, self.sleep_s)


def _slow_once(marker: str, sleep_s: float) -> SlowOnce:
    import traceback

    if any(f.name == "run_train_fn" for f in traceback.extract_stack()) and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        time.sleep(sleep_s)
    return SlowOnce(marker, sleep_s)
