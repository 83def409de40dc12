"""A complete switch configuration in a directory, for the demo and the end-to-end tests.

Why here: the demo and the tests need the same thing -- a fresh KEK, terminals with their master keys
sealed under it, ledger keys in 0600 files, state files in one directory, acquirers on given ports --
and it must be built the way an operator would (through SwitchConfig), so the product code under test
is the code that runs. All keys made here are throw-away TEST keys, random per testbed.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import msgspec

from switch.codec import keys as keymod
from switch.config import (
    AcquirerConfig,
    KeysConfig,
    LedgerConfig,
    ListenerConfig,
    MerchantConfig,
    MetricsConfig,
    ProcessingConfig,
    RouteConfig,
    RoutingConfig,
    ServerConfig,
    StoreForwardConfig,
    SwitchConfig,
    TerminalConfig,
)

#: BIN prefixes of the test cards: 4... goes to acquirer "alpha", 5... to "beta".
ALPHA_BIN = "400000"
BETA_BIN = "510000"


class TestTerminal(msgspec.Struct, frozen=True):
    terminal_id: str
    merchant_id: str
    master_key_hex: str
    listener: str


def luhn_complete(prefix: str, length: int = 16) -> str:
    """`prefix` padded with zeros to length-1 digits plus its Luhn check digit."""
    body = prefix.ljust(length - 1, "0")
    total = 0
    for i, ch in enumerate(reversed(body)):
        n = int(ch)
        if i % 2 == 0:
            n *= 2
            if n > 9:
                n -= 9
        total += n
    return body + str((10 - total % 10) % 10)


def card(bin_prefix: str, n: int) -> str:
    """The n-th test card of a BIN (Luhn-valid, 16 digits)."""
    return luhn_complete(f"{bin_prefix}{n:09d}"[:15])


def _write_secret(path: Path, text: str) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return str(path)


def build(
    directory: str | Path,
    acquirer_ports: dict[str, int],
    *,
    terminals_per_listener: int = 4,
    packed_listener: bool = True,
    acquirer: dict[str, Any] | None = None,
    acquirer_overrides: dict[str, dict[str, Any]] | None = None,
    processing: dict[str, Any] | None = None,
    listener: dict[str, Any] | None = None,
    ledger: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    metrics_enabled: bool = False,
) -> tuple[SwitchConfig, list[TestTerminal]]:
    """A SwitchConfig with everything under `directory`; acquirers named by `acquirer_ports` keys.

    The first acquirer takes ALPHA_BIN cards (and is the default), the second BETA_BIN cards.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    kek_hex = keymod.generate_kek()
    kek = keymod.Kek(bytes.fromhex(kek_hex))
    kek_file = _write_secret(d / "kek.hex", kek_hex)
    ck_file = _write_secret(d / "checkpoint.key", secrets.token_hex(32))
    ph_file = _write_secret(d / "pan_hash.key", secrets.token_hex(32))

    listeners = [ListenerConfig(name="ascii", profile="terminal_ascii", **(listener or {}))]
    if packed_listener:
        listeners.append(
            ListenerConfig(name="packed", profile="terminal_packed", tpdu=True, **(listener or {}))
        )
    names = list(acquirer_ports)
    acqs = []
    for name in names:
        kw = dict(acquirer or {})
        kw.update((acquirer_overrides or {}).get(name, {}))
        if kw.get("mac_key_hex"):  # a TEST link key given in clear is stored the operator's way: sealed
            kw["mac_key_sealed_hex"] = kek.seal_link_mac_key(name, bytes.fromhex(kw.pop("mac_key_hex")))
        acqs.append(AcquirerConfig(name=name, port=acquirer_ports[name], **kw))
    routes = [RouteConfig(prefix=ALPHA_BIN, acquirer=names[0])]
    if len(names) > 1:
        routes.append(RouteConfig(prefix=BETA_BIN, acquirer=names[1]))

    terminals: list[TestTerminal] = []
    term_cfgs: list[TerminalConfig] = []
    merchants: list[MerchantConfig] = []
    for li, lc in enumerate(listeners):
        for i in range(terminals_per_listener):
            tid = f"T{li}{i:06d}"
            mid = f"M{li}{i:013d}"
            tmk = keymod.generate_working_key()
            sealed = kek.seal(tid, tmk)
            term_cfgs.append(
                TerminalConfig(id=tid, merchant_id=mid, profile=lc.profile, master_key_encrypted_hex=sealed)
            )
            merchants.append(MerchantConfig(id=mid, name=f"Test merchant {li}-{i}"))
            terminals.append(TestTerminal(tid, mid, tmk.hex().upper(), lc.name))

    config = SwitchConfig(
        listeners=listeners,
        acquirers=acqs,
        routing=RoutingConfig(default_acquirer=names[0], routes=routes),
        store_forward=StoreForwardConfig(
            path=str(d / "saf.db"), retry_interval_ms=200, max_retry_interval_ms=2_000
        ),
        ledger=LedgerConfig(
            path=str(d / "ledger.db"),
            checkpoint_key_file=ck_file,
            pan_hash_key_file=ph_file,
            **(ledger or {}),
        ),
        keys=KeysConfig(kek_file=kek_file),
        merchants=merchants,
        terminals=term_cfgs,
        processing=ProcessingConfig(**(processing or {})),
        metrics=MetricsConfig(enabled=metrics_enabled, port=0),
        server=ServerConfig(armed_path=str(d / "armed.db"), rrn_path=str(d / "rrn.hwm"), **(server or {})),
    )
    return config, terminals
