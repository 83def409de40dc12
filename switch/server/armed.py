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

Format: a slot starts with a header block (`MAGIC`, generation, a random salt, CRC-32 of the three);
records follow from `HEADER_BYTES`: CRC-32 (u32) | body length (u32) | kind (u8, `ARM` or `RELEASE`) |
body, the CRC seeded with the slot's generation and salt, so a record left from any other use of the
slot -- an older generation, or a rotation that crashed before its header -- does not read as current
(the main guard is that a rotation zeroes what it does not overwrite; the seed is the second).
Reading stops at the first record that does not check (zeros, or a write torn by a crash), as SQLite's
WAL does: an arm is acknowledged only after the fdatasync that covers it and everything before it, so
every acknowledged arm lies before that point.

Slots: when a group does not fit, the live set (reversals armed and not released: requests in flight)
is written to the other slot under the next generation and synced, then that slot's header is written
and synced. That header write is the switch; a crash before it leaves the old slot current and whole.
The old slot is then overwritten with zeros, so the sealed bytes of released reversals stay on disk for
at most one slot's worth of appends (that zeroing is synced only at a take-over or a re-seal: after
a power loss it is redone at the next start). A process that becomes the writer always starts a new generation
first: whatever a crash left past the last record (a group whose sync never completed, half on disk)
can then never be read as part of the log, and is zeroed with the old slot.

Releases are written without waiting for the fdatasync (the next arm's covers them): a release lost in
a crash only leaves a spurious armed record, which recovery resolves against the ledger.

One writer: the first write takes an exclusive lock (`<path>.lock`, flock) for the store's life. A
process that only reads (the switch at start-up while its ledger process writes, `switch keys check`)
never takes it; it reads again if a rotation changed the headers under it. A file of the SQLite store
found at `path` is migrated once (switch.server.armed_legacy).
"""

from __future__ import annotations

import fcntl
import os
import secrets
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
from switch.server.dirsync import sync_parent_dir

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

_HEAD = struct.Struct("<8sQQI")  # magic, generation, salt, CRC-32 of the three
_REC = struct.Struct("<IIB")  # CRC-32, body length, kind
_ARM_BODY = struct.Struct("<HHq")  # acquirer bytes, rrn bytes, created_ms; then acquirer, rrn, sealed
_REL_BODY = struct.Struct("<HH")  # acquirer bytes, rrn bytes; then acquirer, rrn
_ZEROS = bytes(1 << 20)

#: (acquirer, rrn) -> (sealed fields, created_ms), in arming order.
Live = dict[tuple[str, str], tuple[bytes, int]]
#: What a slot's records are checked against: (generation, salt); generation 0: nothing committed.
Epoch = tuple[int, int]
#: How often a reader reads again when a rotation changed the headers while it read.
READ_ATTEMPTS = 5
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
        self._epoch: Epoch = (0, 0)
        self._head = HEADER_BYTES
        self._sizes = [0, 0]
        #: Per slot, the offset past which it is known to hold only zeros.
        self._dirty = [HEADER_BYTES, HEADER_BYTES]
        self._broken = ""
        self._live: Live = {}
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with self._lock:
                if armed_legacy.pending(self.path):
                    self._migrate()
                else:
                    self._load()
                    self._reseal_if_needed()
        except BaseException as exc:
            self._close_files()  # and the writer lock with them
            if isinstance(exc, ArmedStoreError) or not isinstance(exc, Exception):
                raise
            raise ArmedStoreError(f"armed reversals file {self.path}: {exc}") from None

    @staticmethod
    def exists(path: str | Path) -> bool:
        """Whether a store (either slot file, or an SQLite file to migrate) is at `path`."""
        return any(os.path.exists(f"{path}{s}") for s in SLOT_SUFFIXES) or armed_legacy.pending(str(path))

    # --- the interface the server uses ------------------------------------------------------------
    def take_over(self) -> None:
        """Become the writer now (the lock, a new generation, the old slot scrubbed and synced) rather
        than at the first arm, which would wait for all of that: the process that writes calls it
        at start-up. ArmedStoreError if another process writes."""
        with self._lock:
            self._writable()

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
            data = _encode(prepared, self._epoch)
            if self._head + len(data) > self._sizes[self._current]:
                live = dict(self._live)
                _apply_to(live, prepared)
                self._rotate(live)
                return
            fd = self._fds[self._current]
            try:
                _pwrite_all(fd, data, self._head)
                self._head += len(data)
                self._dirty[self._current] = max(self._dirty[self._current], self._head)
                if any_arm:
                    os.fdatasync(fd)
            except OSError as exc:
                raise self._break(exc) from None
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
    def _load(self, unreadable_ok: bool = False) -> None:
        """The live set of the current slot (the valid slot with the highest generation), read again
        if a writer's rotation changed the headers meanwhile. `unreadable_ok`: a slot whose header does
        not check holds nothing committed (a migration's first header torn by a crash)."""
        for _ in range(READ_ATTEMPTS):
            headers = self._headers()
            state = self._read(headers, unreadable_ok)
            if self._headers() == headers:
                break
        else:
            raise ArmedStoreError(f"armed reversals file {self.path}: changing under the reader; retry")
        live, head, current, epoch, dirty, sizes = state
        self._live, self._head, self._current, self._epoch = live, head, current, epoch
        self._dirty, self._sizes = dirty, sizes

    def _headers(self) -> list[bytes | None]:
        out: list[bytes | None] = []
        for p in self._paths:
            try:
                with open(p, "rb") as f:
                    out.append(f.read(_HEAD.size))
            except FileNotFoundError:
                out.append(None)
        return out

    def _read(
        self, headers: list[bytes | None], unreadable_ok: bool
    ) -> tuple[Live, int, int, Epoch, list[int], list[int]]:
        best: tuple[int, Epoch] | None = None
        unreadable: list[int] = []
        for i, head in enumerate(headers):
            if head is None:
                continue
            epoch = _header_epoch(head)
            if epoch is None:
                unreadable.append(i)
            elif epoch[0] and (best is None or epoch[0] > best[1][0]):
                best = (i, epoch)
        datas = [_read_file(p) for p in self._paths]
        ends = [len(d.rstrip(b"\0")) for d in datas]  # past these, zeros
        dirty = [max(HEADER_BYTES, end) for end in ends]
        sizes = [len(d) for d in datas]
        for i in unreadable:
            # A first header torn by a crash: a preallocated slot, zeros behind the header (no arm is
            # acknowledged before that header is synced). Anything else is not ours to overwrite.
            torn = sizes[i] >= MIN_ARMED_SLOT_BYTES and ends[i] <= _HEAD.size
            if not (torn or unreadable_ok):
                raise ArmedStoreError(f"armed reversals file {self._paths[i]}: not an armed-reversal log")
        if best is None:
            first_target = 0  # the first generation goes to slot 0: "current" is the other one
            return {}, HEADER_BYTES, 1 - first_target, (0, 0), dirty, sizes
        i, epoch = best
        try:
            live, head = _replay(datas[i], epoch)
        except (struct.error, UnicodeDecodeError, ValueError) as exc:
            raise ArmedStoreError(f"armed reversals file {self._paths[i]}: bad record ({exc})") from None
        return live, head, i, epoch, dirty, sizes

    def _reseal_if_needed(self) -> None:
        """Open every record (SealingError stops the start); re-seal under the current KEK those sealed
        under a previous one, in a new generation (the old slot is then zeroed and synced)."""
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
        self._rotate(live, sync_scrub=True)

    def _migrate(self) -> None:
        """Move the rows of an SQLite store of an older switch into the log, then scrub the old file.
        The old file is first set aside under another name (armed_legacy), so slot 0 never shares its
        name and a crash at any step leaves either the old file to read again or a committed log and
        the old file to scrub."""
        self._take_writer_lock()
        old = armed_legacy.set_aside(self.path)
        self._load(unreadable_ok=True)
        if self._epoch[0] == 0:  # not yet committed: the rows go into a first generation
            rows = armed_legacy.read_rows(old, self._sealer, _context)
            live: Live = {
                (a, r): (self._sealer.seal(f, _context(a, r)), created) for a, r, f, created in rows
            }
            for i in (0, 1):
                self._fds[i] = self._open_slot(i, 0)
            self._rotate(live, sync_scrub=True)
        armed_legacy.scrub(old)
        self._reseal_if_needed()  # every record opens (and is under the current KEK), as at any start

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
        """Become the writer: the lock, the state as on disk now, both slots open, and a new
        generation holding the live set, so nothing a crash left behind the last record is ever read
        as part of the log."""
        if self._broken:
            raise ArmedStoreError(f"armed reversals file {self.path}: {self._broken}")
        if self._fds[self._current] >= 0:
            return
        try:
            self._take_writer_lock()
            self._load()
            for i in (0, 1):
                self._fds[i] = self._open_slot(i, 0)
            self._rotate(dict(self._live), sync_scrub=True)
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
            _zero(fd, size, want)
            os.fsync(fd)  # the size changed: metadata too
            size = want
        if created:
            sync_parent_dir(path)
        self._sizes[i] = size
        return fd

    def _rotate(self, live: Live, *, sync_scrub: bool = False) -> None:
        """Write `live` to the other slot under the next generation (a fresh salt), switch to it by
        its header, then zero the old slot (synced when `sync_scrub`: re-seal, take-over)."""
        target = 1 - self._current
        epoch = (self._epoch[0] + 1, secrets.randbits(64))
        body = _encode([(True, a, r, sealed, created) for (a, r), (sealed, created) in live.items()], epoch)
        need = HEADER_BYTES + len(body)
        try:
            if need > self._sizes[target] // 2:  # room for the live set and at least as much again
                self._fds[target] = self._open_slot(target, 2 * need)
            fd = self._fds[target]
            _pwrite_all(fd, body, HEADER_BYTES)
            if self._dirty[target] > need:  # what an earlier use (or a crash) left there
                _zero(fd, need, self._dirty[target])
            os.fdatasync(fd)
            _pwrite_all(fd, _header(epoch), 0)
            os.fdatasync(fd)
        except OSError as exc:
            raise self._break(exc) from None
        old = self._current
        self._current, self._epoch, self._head, self._live = target, epoch, need, live
        self._dirty[target] = need
        old_fd = self._fds[old]
        if old_fd >= 0 and self._dirty[old] > HEADER_BYTES:
            try:  # scrub the released records; a stale record never checks again, synced or not
                _zero(old_fd, HEADER_BYTES, self._dirty[old])
                if sync_scrub:
                    os.fdatasync(old_fd)
                elif hasattr(os, "posix_fadvise"):
                    # Start writing the zeros back now (Linux: DONTNEED starts writeback), so the next
                    # rotation into this slot does not sync a slot's worth of them inside an arm's
                    # round: rotations took ~5 ms without, 1.0-1.7 ms with (~1,600 arms/s).
                    os.posix_fadvise(
                        old_fd, HEADER_BYTES, self._dirty[old] - HEADER_BYTES, os.POSIX_FADV_DONTNEED
                    )
            except OSError as exc:
                raise self._break(exc) from None
            self._dirty[old] = HEADER_BYTES

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


def _seeds(epoch: Epoch) -> tuple[int, int]:
    """CRC-32 starting values of ARM and RELEASE records in a slot of `epoch`."""
    g = zlib.crc32(struct.pack("<QQ", *epoch))
    return zlib.crc32(bytes((ARM,)), g), zlib.crc32(bytes((RELEASE,)), g)


def _header(epoch: Epoch) -> bytes:
    crc = zlib.crc32(MAGIC + struct.pack("<QQ", *epoch))
    return _HEAD.pack(MAGIC, epoch[0], epoch[1], crc)


def _header_epoch(head: bytes) -> Epoch | None:
    """The (generation, salt) of a slot header; (0, 0) for a header never written (zeros); None if it
    is not a header."""
    if head == bytes(len(head)):
        return (0, 0)
    if len(head) < _HEAD.size:
        return None
    magic, gen, salt, crc = _HEAD.unpack_from(head)
    if magic != MAGIC or crc != zlib.crc32(MAGIC + struct.pack("<QQ", gen, salt)):
        return None
    return (gen, salt)


def _encode(ops: list[_Op], epoch: Epoch) -> bytes:
    arm_seed, rel_seed = _seeds(epoch)
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


def _replay(data: bytes, epoch: Epoch) -> tuple[Live, int]:
    """The live set after every record of `epoch` from HEADER_BYTES on, and where they end."""
    arm_seed, rel_seed = _seeds(epoch)
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
            break  # zeros past the end, a torn write, or a record of another epoch
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


def _zero(fd: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        pos += os.pwrite(fd, _ZEROS[: min(len(_ZEROS), end - pos)], pos)


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""
