"""Answers go to the kernel straight from the trio thread (TerminalConnection.write_now); what a full
socket buffer refuses is finished by the writer task. A terminal that reads slowly still gets every
byte, in order, even when more answers are queued while the writer task is busy."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import trio

from switch.config import ListenerConfig
from switch.server.terminal import TerminalConnection
from tests.e2e.harness import trio_test


@trio_test
async def test_partial_writes_finish_in_order_through_the_writer_task() -> None:
    with socket.socket() as srv:  # a TCP pair on loopback, as terminals connect
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        b = socket.create_connection(srv.getsockname())
        a, _ = srv.accept()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    listener = SimpleNamespace(config=ListenerConfig(name="t", profile="terminal_ascii"))
    conn = TerminalConnection(listener, stream)  # type: ignore[arg-type]
    chunks = [bytes([65 + i % 26]) * 200_000 for i in range(6)]  # far more than the buffers hold
    expected = b"".join(chunks)
    peer = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    got = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn._writer, nursery.cancel_scope)
        for chunk in chunks[:3]:
            assert conn.send(chunk, answers_request=False)
        conn.write_now()  # the kernel takes a part; the rest is left to the writer task
        assert conn._outbox, "the socket buffer should have refused part of it"
        await trio.sleep(0)
        for chunk in chunks[3:]:  # queued while the writer task is mid-send: appended after
            conn.send(chunk, answers_request=False)
            conn.write_now()
        with trio.fail_after(10):
            while len(got) < len(expected):
                got += await peer.receive_some(65_536)
        nursery.cancel_scope.cancel()
    assert bytes(got) == expected
    await peer.aclose()
    await stream.aclose()
