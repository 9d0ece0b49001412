"""Run independent experiment units (base classifiers, transfers) as Ray tasks."""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import ray

log = logging.getLogger(__name__)


def ray_map(cpus_per_task: float = 1.0, gpus_per_task: float = 0.0, max_retries: int = 2,
            on_unit: Callable[[str, int, int], None] | None = None, stage: str = "units"):
    """A ``map_fn(fn, kwargs_list) -> results`` (in order) backed by Ray tasks.

    Arrays that recur across units (the same dataset split in many transfers)
    are put in the object store once. A task whose worker dies is retried.
    ``on_unit(stage, done, total)`` reports progress as tasks finish.
    """

    def map_fn(fn: Callable[..., Any], kwargs_list: list[dict[str, Any]]) -> list[Any]:
        remote = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_retries=max_retries)(fn)
        stored: dict[int, ray.ObjectRef] = {}

        def put(value):
            if isinstance(value, np.ndarray) and value.nbytes > 4096:
                if id(value) not in stored:
                    stored[id(value)] = ray.put(value)
                return stored[id(value)]
            return value

        refs = [remote.remote(**{k: put(v) for k, v in kw.items()}) for kw in kwargs_list]
        index = {r: i for i, r in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for r in ready:
                results[index[r]] = ray.get(r)
            if on_unit is not None:
                on_unit(fn.__name__, len(refs) - len(pending), len(refs))
        return results

    return map_fn
