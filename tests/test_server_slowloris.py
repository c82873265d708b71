"""The header deadline (``lorakit serve --header-timeout-s``) on a real uvicorn server over a real socket: a
client trickling its request head is disconnected, complete requests and slow bodies are served."""

from __future__ import annotations

import socket
import threading
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")

from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import PlainTextResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from lorakit.server.slowloris import header_deadline_protocol  # noqa: E402

DEADLINE = 0.4


async def _echo(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"got {len(await request.body())}")


def _serve(http):
    app = Starlette(routes=[Route("/", _echo, methods=["GET", "POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    chosen = sock.getsockname()[1]
    sock.close()
    config = uvicorn.Config(app, host="127.0.0.1", port=chosen, log_level="warning", timeout_keep_alive=30, http=http)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    return chosen, server, thread


@pytest.fixture(scope="module")
def port():
    chosen, server, thread = _serve(header_deadline_protocol(DEADLINE))
    yield chosen
    server.should_exit = True
    thread.join(timeout=10)


def test_without_the_deadline_uvicorn_keeps_a_trickling_client():
    # non-vacuity: plain uvicorn (keep-alive timeout 30 s) holds the same connection open
    chosen, server, thread = _serve("h11")
    try:
        s = _connect(chosen)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        assert not _closed_within(s, DEADLINE * 3)
        s.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.settimeout(5)
    return s


def _closed_within(s: socket.socket, seconds: float) -> bool:
    s.settimeout(seconds)
    try:
        return s.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def _read_response(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or not data.split(b"\r\n\r\n", 1)[1]:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_a_trickled_request_head_is_dropped(port):
    s = _connect(port)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # the head never ends
    started = time.monotonic()
    for _ in range(3):
        time.sleep(DEADLINE / 4)
        s.sendall(b"X-Slow: 1\r\n")  # bytes keep coming, the head does not complete
    assert _closed_within(s, 3.0)
    assert time.monotonic() - started < 3.0
    s.close()


def test_complete_requests_and_slow_bodies_are_served(port):
    s = _connect(port)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    first = _read_response(s)
    assert b"200 OK" in first and first.endswith(b"got 0")
    # a complete head, then a body slower than the header deadline: the deadline no longer applies
    s2 = _connect(port)
    s2.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
    time.sleep(DEADLINE * 2)
    s2.sendall(b"hello")
    reply = _read_response(s2)
    assert b"200 OK" in reply and reply.endswith(b"got 5")
    s.close()
    s2.close()


def test_the_next_request_on_a_kept_alive_connection_has_its_own_deadline(port):
    s = _connect(port)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _read_response(s).endswith(b"got 0")
    s.sendall(b"GET / HTTP/1.1\r\n")  # the second head never completes
    assert _closed_within(s, 3.0)
    s.close()


def test_deadline_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        header_deadline_protocol(0)
