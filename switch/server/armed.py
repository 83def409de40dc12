"""Pre-stored ("armed") reversals: written durably BEFORE an acquirer request leaves.

Why: between writing a request to the acquirer and committing its outcome to the ledger the switch can
crash. If the acquirer approved, money moved that the ledger does not show. So the processor hands the
reversal of every request along with it (`SendToAcquirer.reversal`); the server stores it here first
(one fdatasync per group of requests), and every armed reversal is later either fired (`QueueReversal`
moves it to store-and-forward) or released (`ReleaseReversal`, the outcome is durable). At start-up the
armed ones still here are given to the processor (`Recovered.armed`), which fires those the ledger does
not explain.

Card data: the reversal needs the PAN, so it is kept sealed (switch.codec.sealing, AES-256-GCM under a
data key derived from the KEK, bound to the record's acquirer and RRN); track data, PIN block, ICC data
and MACs are never written. Records under a previous KEK are re-sealed when the store is opened with
that KEK listed as previous; every record must open, or the start stops with a clear error.

Storage: an append-only log in two preallocated slot files, `<path>` and `<path>-b`. Why not SQLite (the
store until session 6): an arm is on the path of every purchase, and an SQLite transaction for a few
small rows wrote ~6 WAL pages (table, primary-key index, secure_delete zeroing) in ~13 pwrite and ~6
lock calls, and every ~1,000 pages a WAL checkpoint (two more fsyncs) landed inside some arm's commit.
Here a group of arms is one pwrite and one fdatasync into a region already allocated and zero-filled,
so the fdatasync writes no file-system metadata (docs/performance.md, session 6).

Format: a slot starts with a header block (`MAGIC`, generation, CRC-32 of both); records follow from
`HEADER_BYTES`: CRC-32 (u32) | body length (u32) | kind (u8, `ARM` or `RELEASE`) | body, the CRC taken
over the slot's generation, the kind and the body, so a record left from an older use of the slot never
reads as current. Reading stops at the first record that does not check (zeros, or a write torn by a
crash), as SQLite's WAL does: an arm is acknowledged only after the fdatasync that covers it and
everything before it, so every acknowledged arm lies before that point.

Slots: when a group does not fit, the live set (reversals armed and not released: requests in flight)
is written to the other slot under the next generation and synced, then that slot's header is written
and synced. That header write is the switch; a crash before it leaves the old slot current and whole.
The old slot is then overwritten with zeros, so the sealed bytes of released reversals stay on disk for
at most one slot's worth of appends.

Releases are written without waiting for the fdatasync (the next arm's covers them): a release lost in
a crash only leaves a spurious armed record, which recovery resolves against the ledger.

One writer: the first write takes an exclusive lock (`<path>.lock`, flock) for the store's life. A
process that only reads (the switch at start-up while its ledger process writes, `switch keys check`)
never takes it. A file of the SQLite store found at `path` is migrated once (switch.server.armed_legacy).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import struct
import threading
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from switch.codec.keys import Kek
from switch.codec.sealing import FieldSealer, SealingError, row_context
from switch.config import MIN_ARMED_SLOT_BYTES
from switch.server import armed_legacy

#: Purpose of this store's data keys (each store derives its own).
SEAL_PURPOSE = "armed"
#: First bytes of a slot file.
MAGIC = b"SWARMLG1"
#: The header block of a slot; records start after it.
HEADER_BYTES = 4096
#: Size each slot file is preallocated to (zero-filled) unless configured (`server.armed_slot_bytes`).
DEFAULT_SLOT_BYTES = 4 * 1024 * 1024
#: Suffixes of the two slot files after `path`.
SLOT_SUFFIXES = ("", "-b")
#: Record kinds.
ARM, RELEASE = 0x41, 0x52

_HEAD = struct.Struct("<8sQI")  # magic, generation, CRC-32 of the two
_REC = struct.Struct("<IIB")  # CRC-32, body length, kind
_ARM_BODY = struct.Struct("<HHq")  # acquirer bytes, rrn bytes, created_ms; then acquirer, rrn, sealed
_REL_BODY = struct.Struct("<HH")  # acquirer bytes, rrn bytes; then acquirer, rrn
_ZEROS = bytes(1 << 20)

#: (acquirer, rrn) -> (sealed fields, created_ms), in arming order.
Live = dict[tuple[str, str], tuple[bytes, int]]
#: A prepared operation: (is arm, acquirer, rrn, sealed fields or b"", created_ms).
_Op = tuple[bool, str, str, bytes, int]


class ArmedStoreError(RuntimeError):
    """The armed-reversal file cannot be used; the message names the path."""


class ArmedStore:
    """Armed reversals in an append-only log (two slot files). Card data: the PAN is kept sealed under a
    data key derived from `kek` (`previous_keks` only open: KEK rotation); track data, PIN block, ICC
    data and MACs are dropped before writing. Thread-safe; one writing process at a time."""

    def __init__(
        self,
        path: str | Path,
        *,
        kek: Kek,
        previous_keks: Iterable[Kek] = (),
        slot_bytes: int = DEFAULT_SLOT_BYTES,
    ) -> None:
        if slot_bytes < MIN_ARMED_SLOT_BYTES:
            raise ValueError(f"armed slot_bytes must be >= {MIN_ARMED_SLOT_BYTES}, got {slot_bytes}")
        self.path = str(path)
        self.slot_bytes = slot_bytes
        self._sealer = FieldSealer(kek, SEAL_PURPOSE, previous=previous_keks)
        self._paths = tuple(self.path + s for s in SLOT_SUFFIXES)
        self._lock = threading.Lock()
        self._fds = [-1, -1]
        self._lock_fd = -1
        self._current = 0
        self._generation = 0  # 0: nothing committed yet
        self._head = HEADER_BYTES
        self._sizes = [0, 0]
        self._broken = ""
        self._live: Live = {}
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with self._lock:
                if armed_legacy.is_sqlite(self.path):
                    self._migrate()
                else:
                    self._load()
                    self._reseal_if_needed()
        except (OSError, SealingError, sqlite3.Error, ArmedStoreError) as exc:
            self._close_files()
            if isinstance(exc, ArmedStoreError):
                raise
            raise ArmedStoreError(f"armed reversals file {self.path}: {exc}") from None

    # --- the interface the server uses ------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._close_files()

    def arm_many(self, items: Iterable[tuple[str, str, Mapping[str, Any] | None]], now_ms: int) -> None:
        """Store (acquirer, rrn, reversal fields) durably; returns after the fdatasync."""
        self.apply((True, (acq, rrn, f, now_ms)) for acq, rrn, f in items)

    def release_many(self, items: Iterable[tuple[str, str]]) -> None:
        self.apply((False, item) for item in items)

    def apply(self, ops: Iterable[tuple[bool, Any]]) -> None:
        """Arms `(True, (acquirer, rrn, fields, now_ms))` and releases `(False, (acquirer, rrn))` in
        the given order, in one write: durable (fdatasync) before returning when it holds an arm.

        The durable writer (switch.server.durable) and the ledger process group everything queued
        meanwhile into one call. ArmedStoreError when it cannot be written: the arms are then not
        durable and their requests must not leave."""
        prepared: list[_Op] = []
        any_arm = False
        seal = self._sealer.seal
        for is_arm, item in ops:
            if is_arm:
                acq, rrn, fields, now_ms = item
                if fields is None:
                    continue
                prepared.append((True, acq, rrn, seal(fields, _context(acq, rrn)), int(now_ms)))
                any_arm = True
            else:
                prepared.append((False, item[0], item[1], b"", 0))
        if not prepared:
            return
        with self._lock:
            self._writable()
            data = _encode(prepared, self._generation)
            if self._head + len(data) > self._sizes[self._current]:
                live = dict(self._live)
                _apply_to(live, prepared)
                self._rotate(live)
                return
            fd = self._fds[self._current]
            try:
                _pwrite_all(fd, data, self._head)
                if any_arm:
                    os.fdatasync(fd)
            except OSError as exc:
                raise self._break(exc) from None
            self._head += len(data)
            _apply_to(self._live, prepared)

    def all(self) -> list[tuple[str, str, dict[str, str]]]:
        """Every armed reversal, opened, oldest first (recovery); ArmedStoreError names a record that
        does not open. What this store read when opened plus what it wrote since."""
        with self._lock:
            items = sorted(self._live.items(), key=lambda kv: kv[1][1])
        try:
            return [(a, r, self._sealer.open(sealed, _context(a, r))) for (a, r), (sealed, _) in items]
        except SealingError as exc:
            raise ArmedStoreError(f"armed reversals file {self.path}: {exc}") from None

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)

    # --- reading ----------------------------------------------------------------------------------
    def _load(self) -> None:
        """The live set of the current slot: the valid slot with the highest generation."""
        best: tuple[int, int] | None = None
        unreadable: list[str] = []
        for i, p in enumerate(self._paths):
            try:
                with open(p, "rb") as f:
                    head = f.read(_HEAD.size)
            except FileNotFoundError:
                continue
            gen = _header_generation(head)
            if gen is None:
                unreadable.append(p)
            elif gen and (best is None or gen > best[1]):
                best = (i, gen)
        if best is None:
            if unreadable:
                raise ArmedStoreError(f"armed reversals file {unreadable[0]}: not an armed-reversal log")
            self._live, self._generation, self._head = {}, 0, HEADER_BYTES
            return
        i, gen = best
        with open(self._paths[i], "rb") as f:
            data = f.read()
        try:
            self._live, self._head = _replay(data, gen)
        except (struct.error, UnicodeDecodeError, ValueError) as exc:
            raise ArmedStoreError(f"armed reversals file {self._paths[i]}: bad record ({exc})") from None
        self._current, self._generation = i, gen
        self._sizes[i] = len(data)

    def _reseal_if_needed(self) -> None:
        """Open every record (SealingError stops the start); re-seal under the current KEK those sealed
        under a previous one, in a new generation (the old slot is then zeroed)."""
        stale = False
        for (acq, rrn), (sealed, _) in self._live.items():
            self._sealer.open(sealed, _context(acq, rrn))
            stale = stale or not self._sealer.sealed_under_current_kek(sealed)
        if not stale:
            return
        self._writable()  # reloads under the writer's lock
        reseal = self._sealer.seal
        live: Live = {}
        for (acq, rrn), (sealed, created) in self._live.items():
            ctx = _context(acq, rrn)
            live[acq, rrn] = (reseal(self._sealer.open(sealed, ctx), ctx), created)
        self._rotate(live)

    def _migrate(self) -> None:
        """Move the rows of an SQLite store at `path` into a log, then scrub the old file."""
        self._take_writer_lock()
        rows = armed_legacy.read_rows(self.path, self._sealer, _context)
        live: Live = {(a, r): (self._sealer.seal(f, _context(a, r)), created) for a, r, f, created in rows}
        self._fds[1] = self._open_slot(1, 0)
        self._current, self._generation, self._head = 0, 0, HEADER_BYTES  # slot 0 is the old file: untouched
        self._rotate(live)  # into slot 1, generation 1
        armed_legacy.scrub(self.path)
        self._fds[0] = self._open_slot(0, 0)

    # --- writing ----------------------------------------------------------------------------------
    def _take_writer_lock(self) -> None:
        if self._lock_fd >= 0:
            return
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ArmedStoreError(
                f"armed reversals file {self.path}: in use by another process (a running switch?)"
            ) from None
        self._lock_fd = fd

    def _writable(self) -> None:
        """Become the writer: the lock, the state as on disk now, both slots open; a first slot
        committed (generation 1) when nothing was."""
        if self._broken:
            raise ArmedStoreError(f"armed reversals file {self.path}: {self._broken}")
        if self._fds[self._current] >= 0:
            return
        try:
            self._take_writer_lock()
            self._load()
            for i in (0, 1):
                self._fds[i] = self._open_slot(i, 0)
            if self._generation == 0:
                self._current = 1  # so that the first generation goes to slot 0
                self._rotate({})
        except OSError as exc:
            self._close_files()
            raise ArmedStoreError(f"armed reversals file {self.path}: {exc}") from None

    def _open_slot(self, i: int, min_bytes: int) -> int:
        """Open slot `i` (created if missing), zero-filled to at least max(slot_bytes, min_bytes)."""
        path = self._paths[i]
        created = not os.path.exists(path)
        fd = self._fds[i] if self._fds[i] >= 0 else os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        size = os.fstat(fd).st_size
        want = max(self.slot_bytes, min_bytes)
        if size < want:
            pos = size
            while pos < want:
                pos += os.pwrite(fd, _ZEROS[: min(len(_ZEROS), want - pos)], pos)
            os.fsync(fd)  # the size changed: metadata too
            size = want
        if created:
            _sync_dir(path)
        self._sizes[i] = size
        return fd

    def _rotate(self, live: Live) -> None:
        """Write `live` to the other slot under the next generation, switch to it, zero the old one."""
        target, gen = 1 - self._current, self._generation + 1
        body = _encode([(True, a, r, sealed, created) for (a, r), (sealed, created) in live.items()], gen)
        try:
            need = HEADER_BYTES + len(body)
            if need > self._sizes[target] // 2:  # room for the live set and at least as much again
                self._fds[target] = self._open_slot(target, 2 * need)
            fd = self._fds[target]
            _pwrite_all(fd, body, HEADER_BYTES)
            os.fdatasync(fd)
            _pwrite_all(fd, _header(gen), 0)
            os.fdatasync(fd)
        except OSError as exc:
            raise self._break(exc) from None
        old, old_head = self._current, self._head
        self._current, self._generation, self._head, self._live = target, gen, need, live
        old_fd = self._fds[old]
        if old_fd >= 0 and old_head > HEADER_BYTES:
            try:  # scrub released records; no sync needed: a stale record never checks again
                pos = HEADER_BYTES
                while pos < old_head:
                    pos += os.pwrite(old_fd, _ZEROS[: min(len(_ZEROS), old_head - pos)], pos)
            except OSError as exc:
                raise self._break(exc) from None

    def _break(self, exc: OSError) -> ArmedStoreError:
        """After a failed write or sync the file's state is unknown: refuse every later write."""
        self._broken = f"unusable after a failed write ({exc}); restart the switch"
        return ArmedStoreError(f"armed reversals file {self.path}: write failed: {exc}")

    def _close_files(self) -> None:
        for i, fd in enumerate(self._fds):
            if fd >= 0:
                os.close(fd)
                self._fds[i] = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the writer lock
            self._lock_fd = -1


def _context(acquirer: str, rrn: str) -> bytes:
    """The identity a sealed armed reversal is bound to (acquirer and RRN)."""
    return row_context(SEAL_PURPOSE, acquirer, rrn)


def _seeds(generation: int) -> tuple[int, int]:
    """CRC-32 starting values of ARM and RELEASE records in a slot of `generation`."""
    g = zlib.crc32(generation.to_bytes(8, "little"))
    return zlib.crc32(bytes((ARM,)), g), zlib.crc32(bytes((RELEASE,)), g)


def _header(generation: int) -> bytes:
    crc = zlib.crc32(MAGIC + generation.to_bytes(8, "little"))
    return _HEAD.pack(MAGIC, generation, crc)


def _header_generation(head: bytes) -> int | None:
    """The generation of a slot header; 0 for a header never written (zeros); None if not a header."""
    if len(head) < _HEAD.size or head == bytes(len(head)):
        return 0
    magic, gen, crc = _HEAD.unpack_from(head)
    if magic != MAGIC or crc != zlib.crc32(MAGIC + gen.to_bytes(8, "little")):
        return None
    return gen


def _encode(ops: list[_Op], generation: int) -> bytes:
    arm_seed, rel_seed = _seeds(generation)
    out: list[bytes] = []
    for is_arm, acq, rrn, sealed, created in ops:
        a, r = acq.encode(), rrn.encode()
        if is_arm:
            body = b"".join((_ARM_BODY.pack(len(a), len(r), created), a, r, sealed))
            out.append(_REC.pack(zlib.crc32(body, arm_seed), len(body), ARM))
        else:
            body = b"".join((_REL_BODY.pack(len(a), len(r)), a, r))
            out.append(_REC.pack(zlib.crc32(body, rel_seed), len(body), RELEASE))
        out.append(body)
    return b"".join(out)


def _replay(data: bytes, generation: int) -> tuple[Live, int]:
    """The live set after every record of `generation` from HEADER_BYTES on, and where they end."""
    arm_seed, rel_seed = _seeds(generation)
    live: Live = {}
    pos, end = HEADER_BYTES, len(data)
    view = memoryview(data)
    while pos + _REC.size <= end:
        crc, length, kind = _REC.unpack_from(data, pos)
        start, stop = pos + _REC.size, pos + _REC.size + length
        if length == 0 or stop > end:
            break
        body = view[start:stop]
        if kind == ARM and zlib.crc32(body, arm_seed) == crc:
            na, nr, created = _ARM_BODY.unpack_from(body)
            k = _ARM_BODY.size
            key = (bytes(body[k : k + na]).decode(), bytes(body[k + na : k + na + nr]).decode())
            live.pop(key, None)  # re-armed: its new place in arming order
            live[key] = (bytes(body[k + na + nr :]), created)
        elif kind == RELEASE and zlib.crc32(body, rel_seed) == crc:
            na, nr = _REL_BODY.unpack_from(body)
            k = _REL_BODY.size
            live.pop((bytes(body[k : k + na]).decode(), bytes(body[k + na : k + na + nr]).decode()), None)
        else:
            break  # zeros past the end, a torn write, or a record of an older generation
        pos = stop
    return live, pos


def _apply_to(live: Live, ops: list[_Op]) -> None:
    for is_arm, acq, rrn, sealed, created in ops:
        if is_arm:
            live.pop((acq, rrn), None)
            live[acq, rrn] = (sealed, created)
        else:
            live.pop((acq, rrn), None)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _sync_dir(path: str) -> None:
    fd = os.open(str(Path(path).parent), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
