"""A tiny ISO 8583 client for the simulator tests: frames, MAC and field dicts, nothing else; and
`trio_test`, which runs an async test function under trio.run (no pytest-trio plugin is installed)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from switch.codec.wire import FrameReader, MacFn, Wire, WireError, make_mac_fn

MAC_KEY = "0123456789ABCDEFFEDCBA9876543210"


class Client:
    def __init__(self, stream: trio.SocketStream, wire: Wire, mac_fn: MacFn | None = None) -> None:
        self.stream = stream
        self.wire = wire
        self.mac_fn = mac_fn
        self.reader: FrameReader = wire.reader(65_535)
        self.frames: list[bytes] = []

    @classmethod
    async def connect(cls, port: int, mac_key_hex: str = "", profile: str = "acquirer_1987") -> Client:
        mac_fn = make_mac_fn(bytes.fromhex(mac_key_hex)) if mac_key_hex else None
        return cls(await trio.open_tcp_stream("127.0.0.1", port), Wire(profile, "binary2"), mac_fn)

    async def send(self, fields: dict[str, Any]) -> None:
        await self.stream.send_all(self.wire.frame(self.wire.encode(fields, self.mac_fn)))

    async def next_payload(self, timeout_s: float = 10.0) -> bytes | None:
        """The next frame's payload, or None when the peer closed the connection."""
        with trio.fail_after(timeout_s):  # a hang guard, not a speed assertion
            while not self.frames:
                data = await self.stream.receive_some(65_536)
                if not data:
                    return None
                self.frames += [f.payload for f in self.reader.feed(data)]
        return self.frames.pop(0)

    async def receive(self, timeout_s: float = 10.0) -> dict[str, Any]:
        payload = await self.next_payload(timeout_s)
        assert payload is not None, "connection closed"
        fields, mac_ok = self.wire.decode_verified(payload, self.mac_fn)
        assert mac_ok, "answer MAC does not verify"
        return fields

    async def request(self, fields: dict[str, Any]) -> dict[str, Any]:
        await self.send(fields)
        return await self.receive()

    async def aclose(self) -> None:
        await self.stream.aclose()


def trio_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        trio.run(functools.partial(fn, *args, **kwargs))

    return run


__all__ = ["MAC_KEY", "Client", "WireError", "trio_test"]
