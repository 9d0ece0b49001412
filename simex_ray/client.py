"""A client of the scoring service: send images to ``POST /v1/score`` in batches, merge the answers.

Ray-free and torch-free; what `simex query` runs.
"""

from __future__ import annotations

import io
import json
import logging
import time

import numpy as np

log = logging.getLogger("simex_ray.client")

RETRY_STATUS = (500, 502, 503, 504)  # a replica or node lost mid-request; scoring is idempotent
# Fields of the answer that are means over images: a dataset's is the batch-size weighted mean of its batches'.
MEAN_FIELDS = ("delta", "delta_normalized", "delta_calibrated", "in_distribution", "composition")


def post(url: str, body: bytes, headers: dict, retries: int):
    """POST, retrying a lost connection or a 5xx up to ``retries`` times (0.5, 1, 2 ... s apart)."""
    import requests

    for attempt in range(retries + 1):
        try:
            r = requests.post(url, data=body, headers=headers, timeout=300)
        except requests.RequestException as e:
            if attempt == retries:
                raise ConnectionError(f"cannot reach {url} ({type(e).__name__}); is `simex serve start` "
                                      f"running?") from None
            why = type(e).__name__
        else:
            if r.status_code not in RETRY_STATUS or attempt == retries:
                return r
            why = f"HTTP {r.status_code}"
        wait = 0.5 * 2 ** attempt
        log.warning("%s from %s; retrying in %.1fs (%d/%d)", why, url, wait, attempt + 1, retries)
        time.sleep(wait)
    raise AssertionError("unreachable")


def query(url: str, images: np.ndarray, *, members: list[str] | None = None, api_key: str | None = None,
          batch: int = 1024, retries: int = 3):
    """Score ``images`` (N, 1, 28, 28) through the service at ``url``: the :class:`ScoreResult` of all N."""
    from .fleet import ScoreResult

    headers = {"content-type": "application/x-npy"}
    if api_key:
        headers["x-api-key"] = api_key
    endpoint = url.rstrip("/") + "/v1/score"
    sums: dict[str, dict[str, float | None]] = {}
    loss, method, n = "", None, len(images)
    for start in range(0, n, batch):
        part = images[start:start + batch]
        if members:
            body = json.dumps({"images": part[:, 0].tolist(), "members": members}).encode()
            h = {**headers, "content-type": "application/json"}
        else:
            buf = io.BytesIO()
            np.save(buf, part)
            body, h = buf.getvalue(), headers
        r = post(endpoint, body, h, retries)
        if r.status_code != 200:
            try:
                message = r.json().get("error", r.text)
            except ValueError:
                message = r.text[:200]
            raise ConnectionError(f"{endpoint} answered {r.status_code}: {message}")
        out = r.json()
        loss, method = out["loss"], out["ranking_method"]
        for field in MEAN_FIELDS:
            acc = sums.setdefault(field, {})
            for name, v in out[field].items():
                acc[name] = None if v is None or acc.get(name, 0.0) is None else acc.get(name, 0.0) + v * len(part)
    mean = {f: {k: (None if v is None else v / n) for k, v in sums.get(f, {}).items()} for f in MEAN_FIELDS}
    return ScoreResult(n=n, loss=loss, delta=mean["delta"], delta_normalized=mean["delta_normalized"],
                       delta_calibrated=mean["delta_calibrated"], in_distribution=mean["in_distribution"],
                       composition=mean["composition"], method=method)
