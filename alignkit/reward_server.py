"""Serve any reward over HTTP (protocol in :mod:`alignkit.reward_protocol`).

    alignkit serve-reward jpeg_compressibility --port 8900
    alignkit serve-reward my_rewards:Aesthetic --kwargs '{"device": "cuda:1"}'
    ALIGNKIT_REWARD_TOKEN=... alignkit serve-reward ocr --host 0.0.0.0      # the network: a token is required

Requests are read and decoded on their own threads; the reward itself is called under a lock, one batch at a
time, because model-backed rewards are rarely safe to call concurrently (and a GPU gains little from it).

Safety: the server binds to loopback unless told otherwise; it refuses ``Host`` names other than its own
(DNS rebinding) and cross-site browser requests, so a web page cannot reach it; with a token (``--token`` or
``ALIGNKIT_REWARD_TOKEN``, required off loopback) every request must carry it. PNG sizes are checked from their
headers before decoding, JSON nesting is bounded, and a batch that takes longer than ``--timeout`` is answered
with 504 and frees the reward for the next request (the stuck call runs on in its thread: a Python thread
cannot be killed). Every answer, errors included, is JSON.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import math
import os
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
import torch

from alignkit.reward_protocol import (
    DEFAULT_MAX_JSON_DEPTH,
    KIND_FRAMES,
    KIND_IMAGES,
    PROTOCOL_VERSION,
    TOKEN_ENV,
    LimitError,
    PixelBudget,
    ProtocolError,
    ScoreRequest,
    check_scores,
    check_token,
    decode_samples,
    encode_scores,
    parse_json,
)

if TYPE_CHECKING:
    from alignkit.reward_set import Reward

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 256 * 2**20
"""256 MiB: a batch of 32 videos of 33 frames at 480×832 is about 0.5-1 GiB as PNG; send such batches smaller."""
DEFAULT_MAX_IMAGE_PIXELS = 2**25
"""33.5 million pixels (e.g. 8192 × 4096) per image or frame."""
DEFAULT_MAX_REQUEST_PIXELS = 2**28
"""268 million pixels per request in all (0.8 GB as uint8 RGB, 3.2 GB as the float32 tensor the reward gets)."""
DEFAULT_TIMEOUT = 600.0
"""Seconds a request may wait for the reward and the reward may take to score it."""
DRAIN_BYTES = 64 * 2**20
"""Bodies of refused requests up to this size (or twice the request limit) are read before the answer."""
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
ENDPOINTS = {"/health": "GET", "/score": "POST"}


class _ReplyError(Exception):
    """Ends a request with ``status`` and ``{"error": message}``."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def to_reward_input(samples: np.ndarray | list[str], kind: str) -> torch.Tensor | list[str]:
    """Decoded samples as an in-process reward receives them: float32 ``[B, 3, H, W]`` / ``[B, F, 3, H, W]``
    in [0, 1] (value / 255), or the list of strings."""
    if kind == KIND_IMAGES:
        return torch.from_numpy(samples).permute(0, 3, 1, 2).float().div_(255.0)  # [B, 3, H, W]
    if kind == KIND_FRAMES:
        return torch.from_numpy(samples).permute(0, 1, 4, 2, 3).float().div_(255.0)  # [B, F, 3, H, W]
    return samples


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback interface."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name of a ``Host`` header value: ``[::1]:8900`` -> ``::1``, ``Example.org.:80`` -> ``example.org``."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0].rstrip(".") if value.count(":") == 1 else value.rstrip(".")


class RewardServer(ThreadingHTTPServer):
    """A threading HTTP server bound to one reward. ``port=0`` picks a free port (see :attr:`url`).

    Args:
        max_request_bytes: largest request body.
        max_image_pixels, max_request_pixels: pixel limits per image / frame and per request.
        max_json_depth: deepest nesting of the request's JSON.
        timeout: seconds a request may wait for the reward (busy with other requests: 503) and then take to
            be scored (504).
        token: shared secret every request must carry (``Authorization: Bearer <token>``); None reads
            ``ALIGNKIT_REWARD_TOKEN`` (unset or empty: no token). Required when ``host`` is not loopback.

    Raises:
        ValueError: a limit that is not a positive finite number, a bad token, or a non-loopback ``host``
            without a token (before binding).
        OSError: the address cannot be bound.
    """

    daemon_threads = True

    def __init__(self, reward: Reward, host: str, port: int, name: str,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, *,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
                 max_json_depth: int = DEFAULT_MAX_JSON_DEPTH, timeout: float = DEFAULT_TIMEOUT,
                 token: str | None = None) -> None:
        for what, value in (("max_request_bytes", max_request_bytes), ("max_image_pixels", max_image_pixels),
                            ("max_request_pixels", max_request_pixels), ("max_json_depth", max_json_depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{what}={value!r}: must be a positive integer")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise ValueError(f"timeout={timeout!r}: must be a positive, finite number of seconds")
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port={port!r}: must be in 0..65535 (0: any free port)")
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        if token is not None:
            check_token(token, "token")
        elif not is_loopback(host):
            raise ValueError(f"serving on host {host!r} exposes the reward beyond this machine: set a shared secret "
                             f"with --token or {TOKEN_ENV} (clients pass it as RemoteReward's token, or set "
                             f"{TOKEN_ENV} too), or serve on 127.0.0.1")
        self.reward = reward
        self.name = name
        self.max_request_bytes = max_request_bytes
        self.max_image_pixels = max_image_pixels
        self.max_request_pixels = max_request_pixels
        self.max_json_depth = max_json_depth
        self.score_timeout = float(timeout)
        self.token = token
        bare = host.strip("[]")
        self.allowed_hosts: frozenset[str] | None = (
            None if bare in WILDCARD_HOSTS else LOOPBACK_NAMES | {bare.lower().rstrip(".")})
        """``Host`` names accepted; None (bound to all interfaces, so a token is set): any name."""
        self.reward_lock = threading.Lock()
        if ":" in bare:
            self.address_family = socket.AF_INET6
        super().__init__((bare, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    server_version = f"alignkit-reward/{PROTOCOL_VERSION}"
    timeout = 300  # seconds a client may take to send its body before the thread gives up

    _body_read = False  # whether the current request's body was read

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def parse_request(self) -> bool:
        self._body_read = False
        return super().parse_request()

    def _drain_body(self) -> None:
        """Read and drop the unread body of a refused request (up to :data:`DRAIN_BYTES` or twice the size limit):
        a client still sending it then reads this answer, instead of a broken pipe from the close that follows
        (which it would retry, as if the server were down)."""
        if self._body_read:
            return
        self._body_read = True
        headers = getattr(self, "headers", None)
        try:
            remaining = int(headers.get("Content-Length", 0)) if headers is not None else 0
        except ValueError:
            return
        if not 0 < remaining <= max(DRAIN_BYTES, 2 * self.server.max_request_bytes):
            return
        try:
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 2**20))
                if not chunk:
                    return
                remaining -= len(chunk)
        except OSError:  # the client gave up or went silent: the answer goes out anyway
            return

    def _reply(self, status: HTTPStatus | int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body, allow_nan=False).encode("utf-8")
        if int(status) >= 400:
            self._drain_body()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if int(status) >= 400:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            logger.warning("client %s left before the %d reply was sent (client timeout?)", self.address_string(),
                           status)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, headers too long, unknown method) as JSON, not HTML; an
        unknown method is a 405 naming the endpoints."""
        if code == HTTPStatus.NOT_IMPLEMENTED and self.command:
            path = self._path()
            if path in ENDPOINTS:
                self._reply(HTTPStatus.METHOD_NOT_ALLOWED, {"error": self._method_hint(path)},
                            {"Allow": ENDPOINTS[path]})
            else:
                self._reply(HTTPStatus.NOT_FOUND, {"error": self._method_hint(path)})
            return
        try:
            text = message or HTTPStatus(code).phrase
        except ValueError:
            text = message or "error"
        self._reply(code, {"error": f"{text}{f'; {explain}' if explain else ''}"})

    def _method_hint(self, path: str) -> str:
        if path in ENDPOINTS:
            return f"{self.command} {path} is not allowed; use {ENDPOINTS[path]} {path}"
        return f"no {self.command} {path}; use GET /health or POST /score"

    def _path(self) -> str:
        return urlsplit(self.path).path.rstrip("/") or "/"

    def _check_access(self) -> None:
        """Host names (DNS rebinding), browser cross-site requests, then the token."""
        host = self.headers.get("Host")
        allowed = self.server.allowed_hosts
        if host is not None and allowed is not None and _host_name(host) not in allowed:
            raise _ReplyError(HTTPStatus.FORBIDDEN, f"Host {host!r} is not a name of this server (accepted: "
                                                    f"{', '.join(sorted(allowed))}); connect to one of them, or "
                                                    "serve with --host set to the name clients use")
        origin = self.headers.get("Origin")
        if origin is not None and (host is None or origin.rstrip("/").lower() != f"http://{host.strip().lower()}"):
            raise _ReplyError(HTTPStatus.FORBIDDEN, f"cross-origin request (Origin {origin!r}) refused: a reward "
                                                    "server answers programs, not web pages")
        if (self.headers.get("Sec-Fetch-Site") or "").strip().lower() == "cross-site":
            raise _ReplyError(HTTPStatus.FORBIDDEN, "cross-site browser request (Sec-Fetch-Site: cross-site) refused")
        token = self.server.token
        if token is not None:
            given = self.headers.get("Authorization") or ""
            scheme, _, value = given.strip().partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
                why = "has no token" if not given else "has another token"
                raise _ReplyError(HTTPStatus.UNAUTHORIZED,
                                  f"this server requires a token and the request {why}: send 'Authorization: Bearer "
                                  f"<token>' (RemoteReward token=..., or {TOKEN_ENV})",
                                  {"WWW-Authenticate": 'Bearer realm="alignkit-reward"'})

    def _dispatch(self, handler: Any) -> None:
        """Run ``handler`` behind the access checks; every failure becomes a JSON error reply."""
        path = self._path()
        try:
            if path not in ENDPOINTS:
                raise _ReplyError(HTTPStatus.NOT_FOUND, self._method_hint(path))
            if ENDPOINTS[path] != self.command:
                raise _ReplyError(HTTPStatus.METHOD_NOT_ALLOWED, self._method_hint(path), {"Allow": ENDPOINTS[path]})
            self._check_access()
            handler()
        except _ReplyError as exc:
            logger.warning("%s %s %s -> %d: %s", self.address_string(), self.command, self.path, exc.status,
                           exc.message)
            self._reply(exc.status, {"error": exc.message}, exc.headers)
        except Exception as exc:  # a bug or an exhausted resource: still a JSON answer, never a dropped connection
            logger.exception("%s %s %s failed", self.address_string(), self.command, self.path)
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR,
                        {"error": f"the server failed on this request: {type(exc).__name__}: {exc}"})

    def do_GET(self) -> None:
        self._dispatch(self._health)

    def do_POST(self) -> None:
        self._dispatch(self._score_request)

    def _health(self) -> None:
        self._reply(HTTPStatus.OK, {"status": "ok", "name": self.server.name, "version": PROTOCOL_VERSION})

    def _score_request(self) -> None:
        t0 = time.perf_counter()
        request = self._read_request()
        scores = self._score(request)
        body = encode_scores(scores)
        invalid = sum(s is None for s in scores)
        # logged before the reply: a client that reads its answer and then stops the server finds the line
        logger.info("scored %d %s in %.1f ms%s", len(scores), request.samples.kind, 1e3 * (time.perf_counter() - t0),
                    f" ({invalid} could not be scored)" if invalid else "")
        self._reply(HTTPStatus.OK, body)

    def _read_request(self) -> ScoreRequest:
        length = self.headers.get("Content-Length")
        if length is None:
            raise _ReplyError(HTTPStatus.LENGTH_REQUIRED, "Content-Length header is required (no chunked bodies)")
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            raise _ReplyError(HTTPStatus.BAD_REQUEST, f"Content-Length={length!r} is not a byte count") from None
        if n > self.server.max_request_bytes:
            raise _ReplyError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              f"request of {n} bytes exceeds this server's limit of {self.server.max_request_bytes} "
                              "bytes; send smaller batches (RemoteReward max_batch) or raise --max-request-mb")
        body = self.rfile.read(n)
        self._body_read = True
        if len(body) != n:
            raise _ReplyError(HTTPStatus.BAD_REQUEST, f"body ended after {len(body)} of {n} bytes")
        try:
            obj = parse_json(body, self.server.max_json_depth)
        except ValueError as exc:  # includes UnicodeDecodeError and JSONDecodeError
            raise _ReplyError(HTTPStatus.BAD_REQUEST, f"request body is not valid JSON: {exc}") from None
        try:
            return ScoreRequest.from_json(obj)
        except ProtocolError as exc:
            raise _ReplyError(HTTPStatus.BAD_REQUEST, str(exc)) from None

    def _score(self, request: ScoreRequest) -> list[float | None]:
        from alignkit.reward_set import CallTimeout, call_with_timeout

        server = self.server
        budget = PixelBudget(server.max_image_pixels, server.max_request_pixels)
        try:
            samples = to_reward_input(decode_samples(request.samples, budget=budget), request.samples.kind)
        except LimitError as exc:
            raise _ReplyError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(exc)) from None
        except ProtocolError as exc:
            raise _ReplyError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        except MemoryError:
            raise _ReplyError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "the server ran out of memory converting the "
                                                                   "samples; send smaller batches") from None
        n = len(request.prompts)
        source = f"reward {server.name!r}"
        deadline = time.monotonic() + server.score_timeout
        if not server.reward_lock.acquire(timeout=server.score_timeout):
            raise _ReplyError(HTTPStatus.SERVICE_UNAVAILABLE,
                              f"{source} stayed busy with other requests for {server.score_timeout:g} s (--timeout); "
                              "retry later")
        try:
            out = call_with_timeout(server.reward, (samples, request.prompts, request.metadata),
                                    max(deadline - time.monotonic(), 1e-3), source)
        except CallTimeout:
            raise _ReplyError(HTTPStatus.GATEWAY_TIMEOUT,
                              f"{source} gave no scores for a batch of {n} within {server.score_timeout:g} s "
                              "(--timeout); the call runs on in its thread (it cannot be killed) and the reward is "
                              "free for the next request") from None
        except (Exception, SystemExit) as exc:
            logger.exception("%s raised on a batch of %d", source, n)  # the server's log keeps the traceback
            message = f"{source} raised {type(exc).__name__}: {exc}"
            raise _ReplyError(HTTPStatus.INTERNAL_SERVER_ERROR, message) from None
        finally:
            server.reward_lock.release()
        try:
            return check_scores(out, n, source)
        except ProtocolError as exc:
            raise _ReplyError(HTTPStatus.INTERNAL_SERVER_ERROR, exc.message) from None


def make_server(reward: Reward, host: str = "127.0.0.1", port: int = 8900, name: str = "reward", *,
                max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, **options: Any) -> RewardServer:
    """Bind a :class:`RewardServer` (not yet serving: call ``serve_forever``, e.g. on a thread); ``options``:
    its keyword settings (pixel limits, ``max_json_depth``, ``timeout``, ``token``)."""
    return RewardServer(reward, host, port, name, max_request_bytes, **options)


def serve(reward: Reward, host: str = "127.0.0.1", port: int = 8900, name: str = "reward", *,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, **options: Any) -> None:
    """Serve ``reward`` on ``http://host:port`` until interrupted (Ctrl-C stops it cleanly).

    Raises:
        ValueError: a bad setting (see :class:`RewardServer`).
        OSError: when the address cannot be bound (port taken, host not local).
    """
    server = make_server(reward, host, port, name, max_request_bytes=max_request_bytes, **options)
    logger.info("serving reward %r on %s (protocol version %d; POST /score, GET /health; max request %d MiB; "
                "timeout %g s; %s)", name, server.url, PROTOCOL_VERSION, max_request_bytes // 2**20,
                server.score_timeout, "token required" if server.token else "no token")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("stopping reward server %s", server.url)
    finally:
        server.server_close()


# ---------------------------------------------------------------- the command


def _positive(kind: type) -> Any:
    """An argparse type: a positive finite ``kind`` (``nan``, ``inf``, 0 and negatives refused)."""

    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(f"{text!r}: must be a positive, finite number")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value}: must be in 0..65535 (0: any free port)")
    return value


class _Parser(argparse.ArgumentParser):
    """Argument errors raise ``ValueError`` (one log line, exit status 2) instead of printing usage and exiting."""

    def error(self, message: str) -> Any:
        raise ValueError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="alignkit serve-reward",
                     description="Serve a reward over HTTP (protocol: alignkit.reward_protocol).")
    parser.add_argument("name", help="registry name (alignkit list rewards) or 'package.module:callable'")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default loopback; 0.0.0.0: all interfaces, needs a token)")
    parser.add_argument("--port", type=_port, default=8900, help="port to listen on (0: any free port)")
    parser.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments for the reward "
                                                       "(a value 'env:VAR' reads environment variable VAR)")
    parser.add_argument("--max-request-mb", type=_positive(float), default=DEFAULT_MAX_REQUEST_BYTES / 2**20,
                        help="largest request body accepted, in MiB")
    parser.add_argument("--max-image-pixels", type=_positive(int), default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="most pixels (H x W) of one image or frame, checked before decoding")
    parser.add_argument("--max-request-pixels", type=_positive(int), default=DEFAULT_MAX_REQUEST_PIXELS,
                        help="most pixels of all the images of one request")
    parser.add_argument("--timeout", type=_positive(float), default=DEFAULT_TIMEOUT,
                        help="seconds a request may wait for the reward and take to be scored (then 503 / 504)")
    parser.add_argument("--token", default=None,
                        help=f"shared secret clients must send (default: ${TOKEN_ENV}); required off loopback")
    return parser


def main(args: list[str]) -> int:
    """``alignkit serve-reward``: 0 after Ctrl-C, 2 when the settings are refused or the address cannot be bound.

    Raises:
        ValueError, ImportError: a bad argument or reward, before anything is bound (the CLI logs one line).
    """
    return run(build_parser().parse_args(args))


def run(ns: argparse.Namespace) -> int:
    """Serve with the arguments :func:`build_parser` parsed (``alignkit serve-reward`` calls this).

    Raises:
        ValueError, ImportError: a bad argument or reward, before anything is bound.
    """
    from alignkit.config import RewardTermConfig
    from alignkit.reward_set import resolve_reward

    try:
        kwargs = json.loads(ns.kwargs)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--kwargs {ns.kwargs!r} is not JSON ({exc}); e.g. '{{\"quality\": 90}}'") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--kwargs {ns.kwargs!r} must be a JSON object of keyword arguments")
    max_request_bytes = int(ns.max_request_mb * 2**20)
    if max_request_bytes < 1:
        raise ValueError(f"--max-request-mb {ns.max_request_mb}: less than one byte; give e.g. 256")
    if ns.token is not None:
        check_token(ns.token, "--token")
    reward = resolve_reward(ns.name, RewardTermConfig(fn=ns.name, kwargs=kwargs))
    try:
        serve(reward, ns.host, ns.port, ns.name, max_request_bytes=max_request_bytes,
              max_image_pixels=ns.max_image_pixels, max_request_pixels=ns.max_request_pixels, timeout=ns.timeout,
              token=ns.token)
    except OSError as exc:
        logger.error("cannot serve on %s:%d: %s; choose another --port or --host", ns.host, ns.port, exc)
        return 2
    return 0
