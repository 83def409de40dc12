"""Locust load for the switch: each locust User is one POS terminal on its own TCP connection.

    locust -f bench/locustfile.py --headless -u 20 -r 20 -t 60s --switch-config switch.toml

A User takes the next terminal of the switch's config (one terminal per User: a terminal's STANs
belong to one connection), opens its master key under the config's KEK (so run it only against test
configs: `switch.toml`'s DEMO terminals, the testbed of bench/e2e.py), signs on (0800 70=001) and
installs the MAC working key from field 62, then sends a weighted mix of purchase, refund, void and
balance inquiry, one request in flight at a time. Every exchange is reported to locust's statistics
(request_type "ISO8583", name = the transaction type, response_length = answer bytes); any answer other
than 00, a timeout, a MAC that does not verify or a broken connection is a failure, named by its cause
(e.g. "response code 51") so locust's failure table groups them.

Messages are built, MACed and framed by switch.codec.wire.Wire (the one binding the switch and its
simulators share), never re-implemented here. The socket is a plain blocking socket, which locust's
gevent monkey-patching makes cooperative.

Options (also as environment variables): --switch-config (SWITCH_CONFIG), --switch-host, --switch-ports
"listener=port,..." to override the config's listener ports, --mix "purchase=60,refund=10,...",
--request-timeout-ms, --max-amount-minor.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import random
import socket
import sys
import time
from typing import Any

from locust import User, constant, events, task
from locust.exception import StopUser

from switch.codec import keys as keymod
from switch.codec.masking import scrub_text
from switch.codec.wire import FramingError, MacFn, Wire, WireError, make_mac_fn
from switch.config import ConfigError, SwitchConfig, load_config
from switch.server.testbed import card

log = logging.getLogger("locustfile")

REQUEST_TYPE = "ISO8583"
#: Weights of the mix; refund and void need an approved purchase of this User, else they buy instead.
DEFAULT_MIX = "purchase=60,refund=10,void=10,inquiry=20"
#: TPDU sent on listeners configured with one (as switch.sim.terminal users do).
TPDU = bytes.fromhex("6000030000")
RECEIVE_BYTES = 65_536
#: Approved purchases a User remembers as originals for its voids and refunds.
MAX_ORIGINALS = 1_000
#: Cards per configured BIN route.
CARDS_PER_ROUTE = 50


class ExchangeError(Exception):
    """One exchange failed; the text is what locust's failure table shows (never card data)."""


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--switch-config", env_var="SWITCH_CONFIG", default="switch.toml", help="switch.toml")
    parser.add_argument("--switch-host", env_var="SWITCH_HOST", default="", help="override listener host")
    parser.add_argument(
        "--switch-ports", env_var="SWITCH_PORTS", default="", help="listener=port,... overrides"
    )
    parser.add_argument("--mix", env_var="SWITCH_MIX", default=DEFAULT_MIX, help="kind=weight,...")
    parser.add_argument("--request-timeout-ms", type=int, default=10_000, help="per exchange")
    parser.add_argument("--max-amount-minor", type=int, default=5_000, help="largest purchase amount")


def parse_mix(text: str) -> dict[str, int]:
    mix: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, weight = part.partition("=")
        if kind not in ("purchase", "refund", "void", "inquiry") or not weight.isdigit():
            raise ValueError(f"--mix: {part!r} is not kind=weight (purchase, refund, void, inquiry)")
        mix[kind] = int(weight)
    if not any(mix.values()):
        raise ValueError("--mix has no positive weight")
    return mix


class Fleet:
    """The terminals of one switch config, handed out one per User (loaded once per locust process)."""

    def __init__(self, options: Any) -> None:
        try:
            self.config: SwitchConfig = load_config(options.switch_config)
            kek = keymod.load_kek(self.config.keys)
            self.master = keymod.load_master_keys(self.config.terminals, kek)
        except (ConfigError, keymod.KeyStoreError) as exc:
            raise ValueError(str(exc)) from None
        ports: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in options.switch_ports.split(","))):
            name, _, port = part.partition("=")
            if not port.isdigit() or not 0 < int(port) < 65_536:
                raise ValueError(f"--switch-ports: {part!r} is not listener=port")
            ports[name.strip()] = int(port)
        self.listeners = {
            lc.profile: (
                options.switch_host or lc.host,
                ports.get(lc.name, lc.port),
                lc,
            )
            for lc in self.config.listeners
        }
        self.terminals = [
            t for t in self.config.terminals if t.id in self.master and t.profile in self.listeners
        ]
        if not self.terminals:
            raise ValueError(f"{options.switch_config} has no terminal with a master key and a listener")
        self.cards = [card(r.prefix, n) for r in self.config.routing.routes for n in range(CARDS_PER_ROUTE)]
        if not self.cards:
            self.cards = [card("400000", n) for n in range(CARDS_PER_ROUTE)]
        self.mix = parse_mix(options.mix)
        self._next = itertools.count()

    def take(self) -> Any:
        i = next(self._next)
        if i >= len(self.terminals):
            return None
        return self.terminals[i]


_fleet: Fleet | None = None


@events.init.add_listener
def _load_fleet(environment: Any, **_kw: Any) -> None:
    """Load the config and keys once, at start: a bad option stops locust with one clear line instead
    of every user failing."""
    global _fleet
    if environment.parsed_options is None:  # imported as a library (no command line)
        return
    try:
        _fleet = Fleet(environment.parsed_options)
    except ValueError as exc:
        sys.stderr.write(f"locustfile: {exc}\n")
        sys.exit(2)


def fleet(environment: Any) -> Fleet:
    global _fleet
    if _fleet is None:
        _fleet = Fleet(environment.parsed_options)
    return _fleet


class Iso8583Client:
    """A blocking ISO 8583 terminal connection: one request in flight, answer matched by STAN."""

    def __init__(self, host: str, port: int, listener: Any, terminal: Any, timeout_s: float) -> None:
        self.terminal = terminal
        self.wire = Wire(listener.profile, listener.framing, tpdu=listener.tpdu)
        self.mac: MacFn | None = None  # set from the sign-on's working key
        self.tpdu = TPDU if listener.tpdu else None
        self.reader = self.wire.reader(listener.max_frame_bytes)
        self.timeout_s = timeout_s
        self.stan = 0
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()

    def exchange(self, fields: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """Send one request, return (answer fields, answer bytes). Raises ExchangeError."""
        self.stan = self.stan % 999_999 + 1
        now = dt.datetime.now()
        fields = {
            **fields,
            "11": f"{self.stan:06d}",
            "12": now.strftime("%H%M%S"),
            "13": now.strftime("%m%d"),
            "41": self.terminal.id,
            "42": self.terminal.merchant_id,
        }
        try:
            self.sock.sendall(self.wire.frame(self.wire.encode(fields, self.mac), self.tpdu))
            deadline = time.monotonic() + self.timeout_s
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ExchangeError(f"no answer within {self.timeout_s:g} s")
                self.sock.settimeout(remaining)
                data = self.sock.recv(RECEIVE_BYTES)
                if not data:
                    raise ExchangeError("connection closed by the switch")
                for frame in self.reader.feed(data):
                    answer, mac_ok = self.wire.decode_verified(frame.payload, self.mac)
                    if answer.get("11") != fields["11"]:
                        continue  # a late answer to an earlier request that timed out
                    if not mac_ok:
                        raise ExchangeError("answer MAC does not verify")
                    return answer, len(frame.payload)
        except TimeoutError:
            raise ExchangeError(f"no answer within {self.timeout_s:g} s") from None
        except (WireError, FramingError) as exc:
            raise ExchangeError(f"bad answer: {scrub_text(str(exc))}") from None
        except OSError as exc:
            raise ExchangeError(f"connection failed: {exc.strerror or exc}") from None


class TerminalUser(User):
    """One POS terminal: sign on, then the weighted mix with no think time."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.fleet = fleet(self.environment)
        opts = self.environment.parsed_options
        self.rng = random.Random()
        self.max_amount_minor = max(1, opts.max_amount_minor)
        self.originals: list[tuple[str, str, int]] = []  # (rrn, pan, amount) of approved purchases
        self.client: Iso8583Client | None = None
        self.signed_on = False
        terminal = self.fleet.take()
        if terminal is None:
            cause = f"more users than terminals ({len(self.fleet.terminals)}) in the config"
            log.warning("user stopped: %s", cause)
            self._fire("sign_on", 0.0, 0, ExchangeError(cause))
            return  # the task stops this user (StopUser outside a task is logged as a crash)
        host, port, listener = self.fleet.listeners[terminal.profile]
        started = time.perf_counter()
        try:
            self.client = Iso8583Client(host, port, listener, terminal, opts.request_timeout_ms / 1000.0)
            answer, size = self.client.exchange({"t": "0800", "70": "001"})
            if answer.get("39") != "00":
                raise ExchangeError(f"response code {answer.get('39')}")
            mac_key = keymod.parse_signon_field(self.fleet.master[terminal.id].value, answer["62"]).mac_key
            self.client.mac = make_mac_fn(mac_key.value)
        except (ExchangeError, OSError, KeyError, ValueError) as exc:  # refused, no field 62, bad KCV...
            error = exc if isinstance(exc, ExchangeError) else ExchangeError(type(exc).__name__)
            log.warning("terminal %s: sign-on failed, user stopped: %s", terminal.id, error)
            self._fire("sign_on", started, 0, error)
            return
        self.signed_on = True
        self._fire("sign_on", started, size, None)

    def on_stop(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()

    def _fire(self, name: str, started: float, size: int, exc: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type=REQUEST_TYPE,
            name=name,
            response_time=(time.perf_counter() - started) * 1000.0 if started else 0.0,
            response_length=size,
            exception=exc,
            context={},
        )

    def _send(self, name: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        assert self.client is not None
        started = time.perf_counter()
        try:
            answer, size = self.client.exchange(fields)
        except ExchangeError as exc:
            self._fire(name, started, 0, exc)
            return None
        code = answer.get("39", "")
        self._fire(name, started, size, None if code == "00" else ExchangeError(f"response code {code}"))
        return answer if code == "00" else None

    def _card_fields(self, pan: str, pc: str, amount_minor: int) -> dict[str, Any]:
        return {"2": pan, "3": pc, "4": f"{amount_minor:012d}", "22": "012", "25": "00", "49": "978"}

    @task
    def mixed(self) -> None:
        if not self.signed_on:
            raise StopUser()
        mix = self.fleet.mix
        kind = self.rng.choices(list(mix), list(mix.values()))[0]
        if kind in ("refund", "void") and self.originals:
            rrn, pan, amount = self.originals.pop(self.rng.randrange(len(self.originals)))
            if kind == "void":
                fields = {"t": "0200", **self._card_fields(pan, "020000", amount), "37": rrn}
            else:
                refund = self.rng.randint(1, amount)
                fields = {"t": "0200", **self._card_fields(pan, "200000", refund), "37": rrn}
            self._send(kind, fields)
            return
        pan = self.rng.choice(self.fleet.cards)
        if kind == "inquiry":
            self._send("inquiry", {"t": "0200", **self._card_fields(pan, "310000", 0)})
            return
        amount = self.rng.randint(1, self.max_amount_minor)
        answer = self._send("purchase", {"t": "0200", **self._card_fields(pan, "000000", amount)})
        if answer is not None and answer.get("37", "").strip() and len(self.originals) < MAX_ORIGINALS:
            self.originals.append((answer["37"].strip(), pan, amount))
