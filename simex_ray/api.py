"""The scoring HTTP API's request rules, free of Ray and of any web framework.

Every rule a request can break maps to one :class:`ApiError` with a 4xx
status and a one-line message, so the service never answers 500 for bad input.

Images come in the served fleet's format (:class:`~simex_ray.formats.ImageFormat`, C×H×W):

* an **array** (a JSON ``images`` list or an ``.npy`` body) must already be in it, as (N,C,H,W), as
  (N,H,W,C) the way image libraries write it, or (N,H,W) when C is 1; it is never resampled, and
  any other shape is a 422 that names the shapes expected (an array of another size is more often a
  mistake, e.g. swapped axes, than a wish to resample);
* **image files** (``multipart/form-data``, PNG/JPEG/...) are decoded with Pillow's decompression-bomb
  guard on and converted by the one rule of :mod:`simex_ray.formats` (``strict``: refused instead).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .data import SpecError, decode_image, to_unit_images
from .errors import UnknownMemberError, check_members, clip, one_line, squash
from .formats import LEGACY, ImageFormat, conversion, convert, format_of

JSON = "application/json"
NPY = "application/x-npy"
MULTIPART = "multipart/form-data"


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
    # An uploaded file decodes to at most this many pixels (a 4096x4096 photo; ~200 MB as float RGB):
    # a small, highly compressed PNG can declare a huge image.
    max_image_pixels: int = 4096 * 4096


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


JSON_SLACK = 1 << 16  # commas a request may hold besides its images' (members, other fields)


def check_json_numbers(body: bytes, limits: Limits, fmt: ImageFormat) -> None:
    """Refuse a JSON body holding more numbers than ``limits.max_images`` images of ``fmt``, before parsing it.

    In a JSON array every two elements are separated by one comma, so a nested list of n numbers has exactly
    n - 1 commas: counting them (one pass over the bytes, no objects built) bounds what ``json.loads`` and
    ``numpy.array`` would build. Measured on a 62 MB body of 40,000 images: refused in milliseconds, where
    parsing it first took 8.3 s of CPU and 424 MiB (docs/results.md, "Request limits")."""
    allowed = limits.max_images * fmt.pixels + JSON_SLACK
    if body.count(b",") > allowed:
        raise ApiError(413, f"the JSON body holds more numbers than {limits.max_images} images of {fmt} "
                            f"(the limit per request); send fewer images per request")


def parse_score_request(body: bytes, content_type: str | None, limits: Limits = Limits(),
                        fmt: ImageFormat = LEGACY, *, strict: bool = False
                        ) -> tuple[np.ndarray, list[str] | None, str | None]:
    """Body -> (images float32 (N, C, H, W) in [0, 1] in ``fmt``, requested members or None, what the conversion
    rule did to them or None: the answer's ``conversion``).

    ``strict``: refuse image files not in ``fmt`` instead of converting them (arrays never are)."""
    x, payload, converted = read_images(body, content_type, limits, fmt, strict=strict)
    members = payload.get("members")
    if members is not None and (not isinstance(members, list) or not all(isinstance(m, str) for m in members)):
        raise ApiError(422, '"members" must be a list of member names')
    return x, members, converted


def parse_select_request(body: bytes, content_type: str | None, limits: Limits = Limits(),
                         fmt: ImageFormat = LEGACY, *, strict: bool = False
                         ) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """Body of ``POST /v1/select`` -> (images, labels (N,) int or None, methods or None).

    Labels (needed by the label-using estimators) and methods come in a JSON body; an .npy or
    multipart body is images only."""
    x, payload, _ = read_images(body, content_type, limits, fmt, strict=strict)
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


def content_kind(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def read_images(body: bytes, content_type: str | None, limits: Limits, fmt: ImageFormat = LEGACY, *,
                strict: bool = False) -> tuple[np.ndarray, dict[str, Any], str | None]:
    """(the images float32 (N, C, H, W) in ``fmt``, the rest of the body, what the conversion rule did to them
    or None) of a request.

    JSON: the ``images`` array and the other fields; .npy: the array, no rest; multipart: every file
    part decoded and converted, and the text fields (a ``members`` field: names, comma-separated or
    repeated)."""
    if content_kind(content_type) == MULTIPART:
        check_body_size(len(body), limits)
        files, fields = parse_multipart(body, content_type or "")
        payload: dict[str, Any] = {}
        if "members" in fields:
            payload["members"] = [m.strip() for v in fields["members"] for m in v.split(",") if m.strip()]
        x, converted = decode_files(files, limits, fmt, strict=strict)
        return x, payload, converted
    raw, payload = read_payload(body, content_type, limits, fmt)
    return validate_images(raw, limits, fmt), payload, None  # arrays come in the fleet's format, or are refused


def read_payload(body: bytes, content_type: str | None, limits: Limits, fmt: ImageFormat = LEGACY
                 ) -> tuple[Any, dict[str, Any]]:
    """(the raw image array, the rest of a JSON body) of a JSON or .npy request; an .npy body has no rest."""
    check_body_size(len(body), limits)
    kind = content_kind(content_type)
    if kind == NPY:
        try:
            return np.load(io.BytesIO(body), allow_pickle=False), {}
        except Exception as e:  # noqa: BLE001 - any parse failure is the client's
            raise ApiError(400, f"body is not a valid .npy array ({type(e).__name__}); "
                                f"write it with numpy.save") from None
    if kind != JSON:
        raise ApiError(415, f"unsupported content type '{kind or 'none'}'; use {JSON}, {NPY} or {MULTIPART} "
                            f"(image files)")
    check_json_numbers(body, limits, fmt)
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
        raise ApiError(422, f'"images" must be a nested list of shape {expected_shapes(fmt)}')
    try:
        raw = np.array(raw)
    except (ValueError, RecursionError):
        raise ApiError(422, f'"images" is ragged; every image must be {fmt.height}x{fmt.width} '
                            f'(shape {expected_shapes(fmt)})') from None
    return raw, payload


def array_shapes(fmt: ImageFormat) -> list[tuple[str, ...]]:
    """The shapes an image array in ``fmt`` may have, N first: (N,C,H,W), (N,H,W,C), and (N,H,W) for grey."""
    c, h, w = (str(v) for v in fmt.shape)
    return [("N", c, h, w), ("N", h, w, c)] + ([("N", h, w)] if fmt.channels == 1 else [])


def expected_shapes(fmt: ImageFormat) -> str:
    """``"(N,3,32,32) or (N,32,32,3)"``: the array shapes ``fmt`` accepts, for messages and the API docs."""
    shapes = ["(" + ",".join(s) + ")" for s in array_shapes(fmt)]
    return ", ".join(shapes[:-1]) + " or " + shapes[-1]


def to_nchw(shape: tuple[int, ...], fmt: ImageFormat) -> tuple[int, ...] | None:
    """The axis order that makes an array of ``shape`` (N,C,H,W) in ``fmt``; None when it is not in ``fmt``.
    (N,C,H,W) wins when a shape reads both ways (C = H = W)."""
    c, h, w = fmt.shape
    if len(shape) == 4 and shape[1:] == (c, h, w):
        return (0, 1, 2, 3)
    if len(shape) == 4 and shape[1:] == (h, w, c):
        return (0, 3, 1, 2)
    if len(shape) == 3 and c == 1 and shape[1:] == (h, w):
        return ()  # grey (N,H,W): a channel axis is added
    return None


def validate_images(raw: np.ndarray, limits: Limits = Limits(), fmt: ImageFormat = LEGACY) -> np.ndarray:
    """Strict shape in ``fmt`` (see :func:`array_shapes`), numeric, finite, in range -> float32 (N, C, H, W).

    Never resampled: another shape is a 422 naming the expected ones."""
    if raw.dtype == object or raw.dtype.kind not in "uif":
        raise ApiError(422, f"images must be numbers (uint8 0..255 or float in [0,1]), got dtype {raw.dtype}")
    shape = tuple(raw.shape)
    if raw.size == 0:
        raise ApiError(422, "empty batch: send at least one image")
    order = to_nchw(shape, fmt)
    if order is None:
        raise ApiError(422, f"images must have shape {expected_shapes(fmt)} for this fleet ({fmt}), got {shape}; "
                            f"arrays are not resampled: send image files as {MULTIPART} to have them converted")
    if shape[0] > limits.max_images:
        raise ApiError(413, f"{shape[0]} images is over the limit of {limits.max_images} per request; split the batch")
    a = raw.transpose(order) if order else raw[:, None]  # (N, C, H, W)
    try:  # one grey plane per channel: to_unit_images checks values and scales, the layout is ours
        x = to_unit_images(a.reshape(-1, fmt.height, fmt.width), fmt=None)
    except SpecError as e:
        raise ApiError(422, str(e)) from None
    return x.reshape(len(a), *fmt.shape)


def parse_multipart(body: bytes, content_type: str) -> tuple[list[tuple[str, bytes]], dict[str, list[str]]]:
    """A ``multipart/form-data`` body -> ([(file name, bytes)] of every file part in order, {field: [values]}
    of the text parts). Parsed in memory: the body is already within the size limit."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, f"{MULTIPART} body without a boundary in its content type")
    files: list[tuple[str, bytes]] = []
    fields: dict[str, list[str]] = {}
    part: dict[str, Any] = {}
    header = {"name": b"", "value": b""}
    ended = []

    def on_part_begin():
        part.clear()
        part.update(disposition=b"", data=[])

    def on_header_end():
        if header["name"].lower() == b"content-disposition":
            part["disposition"] = header["value"]
        header.update(name=b"", value=b"")

    def on_part_end():
        _, options = parse_options_header(part["disposition"])
        data = b"".join(part["data"])
        if b"filename" in options:
            name = clip(squash(options[b"filename"].decode("utf-8", "replace")), 80)
            if name or data:  # a form's file input left empty sends a nameless, empty part
                files.append((name or f"file {len(files) + 1}", data))
        elif b"name" in options:
            fields.setdefault(options[b"name"].decode("utf-8", "replace"), []).append(data.decode("utf-8", "replace"))

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_part_data": lambda data, start, end: part["data"].append(data[start:end]),
        "on_part_end": on_part_end,
        "on_header_field": lambda data, start, end: header.update(name=header["name"] + data[start:end]),
        "on_header_value": lambda data, start, end: header.update(value=header["value"] + data[start:end]),
        "on_header_end": on_header_end,
        "on_end": lambda: ended.append(True),
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except Exception as e:  # noqa: BLE001 - any parse failure is the client's
        raise ApiError(400, f"malformed {MULTIPART} body ({type(e).__name__}: {one_line(e, limit=120)})") from None
    if not ended:
        raise ApiError(400, f"malformed {MULTIPART} body: it ends before its closing boundary")
    return files, fields


def declared_pixels(content: bytes) -> tuple[float, str] | None:
    """(pixels, ``"WxH"``) an image file declares, read from its header with nothing decoded; None when
    Pillow cannot open it (decode_image then says why)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(content)) as im:
                w, h = im.size
                return w * h, f"{w}x{h}"
    except Image.DecompressionBombError:  # over twice Pillow's own limit
        return float("inf"), "larger than Pillow opens"
    except Exception:  # noqa: BLE001 - not an image: decode_image reports it
        return None


def decode_files(files: list[tuple[str, bytes]], limits: Limits, fmt: ImageFormat, *, strict: bool = False
                 ) -> tuple[np.ndarray, str | None]:
    """Image files -> (float32 (N, C, H, W) in ``fmt``, what the rule did to them or None): each decoded (Pillow,
    bomb guard on) and converted by the rule of :mod:`simex_ray.formats` (``strict``: refused instead)."""
    if not files:
        raise ApiError(422, f"no image files in the {MULTIPART} body; send one or more file fields "
                            f"(e.g. curl -F images=@a.png)")
    if len(files) > limits.max_images:
        raise ApiError(413, f"{len(files)} images is over the limit of {limits.max_images} per request; "
                            f"split the batch")
    out, steps = [], {}
    for name, content in files:
        where = f"file '{name}'"
        declared = declared_pixels(content)
        if declared is not None and declared[0] > limits.max_image_pixels:
            raise ApiError(413, f"{where} is {declared[1]} pixels, over the limit of {limits.max_image_pixels} "
                                f"per image; resize it before sending")
        try:
            x = decode_image(content, where)  # (1, C, H, W) at the file's own format
        except SpecError as e:
            raise ApiError(422, str(e)) from None
        native = format_of(x)
        step = conversion(native, fmt)
        if strict and step:
            raise ApiError(422, f"{where} is {native} but the fleet takes {fmt}; convert it yourself, or "
                                f"leave out strict_format=true to apply the rule ({step})")
        if step:
            steps[step] = steps.get(step, 0) + 1
        out.append(convert(x, fmt, name=where))
    converted = "; ".join(f"{step} ({k} of {len(files)} files)" for step, k in steps.items()) or None
    return np.concatenate(out), converted


def select_members(requested: list[str] | None, available: list[str]) -> list[str]:
    if requested is None:
        return list(available)
    if not requested:
        raise ApiError(422, '"members" is empty; leave it out to use every member')
    try:
        check_members(requested, available)
    except UnknownMemberError as e:
        raise ApiError(404, str(e)) from None
    return list(dict.fromkeys(requested))


# What POST /v1/score answers beyond the score contract (SCORE_FIELDS): (type, default, description).
RESPONSE_EXTRAS: dict[str, tuple[Any, Any, str]] = {
    "image_format": (str, ..., "CxHxW: the fleet's format, the one the images were scored in (as `simex score "
                               "--json` and `simex query --json` say)"),
    "conversion": (str | None, None, "what the conversion rule did to the images (here: the request's image files "
                                     "not in the fleet's format), as `simex score --json` says it of its data; null "
                                     "when nothing"),
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
                   method: str | None = None, with_samples: bool = False, image_format: ImageFormat = LEGACY,
                   converted: str | None = None) -> dict[str, Any]:
    """The response of POST /v1/score: the same fields as `simex score --json` (every Δ, ranking and the
    composition), from the scorers' per-sample values and the members' manifest records; with
    ``with_samples`` also ``per_sample``: δ per member and the nearest member of every image.

    ``per_sample``: (members, 2, N), δ and the latent distance z (:meth:`Fleet.per_sample
    <simex_ray.fleet.Fleet.per_sample>`), or (members, N) δ alone (scorers of an older version: no z)."""
    from .fleet import Member, score_result

    records = [Member.from_json(m) for m in members]
    both = np.asarray(per_sample)
    d, z = (both[:, 0], both[:, 1]) if both.ndim == 3 else (both, None)
    result = score_result(d, records, loss, method, keep_per_sample=with_samples, latent=z)
    out = {**result.to_json(), "image_format": str(image_format), "conversion": converted,
           "latency_ms": latency_ms}
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
