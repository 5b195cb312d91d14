"""A reward scored by another process over HTTP (protocol: :mod:`alignkit.reward_protocol`).

Use it where a reward needs its own environment, machine or GPU::

    # on the scoring machine
    alignkit serve-reward my_rewards:Aesthetic --host 0.0.0.0 --port 8900
    # in a recipe
    reward: {aesthetic: {fn: remote, kwargs: {url: "http://scorer:8900", max_batch: 16}}}

Preprocessing: images ``[B, 3, H, W]`` and videos ``[B, F, 3, H, W]`` in [0, 1] are quantised to uint8 (as
``rewards.common.to_uint8``) and sent as PNG; text samples (``list[str]``) are sent as strings. Output
scale: whatever the served reward returns; ``None`` where it could not score (NaN and ±inf arrive as None).

Connections go directly to ``url``: the ``http_proxy`` environment variables are not used. A server started
with a token (``--token`` or ``ALIGNKIT_REWARD_TOKEN``) needs the same token here: ``token`` (write it
``env:VAR`` in a recipe, so that it stays out of the run folder) or ``ALIGNKIT_REWARD_TOKEN``. Over plain
``http://`` the token travels unencrypted: use it on a trusted network or through a tunnel.
"""

from __future__ import annotations

import http.client
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

import torch

from alignkit.reward_protocol import (
    KIND_FRAMES,
    KIND_IMAGES,
    KIND_TEXT,
    TOKEN_ENV,
    EncodedSamples,
    ProtocolError,
    ScoreRequest,
    check_token,
    decode_scores,
    encode_frames,
    encode_images,
    encode_text,
    parse_json,
)
from alignkit.rewards.common import to_uint8

logger = logging.getLogger(__name__)

KINDS = ("auto", KIND_IMAGES, KIND_FRAMES, KIND_TEXT)


class RemoteRewardError(RuntimeError):
    """The reward server could not be reached, refused the request, or answered outside the protocol."""


def infer_kind(samples: Any) -> str:
    """``images`` for ``[B, 3, H, W]`` tensors, ``frames`` for ``[B, F, 3, H, W]``, ``text`` for string lists."""
    if isinstance(samples, torch.Tensor):
        if samples.dim() == 4 and samples.shape[1] == 3:
            return KIND_IMAGES
        if samples.dim() == 5 and samples.shape[2] == 3:
            return KIND_FRAMES
        raise ValueError(f"RemoteReward cannot send a tensor of shape {tuple(samples.shape)}; expected images "
                         "[B, 3, H, W] or videos [B, F, 3, H, W] in [0, 1]")
    if isinstance(samples, (list, tuple)) and all(isinstance(s, str) for s in samples):
        return KIND_TEXT
    raise ValueError(f"RemoteReward cannot send samples of type {type(samples).__name__}; expected an image or "
                     "video tensor, or a list of strings")


def encode_batch(samples: Any, kind: str) -> EncodedSamples:
    """Encode one batch of samples of ``kind`` (``images``, ``frames`` or ``text``) for the wire."""
    found = infer_kind(samples)
    if found != kind:
        raise ValueError(f"RemoteReward(kind={kind!r}) got samples that look like {found!r} "
                         f"({_describe_samples(samples)}); set kind={found!r} or 'auto'")
    if kind == KIND_IMAGES:
        return encode_images(to_uint8(samples))  # [B, H, W, 3]
    if kind == KIND_FRAMES:
        b, f = samples.shape[:2]
        frames = to_uint8(samples.reshape(b * f, *samples.shape[2:]))  # [B*F, H, W, 3]
        return encode_frames(frames.reshape(b, f, *frames.shape[1:]))  # [B, F, H, W, 3]
    return encode_text(list(samples))


def _describe_samples(samples: Any) -> str:
    if isinstance(samples, torch.Tensor):
        return f"tensor of shape {tuple(samples.shape)}"
    return f"{type(samples).__name__} of {len(samples)}"


def _describe_error(exc: BaseException, timeout: float) -> str:
    reason = exc.reason if type(exc) is urllib.error.URLError else exc  # URLError wraps the socket error
    if isinstance(reason, TimeoutError):
        return f"timed out after {timeout:g} s"
    return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__


def _server_message(exc: urllib.error.HTTPError) -> str:
    """The ``error`` field of an error reply, else the start of its body."""
    try:
        body = exc.read()
    except (OSError, http.client.HTTPException):
        return exc.reason or ""
    try:
        obj = parse_json(body)
        if isinstance(obj, dict) and isinstance(obj.get("error"), str):
            return obj["error"]
    except ValueError:
        pass
    return body[:300].decode("utf-8", "replace") or str(exc.reason)


class RemoteReward:
    """Scores samples with a reward server speaking :mod:`alignkit.reward_protocol`.

    Args:
        url: the server's base address, e.g. ``http://127.0.0.1:8900``; requests go to ``{url}/score``.
        timeout: seconds allowed for each socket operation of a request (connect, send, each read).
        retries: further attempts after a connection error, a timeout or an HTTP 5xx. A 4xx or a reply
            that breaks the protocol raises at once: repeating the request would not change it.
        backoff: seconds before the first retry; doubled before each further one.
        max_batch: most samples per request; larger calls are split and scored batch after batch.
        kind: ``auto`` (from the samples' layout), ``images``, ``frames`` or ``text``.
        token: the server's shared secret, sent as ``Authorization: Bearer <token>``; None reads
            ``ALIGNKIT_REWARD_TOKEN`` (unset or empty: no token). Never shown in ``repr`` or errors.

    Raises (when called):
        RemoteRewardError: naming the URL and the problem; after retries, with the last error.
    """

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5, max_batch: int = 32,
                 kind: str = "auto", token: str | None = None) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"RemoteReward url={url!r}: give the server's address, e.g. 'http://127.0.0.1:8900'")
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
        except ValueError as exc:
            raise ValueError(f"RemoteReward url={url!r}: {exc}; e.g. 'http://127.0.0.1:8900'") from None
        if not parts.hostname:
            raise ValueError(f"RemoteReward url={url!r} names no host; e.g. 'http://127.0.0.1:8900'")
        if parts.query or parts.fragment:
            raise ValueError(f"RemoteReward url={url!r}: give the server's base address without ?query or #fragment "
                             "(requests go to <url>/score)")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ValueError(f"RemoteReward timeout={timeout!r}: must be a finite number of seconds > 0")
        if isinstance(retries, bool) or not (isinstance(retries, int) and retries >= 0):
            raise ValueError(f"RemoteReward retries={retries}: must be an integer >= 0 (0 = no retry)")
        if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or not 0 <= backoff < float("inf"):
            raise ValueError(f"RemoteReward backoff={backoff!r}: must be a finite number of seconds >= 0")
        if isinstance(max_batch, bool) or not (isinstance(max_batch, int) and max_batch >= 1):
            raise ValueError(f"RemoteReward max_batch={max_batch}: must be an integer >= 1")
        if kind not in KINDS:
            raise ValueError(f"RemoteReward kind={kind!r}: use one of {', '.join(KINDS)}")
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.max_batch = max_batch
        self.kind = kind
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self._headers = {} if token is None else {
            "Authorization": f"Bearer {check_token(token, 'RemoteReward token')}"}
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"RemoteReward(url={self.url!r}, max_batch={self.max_batch}, kind={self.kind!r})"

    def __call__(
        self, samples: Any, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> list[float | None]:
        n = len(samples)
        if len(prompts) != n or len(metadata) != n:
            raise ValueError(f"RemoteReward got {n} samples, {len(prompts)} prompts and {len(metadata)} metadata; "
                             "pass one prompt and one metadata dict per sample")
        kind = infer_kind(samples) if self.kind == "auto" else self.kind
        scores: list[float | None] = []
        for start in range(0, n, self.max_batch):
            stop = min(start + self.max_batch, n)
            request = ScoreRequest(prompts=list(prompts[start:stop]), metadata=list(metadata[start:stop]),
                                   samples=encode_batch(samples[start:stop], kind))
            scores.extend(self._post(request.to_bytes(), stop - start))
        return scores

    def health(self) -> dict[str, Any]:
        """``GET /health`` (one attempt): the server's name and protocol version."""
        try:
            request = urllib.request.Request(f"{self.url}/health", headers=self._headers)
            with self._opener.open(request, timeout=self.timeout) as resp:
                return parse_json(resp.read())
        except urllib.error.HTTPError as exc:
            raise RemoteRewardError(f"remote reward {self.url}/health answered HTTP {exc.code}: "
                                    f"{_server_message(exc)}") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise RemoteRewardError(f"remote reward {self.url}/health failed: "
                                    f"{_describe_error(exc, self.timeout)}") from exc

    def _post(self, body: bytes, n: int) -> list[float | None]:
        """POST one batch of ``n`` samples, with retries; returns its validated scores."""
        url = f"{self.url}/score"
        attempts = self.retries + 1
        last_exc: BaseException | None = None
        last = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(url, data=body, method="POST",
                                             headers={"Content-Type": "application/json", **self._headers})
            try:
                with self._opener.open(request, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as exc:
                message = _server_message(exc)
                if exc.code < 500:
                    raise RemoteRewardError(f"remote reward {url} rejected a batch of {n} with HTTP {exc.code}: "
                                            f"{message}") from None
                last_exc, last = exc, f"HTTP {exc.code}: {message}"
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut short
                last_exc, last = exc, _describe_error(exc, self.timeout)
            else:
                return self._parse(raw, n, url)
            logger.warning("remote reward %s: attempt %d of %d failed (%s)%s", url, attempt + 1, attempts, last,
                           "; retrying" if attempt + 1 < attempts else "")
        raise RemoteRewardError(f"remote reward {url} failed {attempts} attempt(s) on a batch of {n}; last error: "
                                f"{last}") from last_exc

    def _parse(self, raw: bytes, n: int, url: str) -> list[float | None]:
        try:
            obj = parse_json(raw)
        except ValueError as exc:
            raise RemoteRewardError(f"remote reward {url} answered with a body that is not valid JSON ({exc}): "
                                    f"{raw[:200]!r}") from None
        try:
            return decode_scores(obj, n, f"remote reward {url}")
        except ProtocolError as exc:
            raise RemoteRewardError(exc.message) from None
