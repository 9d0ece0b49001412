"""A client of the scoring service: send images to ``POST /v1/score`` in batches, merge the answers.

Ray-free; what `simex query` runs.
"""

from __future__ import annotations

import io
import json
import logging
import time

import numpy as np

log = logging.getLogger("simex_ray.client")

RETRY_STATUS = (500, 502, 503, 504)  # a replica or node lost mid-request; scoring is idempotent


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
    """Score ``images`` (N, 1, 28, 28) through the service at ``url``: the :class:`ScoreResult` of all N,
    every field of the score contract (the batches' answers merged by
    :func:`~simex_ray.fleet.result.merge_results`: means weighted by batch size, typicality and every
    ranking computed again from the merged values)."""
    from .fleet.result import ScoreResult, merge_results

    if batch < 1:
        raise ValueError(f"batch must be a positive number of images, got {batch}")
    headers = {"content-type": "application/x-npy"}
    if api_key:
        headers["x-api-key"] = api_key
    endpoint = url.rstrip("/") + "/v1/score"
    parts = []
    for start in range(0, len(images), batch):
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
        try:
            parts.append(ScoreResult.from_json(r.json()))
        except ValueError as e:  # an older service without every field, or not a score answer
            raise ConnectionError(f"{endpoint} answered without the score contract ({e}); "
                                  f"is it a simex-ray service of this version?") from None
    if not parts:
        raise ValueError("no images to score")
    return merge_results(parts)
