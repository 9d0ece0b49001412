"""The scoring HTTP API's request rules, free of Ray and of any web framework.

Every rule a request can break maps to one :class:`ApiError` with a 4xx
status and a one-line message, so the service never answers 500 for bad input.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from .data import SpecError, to_unit_images
from .errors import one_line

JSON = "application/json"
NPY = "application/x-npy"


class ApiError(Exception):
    """A client mistake: HTTP ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message

    def to_json(self) -> dict[str, Any]:
        return {"error": self.message, "status": self.status}


@dataclass(frozen=True)
class Limits:
    max_images: int = 4096  # images per request
    max_body_bytes: int = 64 * 1024 * 1024  # a JSON batch of 4096 images is ~25 MB


def key_digest(key: str) -> str:
    """What the service stores instead of the key (it shows up in Serve's config)."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_api_key(expected_digest: str | None, provided: str | None) -> None:
    if expected_digest and not hmac.compare_digest(expected_digest, key_digest(provided or "")):
        raise ApiError(401, "missing or wrong API key; send it in the X-API-Key header")


def check_body_size(length: int | None, limits: Limits) -> None:
    if length is not None and length > limits.max_body_bytes:
        raise ApiError(413, f"request body of {length} bytes is over the limit of {limits.max_body_bytes}; "
                            f"send fewer images per request")


def parse_score_request(body: bytes, content_type: str | None, limits: Limits = Limits()
                        ) -> tuple[np.ndarray, list[str] | None]:
    """Body -> (images float32 (N, 1, 28, 28) in [0, 1], requested members or None)."""
    raw, payload = read_payload(body, content_type, limits)
    members = payload.get("members")
    if members is not None and (not isinstance(members, list) or not all(isinstance(m, str) for m in members)):
        raise ApiError(422, '"members" must be a list of member names')
    return validate_images(raw, limits), members


def parse_select_request(body: bytes, content_type: str | None, limits: Limits = Limits()
                         ) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """Body of ``POST /v1/select`` -> (images, labels (N,) int or None, methods or None).

    Labels (needed by the label-using estimators) and methods come in a JSON body; an .npy body is
    images only."""
    raw, payload = read_payload(body, content_type, limits)
    x = validate_images(raw, limits)
    labels = payload.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            raise ApiError(422, '"labels" must be a list of integer class labels, one per image')
        if len(labels) != len(x):
            raise ApiError(422, f'"labels" has {len(labels)} entries for {len(x)} images; give one per image')
        labels = np.asarray(labels, dtype=np.int64)
    methods = payload.get("methods")
    if methods is not None and (not isinstance(methods, list) or not methods
                                or not all(isinstance(m, str) for m in methods)):
        raise ApiError(422, '"methods" must be a non-empty list of method names')
    return x, labels, methods


def read_payload(body: bytes, content_type: str | None, limits: Limits) -> tuple[Any, dict[str, Any]]:
    """(the raw images, the rest of a JSON body) of a request; an .npy body has no rest."""
    check_body_size(len(body), limits)
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == NPY:
        try:
            return np.load(io.BytesIO(body), allow_pickle=False), {}
        except Exception as e:  # noqa: BLE001 - any parse failure is the client's
            raise ApiError(400, f"body is not a valid .npy array ({type(e).__name__}); "
                                f"write it with numpy.save") from None
    if kind != JSON:
        raise ApiError(415, f"unsupported content type '{kind or 'none'}'; use {JSON} or {NPY}")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, or an integer over 4300 digits
        raise ApiError(400, f"malformed JSON: {one_line(e, limit=200)}") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply") from None
    if not isinstance(payload, dict) or "images" not in payload:
        raise ApiError(422, 'JSON body must be an object with an "images" field')
    raw = payload.pop("images")
    if not isinstance(raw, list):
        raise ApiError(422, '"images" must be a nested list of shape (N,28,28) or (N,1,28,28)')
    try:
        raw = np.array(raw)
    except (ValueError, RecursionError):
        raise ApiError(422, '"images" is ragged; every image must be 28x28') from None
    return raw, payload


def validate_images(raw: np.ndarray, limits: Limits = Limits()) -> np.ndarray:
    """Strict shape (N,28,28) or (N,1,28,28), numeric, finite, in range -> float32 (N, 1, 28, 28)."""
    if raw.dtype == object or raw.dtype.kind not in "uif":
        raise ApiError(422, f"images must be numbers (uint8 0..255 or float in [0,1]), got dtype {raw.dtype}")
    shape = tuple(raw.shape)
    if raw.size == 0:
        raise ApiError(422, "empty batch: send at least one image")
    if not (len(shape) == 3 and shape[1:] == (28, 28)) and not (len(shape) == 4 and shape[1:] == (1, 28, 28)):
        raise ApiError(422, f"images must have shape (N,28,28) or (N,1,28,28), got {shape}")
    if shape[0] == 0:
        raise ApiError(422, "empty batch: send at least one image")
    if shape[0] > limits.max_images:
        raise ApiError(413, f"{shape[0]} images is over the limit of {limits.max_images} per request; split the batch")
    try:
        return to_unit_images(raw.reshape(-1, 28, 28))
    except SpecError as e:
        raise ApiError(422, str(e)) from None


def select_members(requested: list[str] | None, available: list[str]) -> list[str]:
    if requested is None:
        return list(available)
    if not requested:
        raise ApiError(422, '"members" is empty; leave it out to use every member')
    unknown = [m for m in requested if m not in available]
    if unknown:
        raise ApiError(404, f"unknown member(s) {', '.join(unknown)}; available: {', '.join(available)}")
    return list(dict.fromkeys(requested))


# What POST /v1/score answers beyond the score contract (SCORE_FIELDS): (type, default, description).
RESPONSE_EXTRAS: dict[str, tuple[Any, Any, str]] = {
    "latency_ms": (float, ..., "time spent in the service"),
    "per_sample": (dict[str, Any] | None, None, "with ?per_sample=true: δ per member and the nearest member, "
                                                "per image"),
}


def score_response_model():
    """The pydantic model of POST /v1/score's answer, built from the score contract
    (:data:`~simex_ray.fleet.result.SCORE_CONTRACT`: every field, its type and description) and
    :data:`RESPONSE_EXTRAS`, so the HTTP answer cannot drop a field ``simex score --json`` has."""
    from pydantic import Field, create_model

    from .fleet.result import SCORE_CONTRACT

    fields = {key: (kind, Field(description=text)) for key, (kind, _, text) in SCORE_CONTRACT.items()}
    fields.update({key: (kind, Field(default, description=text))
                   for key, (kind, default, text) in RESPONSE_EXTRAS.items()})
    return create_model("ScoreResponse", **fields)


def score_response(per_sample: np.ndarray, members: list[dict[str, Any]], loss: str, latency_ms: float, *,
                   method: str | None = None, with_samples: bool = False) -> dict[str, Any]:
    """The response of POST /v1/score: the same fields as `simex score --json` (every Δ, ranking and the
    composition), from the (members, N) per-sample δ and the members' manifest records; with
    ``with_samples`` also ``per_sample``: δ per member and the nearest member of every image."""
    from .fleet import DEFAULT_RANKING, Member, score_result

    records = [Member.from_json(m) for m in members]
    result = score_result(per_sample, records, loss, method or DEFAULT_RANKING, keep_per_sample=with_samples)
    out = {**result.to_json(), "latency_ms": latency_ms}
    if with_samples:
        out["per_sample"] = {"delta": {m.name: row.tolist() for m, row in zip(records, result.per_sample)},
                             "nearest": result.nearest,
                             f"nearest_{result.method}": result.nearest_score.tolist()}
    return out


def parse_ranking(value: str | None) -> str | None:
    from .fleet import RANKINGS

    if value is None or value in RANKINGS:
        return value
    raise ApiError(422, f"unknown ranking '{value}'; known: {', '.join(RANKINGS)}")


def parse_flag(value: str | None, name: str) -> bool:
    if value is None or value.lower() in ("0", "false", "no", ""):
        return False
    if value.lower() in ("1", "true", "yes"):
        return True
    raise ApiError(422, f"{name} must be true or false, got '{value}'")
