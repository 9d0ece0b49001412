"""A client of the scoring service: send images to ``POST /v1/score`` in batches, merge the answers.

The service takes images in its fleet's format (``GET /v1/members`` names it: :func:`fleet_format`):
arrays already in that format (:func:`query`), or image files it converts by the rule
(:func:`query_files`). Ray-free; what `simex query` runs.
"""

from __future__ import annotations

import io
import json
import logging
import mimetypes
import os
import pathlib
import time
from typing import Iterable, Iterator

import numpy as np

from .formats import LEGACY, ImageFormat
from .errors import UserError

log = logging.getLogger("simex_ray.client")

RETRY_STATUS = (500, 502, 503, 504)  # a replica or node lost mid-request; scoring is idempotent


def send(method: str, url: str, body: bytes | None, headers: dict, retries: int):
    """One request, retrying a lost connection or a 5xx up to ``retries`` times (0.5, 1, 2 ... s apart)."""
    import requests

    for attempt in range(retries + 1):
        try:
            r = requests.request(method, url, data=body, headers=headers, timeout=300)
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


def post(url: str, body: bytes, headers: dict, retries: int):
    """POST with :func:`send`'s retries."""
    return send("POST", url, body, headers, retries)


def _error(url: str, r) -> ConnectionError:
    try:
        message = r.json().get("error", r.text)
    except (ValueError, AttributeError):
        message = r.text[:200]
    return ConnectionError(f"{url} answered {r.status_code}: {message}")


def _headers(api_key: str | None, content_type: str | None = None) -> dict:
    return {**({"content-type": content_type} if content_type else {}), **({"x-api-key": api_key} if api_key else {})}


def fleet_format(url: str, *, api_key: str | None = None, retries: int = 3) -> ImageFormat:
    """The image format the service's fleet takes (``GET /v1/members``); 1x28x28 for a service from
    before formats, which does not say."""
    endpoint = url.rstrip("/") + "/v1/members"
    r = send("GET", endpoint, None, _headers(api_key), retries)
    if r.status_code != 200:
        raise _error(endpoint, r)
    try:
        return ImageFormat.parse(r.json().get("image_format") or LEGACY)
    except (ValueError, AttributeError) as e:  # not JSON, or not an object, or a bad format
        raise ConnectionError(f"{endpoint} answered without the fleet's members ({e}); is it a simex-ray "
                              f"service?") from None


def encode_files(files: Iterable[tuple[str, bytes]], members: list[str] | None = None) -> tuple[bytes, str]:
    """(body, content type) of a ``multipart/form-data`` request: one ``images`` file field per
    (name, bytes), and ``members`` comma-separated."""
    import requests

    parts = [("images", (name, content, mimetypes.guess_type(name)[0] or "application/octet-stream"))
             for name, content in files]
    prepared = requests.Request("POST", "http://localhost/", files=parts,
                                data={"members": ",".join(members)} if members else None).prepare()
    return prepared.body, prepared.headers["Content-Type"]


def _array_bodies(images: np.ndarray, members: list[str] | None, batch: int) -> Iterator[tuple[bytes, str]]:
    for start in range(0, len(images), batch):
        part = images[start:start + batch]
        if members:
            yield json.dumps({"images": part.tolist(), "members": members}).encode(), "application/json"
        else:
            buf = io.BytesIO()
            np.save(buf, part)
            yield buf.getvalue(), "application/x-npy"


def _score(url: str, bodies: Iterable[tuple[bytes, str]], api_key: str | None, retries: int,
           params: str = ""):
    """POST every (body, content type) to /v1/score and merge the answers into one ScoreResult."""
    from .fleet.result import ScoreResult, merge_results

    endpoint = url.rstrip("/") + "/v1/score"
    parts = []
    for body, content_type in bodies:
        r = post(endpoint + params, body, _headers(api_key, content_type), retries)
        if r.status_code != 200:
            raise _error(endpoint, r)
        try:
            parts.append(ScoreResult.from_json(r.json()))
        except ValueError as e:  # an older service without every field, or not a score answer
            raise ConnectionError(f"{endpoint} answered without the score contract ({e}); "
                                  f"is it a simex-ray service of this version?") from None
    if not parts:
        raise UserError("no images to score")
    return merge_results(parts)


def query(url: str, images: np.ndarray, *, members: list[str] | None = None, api_key: str | None = None,
          batch: int = 1024, retries: int = 3):
    """Score ``images`` (N, C, H, W) float in [0, 1], in the fleet's format (:func:`fleet_format`), through
    the service at ``url``: the :class:`ScoreResult` of all N, every field of the score contract (the
    batches' answers merged by :func:`~simex_ray.fleet.result.merge_results`: means weighted by batch
    size, typicality and every ranking computed again from the merged values)."""
    if batch < 1:
        raise UserError(f"batch must be a positive number of images, got {batch}")
    return _score(url, _array_bodies(images, members, batch), api_key, retries)


def query_files(url: str, paths: list[str | os.PathLike], *, members: list[str] | None = None,
                api_key: str | None = None, batch: int = 1024, retries: int = 3, strict: bool = False):
    """Score image files (PNG, JPEG, ...) through the service at ``url``, sent as they are
    (``multipart/form-data``, ``batch`` files per request): the service decodes them and converts each
    to its fleet's format by the rule (``strict``: refuses instead). Merged as in :func:`query`."""
    if batch < 1:
        raise UserError(f"batch must be a positive number of images, got {batch}")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"no image file '{p}'")

    def bodies():
        for start in range(0, len(paths), batch):
            chunk = paths[start:start + batch]
            yield encode_files([(os.path.basename(p), pathlib.Path(p).read_bytes()) for p in chunk], members)

    return _score(url, bodies(), api_key, retries, "?strict_format=true" if strict else "")
