"""Reward wire protocol, version 1: rewards served by another process.

A reward server (``alignkit serve-reward NAME``, :mod:`alignkit.reward_server`) scores batches of samples for
a client (``alignkit.rewards.remote:RemoteReward``) over HTTP/1.x with UTF-8 JSON bodies. One request carries one
batch; the answer holds one score per sample, in request order. Any language can implement either side
from this page.

Endpoints
---------
``GET /health``
    ``200 {"status": "ok", "name": "<reward name>", "version": 1}``.

``POST /score``
    Headers ``Content-Type: application/json`` and ``Content-Length`` (chunked bodies are not accepted).
    Body::

        {
          "version": 1,
          "prompts": ["a red cube", "two dogs"],           # B strings, one per sample
          "metadata": [{}, {"tag": "counting"}],          # B JSON objects, one per sample ({} when none)
          "samples": {"kind": "images", "encoding": "png_base64", "data": ["iVBORw0...", "iVBORw0..."]}
        }

Samples
-------
``data`` has one entry per sample (B entries, like ``prompts`` and ``metadata``).

========  ============  =====================================  ===========================================
kind      encoding      one entry of ``data``                  what the served reward receives
========  ============  =====================================  ===========================================
images    png_base64    base64 of an 8-bit RGB PNG (H × W)     float32 tensor ``[B, 3, H, W]`` in [0, 1]
frames    png_base64    list of F such strings, one per frame  float32 tensor ``[B, F, 3, H, W]`` in [0, 1]
text      utf8          a JSON string                          ``list[str]``
========  ============  =====================================  ===========================================

* base64 is the standard alphabet with padding (RFC 4648 §4), without line breaks.
* All images of one request share H and W; all videos share F, H and W (the server stacks them).
* Pixels: a float sample ``x`` in [0, 1] is sent as ``round(clamp(x, 0, 1) * 255)`` (uint8) and handed to
  the reward as ``value / 255``. The round trip of uint8 pixels is exact, so a reward that quantises its input
  the same way (``rewards.common.to_uint8``, as the JPEG rewards do) scores exactly as it would in-process.

Response
--------
``200 {"version": 1, "scores": [-1.52, null, 0.25]}``: B entries, each a finite JSON number or ``null``.
``null`` means "could not score": the trainer masks the sample and counts it, never replaces it. A reward's
NaN or ±inf is sent as ``null`` (JSON has no NaN; non-standard ``NaN``/``Infinity`` tokens are rejected).

Access
------
A server may require a shared secret: the header ``Authorization: Bearer <token>`` on every request (compared
in constant time). A server refuses requests whose ``Host`` header is not one of its names (loopback names, and
the address it was bound to; any name when bound to all interfaces), and browser requests from another site
(an ``Origin`` header other than ``http://<Host>``, or ``Sec-Fetch-Site: cross-site``), so that a web page
cannot reach a reward served on loopback.

Errors
------
Every error body, whatever the status, is ``{"error": "<message naming the field, the value and the fix>"}``
(a reply to ``HEAD`` has no body).

===  ==========================================================================================
400  malformed request: not JSON, JSON nested deeper than the server's limit, a missing or wrongly
     typed field, lengths that disagree, bad base64 or PNG, sizes that differ within the batch, an
     unsupported ``version``
401  the server requires a token and the request has none, or another one
403  a ``Host`` that is not the server's, or a cross-site browser request
404  unknown path (only ``/score`` and ``/health`` exist)
405  a method other than ``GET /health`` or ``POST /score`` (the ``Allow`` header lists the right one)
411  no ``Content-Length``
413  body larger than the server's limit (``--max-request-mb``), an image with more pixels than
     ``--max-image-pixels`` or a request with more than ``--max-request-pixels`` in all (checked from
     the PNG headers, before decoding); send smaller batches
500  the reward raised, or returned the wrong number or type of scores
503  the reward is busy with other requests for longer than the server's ``--timeout``
504  the reward gave no scores within the server's ``--timeout``
===  ==========================================================================================

Clients retry connection errors, timeouts and 5xx with exponential backoff; a 4xx is a bug in the request
and is not retried. A server answers a request of any other ``version`` with 400.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

PROTOCOL_VERSION = 1
TOKEN_ENV = "ALIGNKIT_REWARD_TOKEN"
"""Environment variable holding the shared secret (section Access), read by the server and by the client."""
KIND_IMAGES, KIND_FRAMES, KIND_TEXT = "images", "frames", "text"
ENCODINGS = {KIND_IMAGES: "png_base64", KIND_FRAMES: "png_base64", KIND_TEXT: "utf8"}
"""The one encoding of each sample kind in version 1."""


class ProtocolError(ValueError):
    """A message that breaks the protocol; ``field`` names the offending field (e.g. ``samples.data[3]``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class LimitError(ProtocolError):
    """A well-formed message larger than the receiver accepts (pixels); answered with 413."""


@dataclass
class PixelBudget:
    """Pixel limits of one request, checked from each PNG's header before it is decoded (a small PNG can
    decode to gigabytes: a 230 KB file of 9000 x 9000 pixels is 243 MB of RGB).

    Attributes:
        per_image: most pixels (H x W) of one image or frame.
        total: most pixels of all the images and frames of the request together.
        used: pixels taken so far.
    """

    per_image: int
    total: int
    used: int = 0

    def take(self, width: int, height: int, field: str) -> None:
        pixels = width * height
        if pixels > self.per_image:
            raise LimitError(field, f"{width} x {height} = {pixels} pixels exceeds this server's limit of "
                                    f"{self.per_image} pixels per image (--max-image-pixels); send smaller images")
        self.used += pixels
        if self.used > self.total:
            raise LimitError(field, f"the request's images hold more than this server's limit of {self.total} "
                                    "pixels in all (--max-request-pixels); send smaller batches (RemoteReward "
                                    "max_batch)")


def check_token(token: str, what: str) -> str:
    """``token`` if it can travel in an HTTP header (visible ASCII, no spaces); else ``ValueError`` naming
    ``what`` (never the token)."""
    if not isinstance(token, str) or not token or not all(33 <= ord(c) <= 126 for c in token):
        raise ValueError(f"{what}: the token must be visible ASCII characters without spaces (e.g. the output of "
                         "`python -c 'import secrets; print(secrets.token_urlsafe())'`)")
    return token


# ---------------------------------------------------------------- pixels


def encode_png(image: np.ndarray, compress_level: int = 1) -> str:
    """One uint8 ``[H, W, 3]`` image as base64 PNG (level 1: loopback and LAN favour speed over size)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"encode_png expects a uint8 [H, W, 3] array, got {image.dtype} {tuple(image.shape)}")
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG", compress_level=compress_level)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: Any, field: str, budget: PixelBudget | None = None) -> np.ndarray:
    """A base64 PNG string to a uint8 ``[H, W, 3]`` array; errors name ``field``. With ``budget``, the size in
    the PNG header is checked against it before any pixel is decoded (:class:`LimitError`)."""
    if not isinstance(data, str):
        raise ProtocolError(field, f"expected a base64 PNG string, got {type(data).__name__}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(field, f"not valid base64 ({exc}); use the standard alphabet with padding") from None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.format != "PNG":
                raise ProtocolError(field, f"expected a PNG, got {img.format}")
            if img.mode != "RGB":
                raise ProtocolError(field, f"PNG mode is {img.mode!r}; send 8-bit RGB (mode 'RGB')")
            if budget is not None:
                budget.take(img.width, img.height, field)
            return np.asarray(img, dtype=np.uint8).copy()
    except ProtocolError:
        raise
    except Exception as exc:  # PIL raises several unrelated types for broken files
        raise ProtocolError(field, f"not a readable PNG ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------- samples


@dataclass(frozen=True)
class EncodedSamples:
    """The ``samples`` object of a request.

    Attributes:
        kind: ``images``, ``frames`` or ``text``.
        encoding: ``png_base64`` for images and frames, ``utf8`` for text.
        data: one entry per sample: a base64 PNG (images), a list of them (frames) or a string (text).
    """

    kind: str
    encoding: str
    data: list[Any]

    def __len__(self) -> int:
        return len(self.data)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "encoding": self.encoding, "data": self.data}

    @classmethod
    def from_json(cls, obj: Any, field: str = "samples") -> EncodedSamples:
        """Check the structure (kind, encoding, entry types); pixels are checked by :func:`decode_samples`."""
        if not isinstance(obj, dict):
            raise ProtocolError(field, f"expected an object with kind, encoding and data, got {type(obj).__name__}")
        kind, encoding, data = obj.get("kind"), obj.get("encoding"), obj.get("data")
        if kind not in ENCODINGS:
            raise ProtocolError(f"{field}.kind", f"{kind!r} is not a sample kind; use one of {', '.join(ENCODINGS)}")
        if encoding != ENCODINGS[kind]:
            raise ProtocolError(f"{field}.encoding", f"{encoding!r} is not supported for kind {kind!r}; "
                                                     f"use {ENCODINGS[kind]!r}")
        if not isinstance(data, list):
            raise ProtocolError(f"{field}.data", f"expected a list with one entry per sample, got "
                                                 f"{type(data).__name__}")
        for i, entry in enumerate(data):
            if kind == KIND_FRAMES:
                if not isinstance(entry, list) or not entry:
                    raise ProtocolError(f"{field}.data[{i}]", "expected a non-empty list of base64 PNG frames")
                bad = next((j for j, f in enumerate(entry) if not isinstance(f, str)), None)
                if bad is not None:
                    raise ProtocolError(f"{field}.data[{i}][{bad}]", "expected a base64 PNG string, got "
                                                                     f"{type(entry[bad]).__name__}")
            elif not isinstance(entry, str):
                raise ProtocolError(f"{field}.data[{i}]", f"expected a string, got {type(entry).__name__}")
        return cls(kind, encoding, data)


def encode_images(images: np.ndarray) -> EncodedSamples:
    """uint8 ``[B, H, W, 3]`` images (see ``rewards.common.to_uint8``) as ``images``/``png_base64``."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"encode_images expects uint8 [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    return EncodedSamples(KIND_IMAGES, ENCODINGS[KIND_IMAGES], [encode_png(a) for a in images])


def encode_frames(frames: np.ndarray) -> EncodedSamples:
    """uint8 ``[B, F, H, W, 3]`` videos as ``frames``/``png_base64`` (one PNG per frame)."""
    if frames.dtype != np.uint8 or frames.ndim != 5:
        raise ValueError(f"encode_frames expects uint8 [B, F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    return EncodedSamples(KIND_FRAMES, ENCODINGS[KIND_FRAMES], [[encode_png(f) for f in video] for video in frames])


def encode_text(texts: Sequence[str]) -> EncodedSamples:
    """Strings as ``text``/``utf8``."""
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"encode_text expects strings; entry {bad} is {type(texts[bad]).__name__}")
    return EncodedSamples(KIND_TEXT, ENCODINGS[KIND_TEXT], list(texts))


def _stack(arrays: list[np.ndarray], field: str) -> np.ndarray:
    shape = arrays[0].shape
    for i, a in enumerate(arrays):
        if a.shape != shape:
            raise ProtocolError(f"{field}[{i}]", f"shape {a.shape} differs from {field}[0]'s {shape}; "
                                                 "every sample of a request must have the same size")
    return np.stack(arrays)


def decode_samples(samples: EncodedSamples, field: str = "samples",
                   budget: PixelBudget | None = None) -> np.ndarray | list[str]:
    """Images to uint8 ``[B, H, W, 3]``, frames to uint8 ``[B, F, H, W, 3]``, text to ``list[str]``.

    An empty batch of images or frames decodes to shape ``[0, 0, 0, 3]`` / ``[0, 0, 0, 0, 3]``. With
    ``budget``, every image is checked against the pixel limits before it is decoded.
    """
    data_field = f"{field}.data"
    if samples.kind == KIND_TEXT:
        return list(samples.data)
    if samples.kind == KIND_IMAGES:
        if not samples.data:
            return np.zeros((0, 0, 0, 3), dtype=np.uint8)
        return _stack([decode_png(d, f"{data_field}[{i}]", budget) for i, d in enumerate(samples.data)], data_field)
    if samples.kind == KIND_FRAMES:
        if not samples.data:
            return np.zeros((0, 0, 0, 0, 3), dtype=np.uint8)
        videos = [
            _stack([decode_png(f, f"{data_field}[{i}][{j}]", budget) for j, f in enumerate(video)],
                   f"{data_field}[{i}]")
            for i, video in enumerate(samples.data)
        ]
        return _stack(videos, data_field)
    raise ProtocolError(f"{field}.kind", f"{samples.kind!r} is not a sample kind; use one of {', '.join(ENCODINGS)}")


# ---------------------------------------------------------------- request


@dataclass(frozen=True)
class ScoreRequest:
    """The body of ``POST /score``: B prompts, B metadata objects and B encoded samples."""

    prompts: list[str]
    metadata: list[dict[str, Any]]
    samples: EncodedSamples
    version: int = PROTOCOL_VERSION

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "prompts": self.prompts, "metadata": self.metadata,
                "samples": self.samples.to_json()}

    def to_bytes(self) -> bytes:
        """UTF-8 JSON; raises ``ValueError`` naming the sample whose metadata is not JSON-serialisable."""
        for i, meta in enumerate(self.metadata):
            try:
                json.dumps(meta, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"metadata[{i}] cannot be sent to a reward server: {exc}; keep per-sample "
                                 "metadata to JSON types (str, finite numbers, bool, None, lists, dicts)") from None
        return json.dumps(self.to_json(), allow_nan=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, obj: Any) -> ScoreRequest:
        """Validate a parsed request body; :class:`ProtocolError` names the first bad field."""
        if not isinstance(obj, dict):
            raise ProtocolError("", f"the request body must be a JSON object, got {type(obj).__name__}")
        missing = [k for k in ("version", "prompts", "metadata", "samples") if k not in obj]
        if missing:
            raise ProtocolError(missing[0], f"missing; a request needs version, prompts, metadata and samples "
                                            f"(missing: {', '.join(missing)})")
        version = obj["version"]
        if version != PROTOCOL_VERSION or isinstance(version, bool):
            raise ProtocolError("version", f"{version!r} is not supported; this side speaks protocol version "
                                           f"{PROTOCOL_VERSION}")
        prompts, metadata = obj["prompts"], obj["metadata"]
        if not isinstance(prompts, list):
            raise ProtocolError("prompts", f"expected a list of strings, got {type(prompts).__name__}")
        bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
        if bad is not None:
            raise ProtocolError(f"prompts[{bad}]", f"expected a string, got {type(prompts[bad]).__name__}")
        if not isinstance(metadata, list):
            raise ProtocolError("metadata", f"expected a list of objects, got {type(metadata).__name__}")
        bad = next((i for i, m in enumerate(metadata) if not isinstance(m, dict)), None)
        if bad is not None:
            raise ProtocolError(f"metadata[{bad}]", f"expected an object ({{}} when none), got "
                                                    f"{type(metadata[bad]).__name__}")
        samples = EncodedSamples.from_json(obj["samples"])
        if not len(prompts) == len(metadata) == len(samples):
            raise ProtocolError("samples.data", f"lengths disagree: {len(prompts)} prompts, {len(metadata)} "
                                                f"metadata, {len(samples)} samples; send one of each per sample")
        return cls(prompts=prompts, metadata=metadata, samples=samples, version=version)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}; send null for a sample that cannot be scored")


DEFAULT_MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects accepted in a message; a request needs 4 (frames) plus its metadata's."""


def parse_json(body: bytes | str, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> Any:
    """Strict JSON (no ``NaN``/``Infinity``), nested at most ``max_depth`` arrays / objects deep.

    Raises:
        ValueError: with the reason (``UnicodeDecodeError`` and ``JSONDecodeError`` are value errors).
    """
    try:
        obj = json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than this side's limit of {max_depth} levels") from None
    depth = json_depth(obj)
    if depth > max_depth:
        raise ValueError(f"JSON nested {depth} levels deep exceeds this side's limit of {max_depth}; send flatter "
                         "metadata")
    return obj


def json_depth(obj: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, ``[]`` is 1), without recursion."""
    deepest = 0
    stack = [(obj, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((child, depth) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


# ---------------------------------------------------------------- scores


def check_scores(values: Any, n: int, source: str) -> list[float | None]:
    """Validate ``n`` scores from ``source`` (e.g. ``"reward 'x'"``): each a real number or None.

    Accepts a sequence, a 0/1-d tensor or array (anything with ``tolist``). Non-finite numbers become None.

    Raises:
        ProtocolError: naming ``source``, the count or the offending entry.
    """
    if hasattr(values, "tolist") and not isinstance(values, list):
        values = values.tolist()
        values = [values] if not isinstance(values, list) else values
    if not isinstance(values, (list, tuple)):
        raise ProtocolError("scores", f"{source} returned {type(values).__name__}; expected a list of {n} "
                                      "floats (null/None where a sample cannot be scored)")
    if len(values) != n:
        raise ProtocolError("scores", f"{source} returned {len(values)} scores for {n} samples; "
                                      "expected one per sample")
    out: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
        elif isinstance(v, numbers.Real) and not isinstance(v, bool):
            try:
                f = float(v)
            except OverflowError:
                raise ProtocolError(f"scores[{i}]", f"{source} returned a number too large for a float for sample "
                                                    f"{i}; expected a float, or null when it cannot be scored"
                                    ) from None
            out.append(f if math.isfinite(f) else None)
        else:
            raise ProtocolError(f"scores[{i}]", f"{source} returned {v!r} ({type(v).__name__}) for sample {i}; "
                                                "expected a number, or null when the sample cannot be scored")
    return out


def encode_scores(scores: Sequence[float | None]) -> dict[str, Any]:
    """The ``200`` response body; NaN and ±inf are sent as null."""
    return {"version": PROTOCOL_VERSION,
            "scores": [None if s is None or not math.isfinite(s) else float(s) for s in scores]}


def decode_scores(obj: Any, n: int, source: str) -> list[float | None]:
    """Validate a parsed ``200`` response body of a request with ``n`` samples."""
    if not isinstance(obj, dict):
        raise ProtocolError("", f"{source} answered with {type(obj).__name__}; expected an object with "
                                "version and scores")
    version = obj.get("version")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError("version", f"{source} answered with protocol version {version!r}; this client speaks "
                                       f"version {PROTOCOL_VERSION}")
    if "scores" not in obj:
        raise ProtocolError("scores", f"{source} answered without a scores field (keys: {', '.join(obj)})")
    return check_scores(obj["scores"], n, source)
