"""Terminal listener limits and bad input, over TCP against the real switch."""

from __future__ import annotations

import struct
from pathlib import Path

import trio

from tests.e2e.harness import running_switch, trio_test


async def _closed_within(stream: trio.SocketStream, seconds: float) -> bytes:
    """Everything the switch sends before it closes the connection (fails if it stays open)."""
    got = b""
    with trio.fail_after(seconds):
        while chunk := await stream.receive_some(65536):
            got += chunk
    return got


@trio_test
async def test_connections_beyond_the_limit_are_closed(tmp_path: Path) -> None:
    async with running_switch(tmp_path, listener={"max_connections": 2}, packed_listener=False) as h:
        port = h.ports.listeners["ascii"]
        kept = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        await trio.sleep(0.1)
        third = await trio.open_tcp_stream("127.0.0.1", port)
        assert await _closed_within(third, 2) == b""
        for s in kept:
            await s.aclose()


@trio_test
async def test_idle_connection_is_closed(tmp_path: Path) -> None:
    async with running_switch(tmp_path, listener={"idle_timeout_ms": 200}, packed_listener=False) as h:
        s = await trio.open_tcp_stream("127.0.0.1", h.ports.listeners["ascii"])
        assert await _closed_within(s, 3) == b""


@trio_test
async def test_oversized_frame_header_closes(tmp_path: Path) -> None:
    async with running_switch(tmp_path, listener={"max_frame_bytes": 512}, packed_listener=False) as h:
        s = await trio.open_tcp_stream("127.0.0.1", h.ports.listeners["ascii"])
        await s.send_all(struct.pack(">H", 4000) + b"0200")
        assert await _closed_within(s, 3) == b""


@trio_test
async def test_undecodable_request_with_readable_mti_gets_30(tmp_path: Path) -> None:
    async with running_switch(tmp_path, packed_listener=False) as h:
        s = await trio.open_tcp_stream("127.0.0.1", h.ports.listeners["ascii"])
        payload = b"0200" + b"\xff" * 8 + b"12"  # bitmap names fields the body does not carry
        await s.send_all(struct.pack(">H", len(payload)) + payload)
        with trio.fail_after(3):
            answer = await s.receive_some(65536)
        assert answer[2:6] == b"0210"
        assert b"30" in answer[6:]
        await s.aclose()


@trio_test
async def test_garbage_without_an_mti_closes(tmp_path: Path) -> None:
    async with running_switch(tmp_path, packed_listener=False) as h:
        s = await trio.open_tcp_stream("127.0.0.1", h.ports.listeners["ascii"])
        await s.send_all(struct.pack(">H", 6) + b"\x00garbg")
        assert await _closed_within(s, 3) == b""
