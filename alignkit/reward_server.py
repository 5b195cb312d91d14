"""Serve any reward over HTTP (protocol in :mod:`alignkit.reward_protocol`).

    alignkit serve-reward jpeg_compressibility --port 8900
    alignkit serve-reward my_rewards:Aesthetic --kwargs '{"device": "cuda:1"}'

Requests are read and decoded on their own threads; the reward itself is called under a lock, one batch at a
time, because model-backed rewards are rarely safe to call concurrently (and a GPU gains little from it).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
import torch

from alignkit.reward_protocol import (
    KIND_FRAMES,
    KIND_IMAGES,
    PROTOCOL_VERSION,
    ProtocolError,
    ScoreRequest,
    check_scores,
    decode_samples,
    encode_scores,
    parse_json,
)

if TYPE_CHECKING:
    from alignkit.reward_set import Reward

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 256 * 2**20
"""256 MiB: a batch of 32 videos of 33 frames at 480×832 is about 0.5-1 GiB as PNG; send such batches smaller."""


class _ReplyError(Exception):
    """Ends a request with ``status`` and ``{"error": message}``."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def to_reward_input(samples: np.ndarray | list[str], kind: str) -> torch.Tensor | list[str]:
    """Decoded samples as an in-process reward receives them: float32 ``[B, 3, H, W]`` / ``[B, F, 3, H, W]``
    in [0, 1] (value / 255), or the list of strings."""
    if kind == KIND_IMAGES:
        return torch.from_numpy(samples).permute(0, 3, 1, 2).float().div_(255.0)  # [B, 3, H, W]
    if kind == KIND_FRAMES:
        return torch.from_numpy(samples).permute(0, 1, 4, 2, 3).float().div_(255.0)  # [B, F, 3, H, W]
    return samples


class RewardServer(ThreadingHTTPServer):
    """A threading HTTP server bound to one reward. ``port=0`` picks a free port (see :attr:`url`)."""

    daemon_threads = True

    def __init__(self, reward: Reward, host: str, port: int, name: str,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        if max_request_bytes <= 0:
            raise ValueError(f"max_request_bytes={max_request_bytes}: the request size limit must be positive")
        self.reward = reward
        self.name = name
        self.max_request_bytes = max_request_bytes
        self.reward_lock = threading.Lock()
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    server_version = f"alignkit-reward/{PROTOCOL_VERSION}"
    timeout = 300  # seconds a client may take to send its body before the thread gives up

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def _reply(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body, allow_nan=False).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            logger.warning("client %s left before the %d reply was sent (client timeout?)", self.address_string(),
                           status)

    def _path(self) -> str:
        return urlsplit(self.path).path.rstrip("/") or "/"

    def do_GET(self) -> None:
        if self._path() == "/health":
            self._reply(HTTPStatus.OK, {"status": "ok", "name": self.server.name, "version": PROTOCOL_VERSION})
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no GET {self._path()}; use GET /health or POST /score"})

    def do_POST(self) -> None:
        t0 = time.perf_counter()
        try:
            if self._path() != "/score":
                raise _ReplyError(HTTPStatus.NOT_FOUND, f"no POST {self._path()}; use POST /score or GET /health")
            request = self._read_request()
            scores = self._score(request)
        except _ReplyError as exc:
            logger.warning("%s POST %s -> %d: %s", self.address_string(), self.path, exc.status, exc.message)
            self._reply(exc.status, {"error": exc.message})
            return
        self._reply(HTTPStatus.OK, encode_scores(scores))
        invalid = sum(s is None for s in scores)
        logger.info("scored %d %s in %.1f ms%s", len(scores), request.samples.kind, 1e3 * (time.perf_counter() - t0),
                    f" ({invalid} could not be scored)" if invalid else "")

    def _read_request(self) -> ScoreRequest:
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise _ReplyError(HTTPStatus.LENGTH_REQUIRED, "Content-Length header is required (no chunked bodies)")
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise _ReplyError(HTTPStatus.BAD_REQUEST, f"Content-Length={length!r} is not a byte count") from None
        if n > self.server.max_request_bytes:
            self.close_connection = True  # the unread body must not be parsed as the next request
            raise _ReplyError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              f"request of {n} bytes exceeds this server's limit of {self.server.max_request_bytes} "
                              "bytes; send smaller batches (RemoteReward max_batch) or raise --max-request-mb")
        body = self.rfile.read(n)
        if len(body) != n:
            raise _ReplyError(HTTPStatus.BAD_REQUEST, f"body ended after {len(body)} of {n} bytes")
        try:
            obj = parse_json(body)
        except ValueError as exc:  # includes UnicodeDecodeError and JSONDecodeError
            raise _ReplyError(HTTPStatus.BAD_REQUEST, f"request body is not valid JSON: {exc}") from None
        try:
            return ScoreRequest.from_json(obj)
        except ProtocolError as exc:
            raise _ReplyError(HTTPStatus.BAD_REQUEST, str(exc)) from None

    def _score(self, request: ScoreRequest) -> list[float | None]:
        try:
            samples = to_reward_input(decode_samples(request.samples), request.samples.kind)
        except ProtocolError as exc:
            raise _ReplyError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        n = len(request.prompts)
        source = f"reward {self.server.name!r}"
        try:
            with self.server.reward_lock:
                out = self.server.reward(samples, request.prompts, request.metadata)
        except Exception as exc:
            logger.exception("%s raised on a batch of %d", source, n)
            message = f"{source} raised {type(exc).__name__}: {exc}"
            raise _ReplyError(HTTPStatus.INTERNAL_SERVER_ERROR, message) from None
        try:
            return check_scores(out, n, source)
        except ProtocolError as exc:
            raise _ReplyError(HTTPStatus.INTERNAL_SERVER_ERROR, exc.message) from None


def make_server(reward: Reward, host: str = "127.0.0.1", port: int = 8900, name: str = "reward", *,
                max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> RewardServer:
    """Bind a :class:`RewardServer` (not yet serving: call ``serve_forever``, e.g. on a thread)."""
    return RewardServer(reward, host, port, name, max_request_bytes)


def serve(reward: Reward, host: str = "127.0.0.1", port: int = 8900, name: str = "reward", *,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
    """Serve ``reward`` on ``http://host:port`` until interrupted (Ctrl-C stops it cleanly).

    Raises:
        OSError: when the address cannot be bound (port taken, host not local).
    """
    server = make_server(reward, host, port, name, max_request_bytes=max_request_bytes)
    logger.info("serving reward %r on %s (protocol version %d; POST /score, GET /health; max request %d MiB)",
                name, server.url, PROTOCOL_VERSION, max_request_bytes // 2**20)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("stopping reward server %s", server.url)
    finally:
        server.server_close()
