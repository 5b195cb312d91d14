"""The real reward server on a thread, for the tests that talk to it over loopback."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from alignkit.reward_server import RewardServer, make_server


@contextlib.contextmanager
def serving(reward: Callable[..., Any], name: str = "test", *, host: str = "127.0.0.1",
            **options: Any) -> Iterator[RewardServer]:
    """``reward`` served as ``name`` on a free port of ``host``; ``options`` go to :func:`make_server`."""
    with on_thread(make_server(reward, host, 0, name, **options)) as server:
        yield server


@contextlib.contextmanager
def on_thread(server: Any) -> Iterator[Any]:
    """Run any ``socketserver`` server's ``serve_forever`` on a daemon thread; shut it down and close it on exit."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
