"""Rewards served by another process: the wire protocol, the server, RemoteReward, ``alignkit serve-reward``.

Every test talks to a real HTTP server on loopback: the reward server on a thread, a subprocess, or a scripted
server that answers outside the protocol on purpose.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from reward_servers import on_thread, serving

from alignkit import cli
from alignkit.config import RewardTermConfig
from alignkit.reward_protocol import (
    EncodedSamples,
    ProtocolError,
    ScoreRequest,
    check_scores,
    decode_samples,
    encode_frames,
    encode_images,
    encode_png,
    encode_scores,
    encode_text,
)
from alignkit.reward_server import to_reward_input
from alignkit.reward_set import RewardSet, RewardTerm, resolve_reward
from alignkit.rewards.common import to_uint8
from alignkit.rewards.compression import JpegCompressibility
from alignkit.rewards.remote import RemoteReward, RemoteRewardError, encode_batch

REPO = Path(__file__).resolve().parents[1]
FAST = {"timeout": 2.0, "retries": 2, "backoff": 0.01}  # client settings for servers that answer at once


def _json_roundtrip(samples: EncodedSamples) -> EncodedSamples:
    return EncodedSamples.from_json(json.loads(json.dumps(samples.to_json())))


class _Recorder:
    """Wraps a reward and records the batch size of every call."""

    def __init__(self, reward: Callable[..., Any]) -> None:
        self.reward = reward
        self.batches: list[int] = []

    def __call__(self, samples: Any, prompts: list[str], metadata: list[dict[str, Any]]) -> Any:
        self.batches.append(len(prompts))
        return self.reward(samples, prompts, metadata)


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- protocol


def test_png_roundtrip_is_exact_for_uint8():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 17, 23, 3), dtype=np.uint8)
    frames = rng.integers(0, 256, size=(2, 4, 8, 9, 3), dtype=np.uint8)
    assert np.array_equal(decode_samples(_json_roundtrip(encode_images(images))), images)
    assert np.array_equal(decode_samples(_json_roundtrip(encode_frames(frames))), frames)
    texts = ["a red cube", "ünïcödé ✓", ""]
    assert decode_samples(_json_roundtrip(encode_text(texts))) == texts


def test_float_samples_reach_the_reward_as_their_uint8_quantisation():
    x = _images(4, 16)
    got = to_reward_input(decode_samples(_json_roundtrip(encode_batch(x, "images"))), "images")
    expected = torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).float() / 255
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert torch.equal(got, expected)
    assert (got - x).abs().max() <= 0.5 / 255 + 1e-7
    video = torch.rand(2, 3, 3, 8, 8)  # [B, F, 3, H, W]
    got = to_reward_input(decode_samples(_json_roundtrip(encode_batch(video, "frames"))), "frames")
    assert got.shape == video.shape and (got - video).abs().max() <= 0.5 / 255 + 1e-7


def test_scores_on_the_wire():
    assert encode_scores([1.5, None, math.nan, math.inf, -2.0]) == {"version": 1,
                                                                     "scores": [1.5, None, None, None, -2.0]}
    assert check_scores(torch.tensor([1.0, float("nan")]), 2, "r") == [1.0, None]
    assert check_scores(np.array([0.25], dtype=np.float32), 1, "r") == [0.25]
    with pytest.raises(ProtocolError, match="r returned 1 scores for 2 samples"):
        check_scores([1.0], 2, "r")
    with pytest.raises(ProtocolError, match=r"scores\[0\].*True"):
        check_scores([True], 1, "r")


def test_unserialisable_metadata_is_named():
    request = ScoreRequest(["a", "b"], [{}, {"t": torch.zeros(1)}], encode_text(["x", "y"]))
    with pytest.raises(ValueError, match=r"metadata\[1\] cannot be sent"):
        request.to_bytes()


# ---------------------------------------------------------------- server + client


def test_remote_scores_equal_direct_and_batches_are_split():
    reward = JpegCompressibility()
    recorder = _Recorder(reward)
    x = _images(10)
    prompts, metadata = [f"p{i}" for i in range(10)], [{"i": i} for i in range(10)]
    with serving(recorder, "jpeg") as server:
        remote = RemoteReward(server.url, max_batch=4, **FAST)
        assert remote.health() == {"status": "ok", "name": "jpeg", "version": 1}
        scores = remote(x, prompts, metadata)
    assert recorder.batches == [4, 4, 2]
    assert scores == reward(x, prompts, metadata)  # exact: the reward sees the same uint8 pixels


def test_prompts_metadata_frames_and_text_reach_the_reward():
    def by_prompt(samples: Any, prompts: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        return [len(p) + m["w"] for p, m in zip(prompts, metadata)]

    def video_mean(samples: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> torch.Tensor:
        assert samples.dim() == 5
        return samples.mean(dim=(1, 2, 3, 4))

    def text_len(samples: list[str], prompts: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        return [float(len(s)) for s in samples]

    prompts, metadata = ["a", "bb", "ccc"], [{"w": 0.5}, {"w": 1.5}, {"w": -1.0}]
    with serving(by_prompt) as server:
        assert RemoteReward(server.url, **FAST)(_images(3), prompts, metadata) == [1.5, 3.5, 2.0]
    video = torch.rand(3, 2, 3, 8, 8)
    quantised = torch.from_numpy(to_uint8(video.reshape(6, 3, 8, 8))).float().div(255).reshape(3, 2, 8, 8, 3)
    with serving(video_mean) as server:
        got = RemoteReward(server.url, max_batch=2, **FAST)(video, prompts, metadata)
    assert got == pytest.approx(quantised.mean(dim=(1, 2, 3, 4)).tolist(), abs=1e-6)
    with serving(text_len) as server:
        assert RemoteReward(server.url, kind="text", **FAST)(["x", "yy", "ünï"], prompts, metadata) == [1, 2, 3]


def test_none_and_nan_round_trip_and_are_masked():
    def partial(samples: Any, prompts: list[str], metadata: list[dict[str, Any]]) -> list[Any]:
        return [1.5, None, math.nan, math.inf, -2.0, np.float32(0.25)]

    with serving(partial) as server:
        remote = RemoteReward(server.url, **FAST)
        assert remote(_images(6), ["p"] * 6, [{}] * 6) == [1.5, None, None, None, -2.0, 0.25]
        table = RewardSet([RewardTerm("remote", remote, 1.0)]).score(_images(6), ["p"] * 6, [{}] * 6)
    assert table.invalid["remote"] == 3
    assert torch.isnan(table.raw["remote"]).tolist() == [False, True, True, True, False, False]


@pytest.mark.parametrize(
    ("reward_out", "match"),
    [("raise", "reward 'bad' raised ValueError: boom"), ("short", "reward 'bad' returned 1 scores for 2 samples")],
)
def test_reward_failures_are_500s_retried_then_raised(reward_out: str, match: str):
    calls = []

    def bad(samples: Any, prompts: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        calls.append(1)
        if reward_out == "raise":
            raise ValueError("boom")
        return [1.0]

    with serving(bad, "bad") as server, pytest.raises(RemoteRewardError, match=match) as info:
        RemoteReward(server.url, **FAST)(_images(2), ["a", "b"], [{}, {}])
    assert "failed 3 attempt(s)" in str(info.value) and "HTTP 500" in str(info.value)
    assert len(calls) == 3


def _png_of(mode: str) -> str:
    buf = io.BytesIO()
    Image.new(mode, (4, 4)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


_GOOD = {"version": 1, "prompts": ["a"], "metadata": [{}],
         "samples": {"kind": "images", "encoding": "png_base64", "data": [encode_png(np.zeros((4, 4, 3), np.uint8))]}}


_DELETE = object()


def _with(path: str, value: Any) -> bytes:
    """``_GOOD`` with the field at ``path`` (dotted) set to ``value`` or deleted."""
    body = json.loads(json.dumps(_GOOD))
    *parents, last = path.split(".")
    node = body
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"version": 1, "prompts": [NaN]}', "NaN"),
        (b"[1, 2]", "JSON object"),
        (_with("prompts", _DELETE), "prompts: missing"),
        (_with("version", 2), "version: 2 is not supported"),
        (_with("prompts", "a"), "prompts: expected a list"),
        (_with("prompts", [3]), "prompts[0]: expected a string"),
        (_with("metadata", [[]]), "metadata[0]: expected an object"),
        (_with("metadata", [{}, {}]), "lengths disagree: 1 prompts, 2 metadata, 1 samples"),
        (_with("samples.kind", "audio"), "samples.kind: 'audio' is not a sample kind"),
        (_with("samples.encoding", "jpeg_base64"), "samples.encoding: 'jpeg_base64' is not supported"),
        (_with("samples.data", [7]), "samples.data[0]: expected a string"),
        (_with("samples.data", ["%%%"]), "samples.data[0]: not valid base64"),
        (_with("samples.data", ["aGVsbG8="]), "samples.data[0]: not a readable PNG"),
        (_with("samples.data", [_png_of("RGBA")]), "samples.data[0]: PNG mode is 'RGBA'"),
    ],
)
def test_bad_requests_get_400_naming_the_field(body: bytes, field: str):
    recorder = _Recorder(lambda s, p, m: [0.0] * len(p))
    with serving(recorder) as server:
        status, reply = _post(f"{server.url}/score", body)
    assert status == 400
    assert field in reply["error"]
    assert recorder.batches == []


def test_server_rejects_mixed_sizes_wrong_paths_and_large_bodies():
    mixed = {**_GOOD, "prompts": ["a", "b"], "metadata": [{}, {}],
             "samples": {**_GOOD["samples"], "data": [encode_png(np.zeros((4, 4, 3), np.uint8)),
                                                      encode_png(np.zeros((4, 5, 3), np.uint8))]}}
    with serving(lambda s, p, m: [0.0] * len(p), max_request_bytes=4000) as server:
        status, reply = _post(f"{server.url}/score", json.dumps(mixed).encode())
        assert status == 400 and "samples.data[1]: shape (4, 5, 3) differs" in reply["error"]
        assert _post(f"{server.url}/nope", b"{}")[0] == 404
        # the client does not retry a 4xx and passes on the server's message
        t0 = time.perf_counter()
        with pytest.raises(RemoteRewardError, match=r"HTTP 413: request of \d+ bytes exceeds"):
            RemoteReward(server.url, timeout=2.0, retries=3, backoff=1.0)(_images(4, 64), ["a"] * 4, [{}] * 4)
        with pytest.raises(RemoteRewardError, match=rf"{server.url}/v2/score .*HTTP 404"):
            RemoteReward(f"{server.url}/v2", timeout=2.0, retries=3, backoff=1.0)(_images(1), ["a"], [{}])
        assert time.perf_counter() - t0 < 1.0


def test_hanging_server_times_out_within_bound():
    def hang(samples: Any, prompts: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        time.sleep(1.5)
        return [0.0] * len(prompts)

    timeout, retries, backoff = 0.3, 2, 0.05
    with serving(hang) as server:
        t0 = time.perf_counter()
        with pytest.raises(RemoteRewardError, match=r"failed 3 attempt\(s\).*timed out after 0.3 s"):
            RemoteReward(server.url, timeout=timeout, retries=retries, backoff=backoff)(_images(1), ["a"], [{}])
        elapsed = time.perf_counter() - t0
    bound = timeout * (retries + 1) + backoff * (2**retries - 1)
    assert timeout * (retries + 1) <= elapsed < bound + 1.0


# ---------------------------------------------------------------- a server outside the protocol


class _Scripted(ThreadingHTTPServer):
    """Answers POSTs with ``replies`` in turn (the last one repeats); counts requests."""

    daemon_threads = True

    def __init__(self, replies: list[tuple[int, Any]]) -> None:
        self.replies = replies
        self.requests = 0
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ScriptedHandler(BaseHTTPRequestHandler):
    server: _Scripted

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        status, body = self.server.replies[min(self.server.requests, len(self.server.replies) - 1)]
        self.server.requests += 1
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextlib.contextmanager
def _scripted(replies: list[tuple[int, Any]]) -> Iterator[_Scripted]:
    with on_thread(_Scripted(replies)) as server:
        yield server


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (b"<html>oops</html>", "answered with a body that is not valid JSON"),
        (b'{"version": 1, "scores": [NaN, 1, 2, 3]}', "not valid JSON.*NaN"),
        ([1, 2, 3, 4], "answered with list"),
        ({"version": 2, "scores": [1, 2, 3, 4]}, "protocol version 2"),
        ({"version": 1}, "without a scores field"),
        ({"version": 1, "scores": [1, 2, 3]}, "returned 3 scores for 4 samples"),
        ({"version": 1, "scores": "1234"}, "returned str"),
        ({"version": 1, "scores": [1, "a", None, 2]}, r"returned 'a' \(str\) for sample 1"),
        ({"version": 1, "scores": [1, True, None, 2]}, r"returned True \(bool\) for sample 1"),
    ],
)
def test_malformed_answers_raise_at_once_naming_the_url(reply: Any, match: str):
    with _scripted([(200, reply)]) as server, pytest.raises(RemoteRewardError, match=match) as info:
        RemoteReward(server.url, **FAST)(_images(4, 8), ["a"] * 4, [{}] * 4)
    assert f"remote reward {server.url}/score" in str(info.value)
    assert server.requests == 1


def test_5xx_is_retried_and_4xx_is_not():
    ok = {"version": 1, "scores": [0.5, None]}
    with _scripted([(500, {"error": "warming up"}), (503, b"busy"), (200, ok)]) as server:
        assert RemoteReward(server.url, **FAST)(_images(2, 8), ["a", "b"], [{}, {}]) == [0.5, None]
        assert server.requests == 3
    with _scripted([(502, b"bad gateway")]) as server, \
            pytest.raises(RemoteRewardError, match=r"failed 3 attempt\(s\).*last error: HTTP 502: bad gateway"):
        RemoteReward(server.url, **FAST)(_images(2, 8), ["a", "b"], [{}, {}])
    assert server.requests == 3
    with _scripted([(400, {"error": "prompts[0]: expected a string"})]) as server, \
            pytest.raises(RemoteRewardError, match=r"HTTP 400: prompts\[0\]: expected a string"):
        RemoteReward(server.url, **FAST)(_images(2, 8), ["a", "b"], [{}, {}])
    assert server.requests == 1


def test_client_settings_resolution_and_sample_checks():
    for kwargs, match in [({"url": "localhost:8900"}, "url="), ({"timeout": 0}, "timeout=0"),
                          ({"retries": -1}, "retries=-1"), ({"max_batch": 0}, "max_batch=0"),
                          ({"kind": "video"}, "kind='video'")]:
        with pytest.raises(ValueError, match=match):
            RemoteReward(**{"url": "http://127.0.0.1:1", **kwargs})
    term = RewardTermConfig(fn="alignkit.rewards.remote:RemoteReward",
                            kwargs={"url": "http://127.0.0.1:1", "max_batch": 8})
    resolved = resolve_reward("judge", term)
    assert isinstance(resolved, RemoteReward) and resolved.max_batch == 8
    remote = RemoteReward("http://127.0.0.1:1", kind="text")
    with pytest.raises(ValueError, match=r"kind='text'.*look like 'images'"):
        remote(_images(1), ["a"], [{}])
    with pytest.raises(ValueError, match="1 samples, 2 prompts"):
        remote(["x"], ["a", "b"], [{}])


# ---------------------------------------------------------------- separate processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _terminal_sigint() -> None:
    """In the child before exec: Ctrl-C reaches the server as it would from a terminal. An ignored or blocked
    SIGINT is inherited across exec (Python then installs no KeyboardInterrupt handler, or never sees the signal);
    in the full suite the server once ignored Ctrl-C for over a minute, never alone."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _launch(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    """Start ``python ARGS`` serving on a free loopback port (``--port N``, or ``argv[1]`` for ``-c``)."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, *args, *([str(port)] if args[0] == "-c" else ["--port", str(port)])]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_terminal_sigint)
    return proc, f"http://127.0.0.1:{port}"


def _wait_ready(proc: subprocess.Popen[str], url: str, limit: float = 60.0) -> None:
    """Poll ``/health`` until the server answers."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            RemoteReward(url, timeout=1.0).health()
            return
        except RemoteRewardError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"server at {url} did not answer /health within {limit:g} s")


_CLI_ARGS = ["-m", "alignkit.cli", "serve-reward", "jpeg_compressibility", "--kwargs", '{"quality": 50}']
_DYING_SERVER = """
import os, sys
from alignkit.reward_server import serve
calls = []
def reward(samples, prompts, metadata):
    calls.append(len(prompts))
    if len(calls) == 2:
        os._exit(3)  # the process dies in the middle of the second request
    return samples.mean(dim=(1, 2, 3)).tolist()
serve(reward, "127.0.0.1", int(sys.argv[1]), "dying")
"""
_PROCESS_TESTS = {"test_cli_serve_reward_subprocess": _CLI_ARGS,
                  "test_server_that_dies_mid_run_raises_after_retries": ["-c", _DYING_SERVER]}


@pytest.fixture(scope="module", autouse=True)
def processes(request: pytest.FixtureRequest) -> Iterator[dict[str, tuple[subprocess.Popen[str], str]]]:
    """Start the server processes of the selected process tests at once: they import torch while the other
    tests run."""
    selected = {item.originalname for item in request.session.items if item.module is request.module}
    launched = {name: _launch(args) for name, args in _PROCESS_TESTS.items() if name in selected}
    yield launched
    for proc, _ in launched.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_cli_serve_reward_subprocess(processes: dict[str, tuple[subprocess.Popen[str], str]]):
    proc, url = processes["test_cli_serve_reward_subprocess"]
    _wait_ready(proc, url)
    try:
        remote = RemoteReward(url, max_batch=3, **FAST)
        assert remote.health()["name"] == "jpeg_compressibility"
        x = _images(5)
        assert remote(x, ["a"] * 5, [{}] * 5) == JpegCompressibility(quality=50)(x, ["a"] * 5, [{}] * 5)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C stops the server cleanly
        # generous: a loaded 2-core CI machine once needed over 10 s for the interpreter's shutdown
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "serving reward 'jpeg_compressibility' on " + url in stderr
    assert "scored 3 images" in stderr and "scored 2 images" in stderr


def test_cli_serve_reward_rejects_bad_kwargs():
    assert cli.main(["serve-reward", "jpeg_compressibility", "--kwargs", "{quality: 50}"]) == 2
    assert cli.main(["serve-reward", "jpeg_compressibility", "--kwargs", "[50]"]) == 2
    assert cli.main(["serve-reward", "jpeg_compressibility", "--kwargs", '{"quality": 0}']) == 2
    assert cli.main(["serve-reward", "no_such_reward"]) == 2


def test_server_that_dies_mid_run_raises_after_retries(processes: dict[str, tuple[subprocess.Popen[str], str]]):
    proc, url = processes["test_server_that_dies_mid_run_raises_after_retries"]
    _wait_ready(proc, url)
    try:
        remote = RemoteReward(url, timeout=2.0, retries=2, backoff=0.05, max_batch=2)
        t0 = time.perf_counter()
        with pytest.raises(RemoteRewardError, match=r"failed 3 attempt\(s\) on a batch of 2; last error: .*Refused"):
            remote(_images(6), ["a"] * 6, [{}] * 6)
        assert time.perf_counter() - t0 < 2.0
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    assert proc.returncode == 3
