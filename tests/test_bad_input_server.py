"""The reward server's part of the bad-input catalogue (tests/test_bad_input.py): hostile or malformed requests,
rewards that hang or overflow, access from other hosts and browsers, tokens, and `serve-reward` arguments.
Every case talks to a real server on 127.0.0.1 and checks the JSON answer a client receives.

    pytest tests/test_bad_input_server.py -m "not integration"   # all but the training run with a remote reward
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from reward_servers import serving

from alignkit import reward_server
from alignkit.compose import load_run_config
from alignkit.reward_protocol import TOKEN_ENV, encode_png
from alignkit.reward_server import RewardServer, make_server
from alignkit.rewards.remote import RemoteReward, RemoteRewardError

FAST = {"timeout": 5.0, "retries": 2, "backoff": 0.01}


@pytest.fixture(autouse=True)
def _no_token_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)


class _Recorder:
    """A brightness reward that records the batch size of every call."""

    def __init__(self, out: Callable[[int], Any] | None = None) -> None:
        self.calls: list[int] = []
        self.out = out

    def __call__(self, samples: Any, prompts: list[str], metadata: list[dict[str, Any]]) -> Any:
        self.calls.append(len(prompts))
        return self.out(len(prompts)) if self.out else [0.5] * len(prompts)


def _request(server: RewardServer, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with exactly ``headers`` (plus Content-Length with a body, and Host unless given)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    headers = dict(headers or {})
    conn.putrequest(method, path, skip_host="Host" in headers or headers.pop("No-Host", None) is not None,
                    skip_accept_encoding=True)
    for key, value in headers.items():
        conn.putheader(key, value)
    if body is not None:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def _raw(server: RewardServer, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; parse the HTTP answer."""
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), headers, body


def _json_error(status: int, headers: dict[str, str], body: bytes) -> str:
    """The ``error`` of a JSON error answer (never an HTML page)."""
    assert status >= 400
    assert headers["content-type"] == "application/json", headers
    reply = json.loads(body)
    assert set(reply) == {"error"} and isinstance(reply["error"], str), reply
    return reply["error"]


def _body(n: int = 1, size: int = 4, metadata: list[Any] | None = None, data: list[str] | None = None) -> bytes:
    png = encode_png(np.zeros((size, size, 3), np.uint8))
    return json.dumps({"version": 1, "prompts": ["a"] * n, "metadata": metadata or [{}] * n,
                       "samples": {"kind": "images", "encoding": "png_base64", "data": data or [png] * n}}).encode()


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# ---------------------------------------------------------------- every status is a JSON answer

STATUS_CASES: list[tuple[str, str, str, bytes | None, dict[str, str], int, list[str], str | None]] = [
    # (id, method, path, body, headers, status, words, Allow header)
    ("get_score", "GET", "/score", None, {}, 405, ["GET /score is not allowed", "use POST /score"], "POST"),
    ("post_health", "POST", "/health", b"{}", {}, 405, ["use GET /health"], "GET"),
    ("put_score", "PUT", "/score", b"{}", {}, 405, ["PUT /score is not allowed", "use POST /score"], "POST"),
    ("delete_health", "DELETE", "/health", None, {}, 405, ["use GET /health"], "GET"),
    ("options_score", "OPTIONS", "/score", None, {}, 405, ["use POST /score"], "POST"),
    ("patch_unknown_path", "PATCH", "/admin", b"{}", {}, 404, ["no PATCH /admin", "GET /health or POST /score"], None),
    ("get_root", "GET", "/", None, {}, 404, ["no GET /", "GET /health"], None),
    ("post_unknown_path", "POST", "/v2/score", b"{}", {}, 404, ["no POST /v2/score"], None),
    ("no_content_length", "POST", "/score", None, {}, 411, ["Content-Length header is required"], None),
    ("content_length_word", "POST", "/score", None, {"Content-Length": "many"}, 400,
     ["Content-Length='many' is not a byte count"], None),
    ("not_json", "POST", "/score", b"{nope", {}, 400, ["request body is not valid JSON"], None),
    ("json_nested_too_deep", "POST", "/score", _body(metadata=[{"a": _nested(30)}]), {}, 400,  # 3 + 30 levels
     ["nested 33 levels deep exceeds this side's limit of 32", "flatter metadata"], None),
    ("json_nested_a_million_deep", "POST", "/score", b"[" * 10**6 + b"]" * 10**6, {}, 400,
     ["nested deeper than this side's limit of 32"], None),
]


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "words", "allow"),
                         [c[1:] for c in STATUS_CASES], ids=[c[0] for c in STATUS_CASES])
def test_every_error_is_a_json_answer(method: str, path: str, body: bytes | None, headers: dict[str, str],
                                      status: int, words: list[str], allow: str | None) -> None:
    recorder = _Recorder()
    with serving(recorder) as server:
        got, reply_headers, data = _request(server, method, path, body, headers)
        assert got == status, data
        error = _json_error(got, reply_headers, data)
        for word in words:
            assert word in error, (word, error)
        assert reply_headers.get("allow") == allow
        assert _request(server, "GET", "/health")[0] == 200  # the server is still up
    assert recorder.calls == []


def test_http_servers_own_errors_are_json_too() -> None:
    with serving(_Recorder()) as server:
        status, headers, body = _raw(server, b"GET /health extra words HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status == 400 and "Bad request syntax" in _json_error(status, headers, body)
        long_header = b"X-Long: " + b"a" * 70000 + b"\r\n"
        status, headers, body = _raw(server, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + long_header + b"\r\n")
        assert status == 431 and "Line too long" in _json_error(status, headers, body)
        status, headers, body = _request(server, "HEAD", "/health")
        assert status == 405 and headers["allow"] == "GET" and body == b""  # HEAD answers carry no body


# ---------------------------------------------------------------- pixels: checked from the PNG header


def _png_bomb(width: int = 9000, height: int = 9000, truncate: bool = False) -> str:
    """A valid, all-black RGB PNG of ``width x height`` (9000 x 9000: 236 KB, 243 MB decoded); ``truncate``
    cuts its pixel data short, so that only its header is readable."""
    deflate = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * width)  # filter byte + pixels
    pixels = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    if truncate:
        pixels = pixels[:1000]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


def test_decompression_bomb_is_refused_from_its_header() -> None:
    recorder = _Recorder()
    bomb = _png_bomb()
    assert len(base64.b64decode(bomb)) < 240_000
    with serving(recorder) as server:
        for data in (bomb, _png_bomb(truncate=True)):  # a truncated bomb too: the header decides, not the decode
            status, headers, body = _request(server, "POST", "/score", _body(data=[data]))
            assert status == 413, body
            error = _json_error(status, headers, body)
            for word in ("samples.data[0]", "9000 x 9000 = 81000000 pixels", "limit of 33554432 pixels per image",
                         "--max-image-pixels"):
                assert word in error, (word, error)
    assert recorder.calls == []


def test_request_pixel_limit_counts_every_image_and_frame() -> None:
    recorder = _Recorder()
    with serving(recorder, max_request_pixels=3 * 16 * 16) as server:
        status, headers, body = _request(server, "POST", "/score", _body(n=4, size=16))
        assert status == 413
        error = _json_error(status, headers, body)
        assert "samples.data[3]" in error and "768 pixels in all (--max-request-pixels)" in error
        assert "max_batch" in error
        status, _, body = _request(server, "POST", "/score", _body(n=3, size=16))
        assert status == 200 and json.loads(body)["scores"] == [0.5] * 3
    assert recorder.calls == [3]


# ---------------------------------------------------------------- rewards that hang or answer badly


def test_hanging_reward_gets_504_and_frees_the_reward_for_the_next_request() -> None:
    release = threading.Event()
    calls: list[int] = []

    def first_call_hangs(samples: Any, prompts: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        calls.append(len(prompts))
        if len(calls) == 1:
            release.wait(60)
        return [1.0] * len(prompts)

    with serving(first_call_hangs, timeout=0.3) as server:
        try:
            status, headers, body = _request(server, "POST", "/score", _body())
            assert status == 504
            error = _json_error(status, headers, body)
            for word in ("reward 'test' gave no scores for a batch of 1 within 0.3 s (--timeout)", "cannot be killed",
                         "free for the next request"):
                assert word in error, (word, error)
            status, _, body = _request(server, "POST", "/score", _body(n=2))  # the lock was freed
            assert status == 200 and json.loads(body)["scores"] == [1.0, 1.0]
        finally:
            release.set()
    assert calls == [1, 2]


@pytest.mark.parametrize(("out", "words"), [
    (lambda n: [10**400] * n, ["reward 'test' returned a number too large for a float for sample 0"]),
    (lambda n: {"a": 1.0}, ["reward 'test' returned dict", "expected a list of 1 floats"]),
    (lambda n: [object()] * n, ["reward 'test' returned <object object", "(object) for sample 0"]),
], ids=["int_too_large_for_a_float", "a_dict", "an_object"])
def test_scores_that_cannot_be_sent_are_500_json(out: Callable[[int], Any], words: list[str]) -> None:
    with serving(_Recorder(out)) as server:
        status, headers, body = _request(server, "POST", "/score", _body())
        assert status == 500
        error = _json_error(status, headers, body)
        for word in words:
            assert word in error, (word, error)
        with pytest.raises(RemoteRewardError, match=r"HTTP 500: reward 'test' returned"):
            RemoteReward(server.url, **FAST)(torch.rand(1, 3, 4, 4), ["a"], [{}])


# ---------------------------------------------------------------- who may ask: hosts, browsers, tokens


def test_host_header_must_name_this_server() -> None:
    with serving(_Recorder()) as server:
        port = server.server_address[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST.", f"[::1]:{port}"):
            assert _request(server, "GET", "/health", headers={"Host": host})[0] == 200, host
        assert _request(server, "GET", "/health", headers={"No-Host": "1"})[0] == 200  # HTTP/1.0 clients send none
        status, headers, body = _request(server, "POST", "/score", _body(), {"Host": f"attacker.example:{port}"})
        assert status == 403
        error = _json_error(status, headers, body)
        for word in (f"Host 'attacker.example:{port}' is not a name of this server", "127.0.0.1, ::1, localhost",
                     "--host"):
            assert word in error, (word, error)


def test_a_server_bound_to_another_address_also_accepts_that_name() -> None:
    try:
        server_cm = serving(_Recorder(), host="127.0.0.2")
        server = server_cm.__enter__()
    except OSError:
        pytest.skip("127.0.0.2 cannot be bound here")
    try:
        port = server.server_address[1]
        conn = http.client.HTTPConnection("127.0.0.2", port, timeout=10)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
        assert server.allowed_hosts == frozenset({"127.0.0.2", "127.0.0.1", "localhost", "::1"})
    finally:
        server_cm.__exit__(None, None, None)


def test_browser_cross_origin_requests_are_refused() -> None:
    recorder = _Recorder()
    with serving(recorder) as server:
        own = f"127.0.0.1:{server.server_address[1]}"
        for headers, word in (({"Host": own, "Origin": "http://attacker.example"}, "Origin 'http://attacker.example'"),
                              ({"Host": own, "Origin": "null"}, "Origin 'null'"),
                              ({"Host": own, "Sec-Fetch-Site": "cross-site"}, "Sec-Fetch-Site: cross-site")):
            status, reply_headers, body = _request(server, "POST", "/score", _body(), headers)
            assert status == 403
            assert word in _json_error(status, reply_headers, body)
        assert recorder.calls == []
        same = {"Host": own, "Origin": f"http://{own}", "Sec-Fetch-Site": "same-origin"}
        assert _request(server, "POST", "/score", _body(), same)[0] == 200
    assert recorder.calls == [1]


def test_token_is_required_checked_and_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "correct-horse-battery-staple"
    recorder = _Recorder()
    x = torch.rand(2, 3, 4, 4)
    with serving(recorder, token=secret) as server:
        status, headers, body = _request(server, "POST", "/score", _body())
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        assert "requires a token and the request has no token" in _json_error(status, headers, body)
        for client, why in ((RemoteReward(server.url, **FAST), "has no token"),
                            (RemoteReward(server.url, token="wrong-token", **FAST), "has another token")):
            with pytest.raises(RemoteRewardError) as info:
                client(x, ["a", "b"], [{}, {}])
            assert "HTTP 401" in str(info.value) and why in str(info.value) and TOKEN_ENV in str(info.value)
        assert RemoteReward(server.url, token=secret, **FAST)(x, ["a", "b"], [{}, {}]) == [0.5, 0.5]
        monkeypatch.setenv(TOKEN_ENV, secret)  # the client reads the environment when not given a token
        remote = RemoteReward(server.url, **FAST)
        assert remote.health()["name"] == "test" and remote(x, ["a", "b"], [{}, {}]) == [0.5, 0.5]
        assert secret not in repr(remote)
    assert recorder.calls == [2, 2]  # the refused requests were not retried and never reached the reward
    with serving(recorder) as server:  # the server reads it too
        assert server.token == secret
        assert _request(server, "GET", "/health")[0] == 401


def test_serving_beyond_loopback_needs_a_token() -> None:
    with pytest.raises(ValueError) as info:
        make_server(_Recorder(), "0.0.0.0", 0)
    msg = str(info.value)
    for word in ("host '0.0.0.0'", "beyond this machine", "--token", TOKEN_ENV, "127.0.0.1"):
        assert word in msg, (word, msg)
    with serving(_Recorder(), host="0.0.0.0", token="a-long-shared-secret") as server:
        assert server.allowed_hosts is None  # clients use whatever name reaches this machine: the token guards it
        auth = {"Authorization": "Bearer a-long-shared-secret"}
        assert _request(server, "GET", "/health", headers={"Host": "scorer:8900", **auth})[0] == 200
        assert _request(server, "GET", "/health", headers={"Host": "scorer:8900"})[0] == 401


# ---------------------------------------------------------------- alignkit serve-reward arguments


ARGUMENT_CASES: list[tuple[str, list[str], list[str]]] = [
    ("max_request_mb_nan", ["--max-request-mb", "nan"], ["--max-request-mb", "'nan'", "positive, finite"]),
    ("max_request_mb_inf", ["--max-request-mb", "inf"], ["--max-request-mb", "'inf'", "positive, finite"]),
    ("max_request_mb_zero", ["--max-request-mb", "0"], ["--max-request-mb", "positive"]),
    ("max_request_mb_tiny", ["--max-request-mb", "1e-9"], ["--max-request-mb", "less than one byte"]),
    ("port_out_of_range", ["--port", "70000"], ["--port", "70000", "0..65535"]),
    ("port_word", ["--port", "http"], ["--port", "'http' is not a port number"]),
    ("timeout_negative", ["--timeout", "-1"], ["--timeout", "positive, finite"]),
    ("image_pixels_fraction", ["--max-image-pixels", "1.5"], ["--max-image-pixels", "not an integer"]),
    ("token_with_space", ["--token", "two words"], ["--token", "visible ASCII"]),
    ("network_without_token", ["--host", "0.0.0.0"], ["host '0.0.0.0'", "--token", TOKEN_ENV]),
    ("kwargs_not_an_object", ["--kwargs", "[50]"], ["--kwargs", "JSON object"]),
    ("unknown_option", ["--tokn", "x"], ["unrecognized arguments: --tokn", "--help"]),
]


@pytest.mark.parametrize(("args", "words"), [c[1:] for c in ARGUMENT_CASES], ids=[c[0] for c in ARGUMENT_CASES])
def test_serve_reward_arguments_are_checked_before_binding(args: list[str], words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        reward_server.main(["jpeg_compressibility", *args])
    msg = str(info.value)
    for word in words:
        assert word in msg, (word, msg)


# ---------------------------------------------------------------- the token stays out of the run folder


@pytest.mark.integration
def test_remote_reward_token_from_the_environment_is_never_written(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from alignkit.checkpoint import latest_checkpoint, load_checkpoint
    from alignkit.rewards.compression import JpegCompressibility
    from alignkit.trainer import Trainer

    secret = "tok-9f8e7d6c5b4a"
    monkeypatch.setenv("ALIGNKIT_TEST_REWARD_TOKEN", secret)
    with serving(JpegCompressibility(), token=secret) as server:
        cfg = load_run_config("sd3_tiny_flow_grpo", [
            f"output_dir={tmp_path}", "train.epochs=1", "train.prompts_per_epoch=2", "algo.num_seeds=2",
            "train.rollout_batch_size=4", "train.train_batch_size=4", "backbone.num_steps=3",
            "~reward.jpeg_compressibility",
            f"+reward.jpeg={{fn: remote, kwargs: {{url: '{server.url}', token: 'env:ALIGNKIT_TEST_REWARD_TOKEN'}}}}"])
        Trainer(cfg, tensorboard=False).train()
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None
    assert load_checkpoint(ckpt)[1]["config"]["reward"]["jpeg"]["kwargs"]["token"] == "env:ALIGNKIT_TEST_REWARD_TOKEN"
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not [p for p in written if secret.encode() in p.read_bytes()]


# ---------------------------------------------------------------- client settings


REMOTE_SETTING_CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("port_out_of_range", {"url": "http://127.0.0.1:99999"}, ["url='http://127.0.0.1:99999'", "Port out of range"]),
    ("port_not_a_number", {"url": "http://scorer:http"}, ["url='http://scorer:http'", "could not be cast"]),
    ("no_host", {"url": "http://:8900"}, ["url='http://:8900' names no host"]),
    ("query_in_url", {"url": "http://scorer:8900/?key=1"}, ["without ?query", "<url>/score"]),
    ("timeout_nan", {"timeout": float("nan")}, ["timeout=nan", "finite number of seconds > 0"]),
    ("timeout_inf", {"timeout": float("inf")}, ["timeout=inf", "finite"]),
    ("backoff_nan", {"backoff": float("nan")}, ["backoff=nan", ">= 0"]),
    ("retries_bool", {"retries": True}, ["retries=True", "integer >= 0"]),
    ("max_batch_bool", {"max_batch": True}, ["max_batch=True", "integer >= 1"]),
    ("token_with_newline", {"token": "abc\ndef"}, ["RemoteReward token", "visible ASCII"]),
]


@pytest.mark.parametrize(("kwargs", "words"), [c[1:] for c in REMOTE_SETTING_CASES],
                         ids=[c[0] for c in REMOTE_SETTING_CASES])
def test_remote_reward_settings_are_checked_when_built(kwargs: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        RemoteReward(**{"url": "http://127.0.0.1:8900", **kwargs})
    msg = str(info.value)
    for word in words:
        assert word in msg, (word, msg)
    assert "abc\ndef" not in msg


def test_refused_large_batches_get_their_answer_not_a_reset_connection() -> None:
    """The client sends the whole body before it reads the answer: a refusal must not close the connection under
    it (it would see a reset and retry, as if the server were down)."""
    recorder = _Recorder()
    x = torch.rand(8, 3, 512, 512)  # about 8 MB as PNG: more than the socket buffers hold
    with serving(recorder, max_request_bytes=4 * 2**20, token="the-token") as server:
        with pytest.raises(RemoteRewardError, match=r"rejected a batch of 8 with HTTP 401: .*requires a token"):
            RemoteReward(server.url, **FAST)(x, ["a"] * 8, [{}] * 8)
        with pytest.raises(RemoteRewardError, match=r"rejected a batch of 8 with HTTP 413: request of \d+ bytes"):
            RemoteReward(server.url, token="the-token", **FAST)(x, ["a"] * 8, [{}] * 8)
        assert RemoteReward(server.url, token="the-token", max_batch=2, **FAST)(x, ["a"] * 8, [{}] * 8) == [0.5] * 8
    assert recorder.calls == [2, 2, 2, 2]
