"""Every setting and limit of the switch, as msgspec Structs loaded once from TOML.

TigerBeetle style: every queue, batch, frame, connection count and timeout has a named limit here, with
its unit last in the name. Validation happens once, at load; the rest of the code trusts these values.
Each layer reads only its own section. Sections are owned by the layer named in their docstring; add
fields with defaults so older config files keep loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import msgspec

FramingKind = Literal["binary2", "ascii4"]
LedgerBackendKind = Literal["sqlite", "postgres"]


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the setting."""


class ListenerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One terminal-facing TCP listener (switch.server). One per terminal profile."""

    name: str
    profile: str = "terminal_ascii"
    host: str = "127.0.0.1"
    port: int = 0
    framing: FramingKind = "binary2"
    tpdu: bool = False
    max_frame_bytes: int = 4096
    max_connections: int = 1024
    max_inflight_per_connection: int = 64
    idle_timeout_ms: int = 300_000


class AcquirerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One acquirer host and its links (switch.routing, switch.server)."""

    name: str
    host: str = "127.0.0.1"
    port: int = 0
    profile: str = "acquirer_1987"
    framing: FramingKind = "binary2"
    connections: int = 2
    max_frame_bytes: int = 8192
    max_outstanding_per_link: int = 1024
    request_timeout_ms: int = 5_000
    echo_interval_ms: int = 30_000
    #: Consecutive unanswered echoes after which a link is marked down and reconnected.
    max_echo_failures: int = 2
    reconnect_backoff_min_ms: int = 100
    reconnect_backoff_max_ms: int = 10_000
    backup: str | None = None
    #: Stand-in: approve below this amount while the acquirer is down (0 disables stand-in).
    stand_in_floor_minor: int = 0
    #: The links' MAC key (double-length DES) sealed under the KEK, hex: `switch keys seal --acquirer`
    #: makes it (switch.codec.keys). Empty: the acquirer links are not MACed.
    mac_key_sealed_hex: str = ""
    #: Refused when set: the MAC key in clear. Kept only so an old config fails with a message that
    #: says how to seal the key, instead of "unknown field".
    mac_key_hex: str = ""

    def __post_init__(self) -> None:
        if self.mac_key_hex:
            raise ValueError(
                f"acquirer {self.name!r}: mac_key_hex holds the link MAC key in clear, which is refused; "
                "seal it under the KEK with `switch keys seal --acquirer NAME` and set mac_key_sealed_hex"
            )

    def __repr__(self) -> str:
        # the link's MAC key must never reach a log line, an error or a traceback
        hidden = {"mac_key_hex"} if self.mac_key_hex else set()
        shown = ", ".join(
            f"{name}={'<hidden>' if name in hidden else repr(getattr(self, name))}"
            for name in self.__struct_fields__
        )
        return f"AcquirerConfig({shown})"


class RouteConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One BIN range: a 6-11 digit PAN prefix routed to an acquirer (switch.routing)."""

    prefix: str
    acquirer: str
    currency: str | None = None
    processing_code: str | None = None


class RoutingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """BIN table and its default (switch.routing)."""

    default_acquirer: str | None = None
    routes: list[RouteConfig] = []


class StoreForwardConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The durable queue of reversals and advices to deliver to acquirers (switch.routing)."""

    path: str = "var/saf.db"
    retry_interval_ms: int = 2_000
    max_retry_interval_ms: int = 60_000
    max_depth: int = 100_000


class LedgerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The append-only ledger (switch.ledger)."""

    backend: LedgerBackendKind = "sqlite"
    path: str = "var/ledger.db"
    dsn: str = ""
    #: Longest wait for more entries before a batch that is not full is checked and committed. 0: at
    #: once -- batches still group whatever arrives while the previous one commits (natural group
    #: commit). Measured end to end at 2,300 purchases/s: p99 better in 4 of 4 pairs with 0 than with
    #: 2 ms, p50 10-44 vs 15-120 ms (docs/performance.md); bench/ledger.py's full batches: equal.
    batch_window_ms: float = 0.0
    max_batch_entries: int = 1_000
    max_queue_entries: int = 100_000
    checkpoint_every_entries: int = 10_000
    #: Entries past which the writer copies the unindexed tail into the key and merchant index
    #: tables in one sorted run (switch.ledger.backend, "Why index runs"); lookups scan at most
    #: about this many tail entries, and the writer keeps their keys in memory.
    index_run_entries: int = 20_000
    #: Commit batch k on a second thread while batch k+1 is checked (switch.ledger.writer, "Pipeline"),
    #: for batches of at least `pipeline_min_batch_entries`; smaller ones commit in line (under light
    #: load a hand-off to another thread per batch costs more than the overlap saves).
    #: On by default since the writer's own Python work shrank (libcrypto hashing, bytearray blobs,
    #: the ledger process's GC threshold): bench/ledger.py, 6 alternating pairs, pipeline ahead in all
    #: six (median ~50k vs ~43k entries/s; docs/performance.md, "Ledger"). Under the switch's usual
    #: load batches stay below `pipeline_min_batch_entries` and commit in line anyway.
    commit_pipeline: bool = True
    pipeline_min_batch_entries: int = 64
    #: Young-generation threshold of the collector in the ledger's own process (the switch's
    #: `server.gc_young_threshold` is for the trio process; freezing follows `server`'s settings).
    #: Why larger there: a full batch keeps ~10,000 new container objects alive until it is
    #: answered, so at 2,000 every batch paid young collections that found nothing to free and
    #: moved its objects on to older generations (bench/ledger.py: ~1.3 us/entry of collector time
    #: on the GIL at 2,000, ~0.1 at 20,000; one young pass over 20,000 objects takes ~3 ms).
    gc_young_threshold: int = 20_000
    #: Environment variable / file holding the checkpoint signing key (hex). Never logged.
    checkpoint_key_env: str = "SWITCH_CHECKPOINT_KEY"
    checkpoint_key_file: str = ""
    #: Environment variable / file holding the HMAC key for PAN hashes (hex). Never logged.
    pan_hash_key_env: str = "SWITCH_PAN_HASH_KEY"
    pan_hash_key_file: str = ""
    #: PostgreSQL backend bounds (switch.ledger.postgres): connecting, any one statement (a COMMIT
    #: stuck on a dead disk included), and a new writer waiting for the previous writer's session.
    pg_connect_timeout_s: int = 10
    pg_statement_timeout_ms: int = 30_000
    pg_writer_lock_timeout_ms: int = 10_000


class KeysConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where the key-encryption key comes from; terminal master keys are stored under it."""

    kek_env: str = "SWITCH_KEK"
    kek_file: str = ""
    #: KEK rotation: previous KEKs, accepted only to open what they sealed (master keys, link MAC keys,
    #: store-and-forward and armed-reversal records) until `switch keys reseal` has re-sealed it all
    #: under the current KEK. Each entry names an environment variable / a 0600 file with one KEK.
    previous_kek_envs: list[str] = []
    previous_kek_files: list[str] = []


class MerchantConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A merchant as configured before the registry (issue 6) takes over (switch.processing)."""

    id: str
    name: str = ""
    mcc: str = "5999"
    currency: str = "978"
    refund_window_days: int = 180
    single_refund_cap_minor: int = 0
    daily_refund_cap_minor: int = 0


class TerminalConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A terminal: id, owner and its master key encrypted under the KEK (hex)."""

    id: str
    merchant_id: str
    profile: str = "terminal_ascii"
    master_key_encrypted_hex: str = ""


class ProcessingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Transaction-flow limits (switch.processing)."""

    #: The terminal hears 68 (or 91) at this deadline if the acquirer has not answered.
    terminal_deadline_ms: int = 10_000
    #: Response code sent at the terminal deadline.
    timeout_response_code: str = "68"
    #: How long a pre-authorisation hold stays open before it expires.
    hold_expiry_ms: int = 7 * 24 * 3_600_000
    #: Duplicate-detection memory (terminal keys remembered).
    max_remembered_keys: int = 1_000_000
    #: Finished transactions kept in memory as originals for voids/refunds/reversals (older ones are
    #: fetched from the ledger with FindOriginal).
    max_cached_originals: int = 1_000_000
    #: Transactions in flight at once (beyond it a request is answered 96 at once).
    max_open_transactions: int = 100_000
    #: Largest amount accepted in field 4, in minor units (13 above it).
    max_amount_minor: int = 999_999_999_999
    #: Field 32, the switch's acquiring institution id on the acquirer side.
    institution_id: str = "00000000001"
    #: RRNs reserved durably per block, and the reserve below which the next block is requested.
    rrn_block_size: int = 100_000
    rrn_low_water: int = 20_000
    #: Pre-authorisation holds expired per Tick event at most.
    max_hold_expiries_per_tick: int = 1_000


class MetricsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Prometheus exposition (switch.server)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9108


class AdminConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Admin HTTP API (switch.server)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8088
    token_env: str = "SWITCH_ADMIN_TOKEN"


#: Smallest `server.armed_slot_bytes` accepted (a slot must hold the live arms and room for more).
MIN_ARMED_SLOT_BYTES = 65_536


class ServerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The trio server's own state files and timers (switch.server)."""

    #: Pre-stored reversals, armed durably before each acquirer request leaves: an append-only log in
    #: this file and `<armed_path>-b` (switch.server.armed; an older SQLite file here is migrated).
    armed_path: str = "var/armed.db"
    #: Bytes each of the two armed-reversal log files is preallocated to (zero-filled); when a group
    #: of arms does not fit, the live ones move to the other file. Larger: rarer moves, more disk.
    armed_slot_bytes: int = 4 * 1024 * 1024
    #: Durable high-water mark of reserved RRNs (field 37).
    rrn_path: str = "var/rrn.hwm"
    #: How often request deadlines are checked (a timeout is answered at most this late).
    timer_tick_ms: int = 10
    #: Housekeeping tick of the processor (hold expiries) and of the SAF metrics.
    housekeeping_interval_ms: int = 1_000
    #: Longest pause of the store-and-forward sender between looks at its queue.
    saf_tick_ms: int = 200
    #: Store-and-forward items sent per look.
    saf_max_items_per_tick: int = 200
    #: Start-up: ledger entries younger than this are replayed into the processor (duplicates, voids).
    recovery_window_ms: int = 86_400_000
    #: Seconds to wait at shutdown for the ledger writer to commit what is queued.
    shutdown_timeout_s: float = 30.0
    #: Armed reversals, releases and SAF items queued for the server's durable-writer thread at most;
    #: past it new acquirer requests are refused (91/96) until the disk catches up.
    max_pending_durable_items: int = 50_000
    #: Run the ledger writer in a child process (the second core, no GIL shared with the trio thread);
    #: false: a thread of the switch's process (same semantics, one process).
    ledger_writer_process: bool = True
    #: Nice steps by which that process's CPU priority is set above the switch's own, when the switch
    #: may raise a priority (root, CAP_SYS_NICE, or an RLIMIT_NICE that allows it, e.g. systemd's
    #: LimitNICE=; otherwise one info line and equal priority); 0 leaves it equal. Why: every purchase
    #: waits for it twice (arm, post), each time for a short burst of work after a wake-up; with the
    #: cores ~75% busy that wake-up waited for a CPU behind the trio process and the load
    #: (bench/e2e.py --trace at 2,500/s: arm hop slowest 1% 25-49 ms at equal priority, 5-9 ms with the
    #: ledger process 5 steps up; docs/performance.md).
    ledger_process_priority_steps: int = 5
    #: sys.setswitchinterval for the switch's process, in microseconds (0: Python's default, 5,000).
    #: Smaller lets the durable-writer thread retake the GIL sooner after each SQLite step.
    gil_switch_interval_us: int = 0
    #: Garbage collector (switch.server.gcpolicy): young-generation threshold (0: Python's 700), how
    #: often survivors are frozen out of later collections (0: never), and how often everything is
    #: unfrozen and collected in one full pass (0: never; frozen cyclic garbage is kept until then).
    gc_young_threshold: int = 2_000
    gc_freeze_interval_ms: int = 1_000
    gc_full_interval_s: int = 900
    #: Ledger reads (FindOriginal) queued for the lookup thread at most; beyond it they run inline.
    max_pending_lookups: int = 10_000
    #: Diagnostics (switch.server.stagetrace): when set, per-transaction stage timestamps (terminal id,
    #: STAN, RRN, no card data) of up to stage_trace_max_txns transactions are written to this file at
    #: shutdown (bench/e2e.py --trace). Empty: off.
    stage_trace_path: str = ""
    stage_trace_max_txns: int = 500_000

    def __post_init__(self) -> None:
        if self.armed_slot_bytes < MIN_ARMED_SLOT_BYTES:
            raise ValueError(
                f"server.armed_slot_bytes must be at least {MIN_ARMED_SLOT_BYTES}, "
                f"got {self.armed_slot_bytes}"
            )


class MerchantServicesConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Defaults and limits of merchant services (switch.merchant, issue 6). Per-merchant values live in
    each merchant's contract in the registry; these are the defaults a new contract starts from."""

    #: Business days (refund windows, daily refund caps, cutover) start at 00:00 at this UTC offset.
    business_day_utc_offset_minutes: int = 0
    #: Default refund window: a refund on day original+N is allowed, on day original+N+1 declined.
    refund_window_days: int = 180
    #: Grace after paid-until before a terminal is declined for a lapsed subscription.
    subscription_grace_days: int = 7
    subscription_period_days: int = 30
    #: A renewal cancelled within this many days of being paid is refunded in full.
    subscription_refund_window_days: int = 14
    #: Field 18 (MCC) absent from a request: False accepts it under the registered MCC (the switch
    #: sends the registered MCC on); True declines it like a mismatch.
    require_mcc: bool = False
    #: Largest registry list returned by one CLI/API call (pagination beyond).
    max_list_rows: int = 1_000
    #: Largest accepted admin API request body.
    max_admin_body_bytes: int = 65_536
    #: Largest settlement report (entries folded) the API produces in one call.
    max_report_entries: int = 5_000_000
    #: How often a running switch reads registry changes made outside it (CLI, another process).
    registry_poll_interval_ms: int = 1_000
    #: Terminal lifecycle events (sign-on, activation, suspension) waiting to be saved in the registry;
    #: past it new ones are logged and dropped (the running switch keeps them in memory).
    max_pending_lifecycle_events: int = 10_000
    #: How often a running switch evaluates undecided terminal deposits and posts the refund or keep
    #: once decided (switch.server.merchant_schedule); 0 turns the schedule off (API/CLI only).
    deposit_check_interval_s: int = 900
    #: Terminals whose deposit is evaluated against the ledger per scheduled pass (the rest wait for
    #: the next pass, oldest registrations first).
    max_deposit_checks_per_pass: int = 1_000
    #: Refusals answered before the processing core (a registered terminal that never signed on gets
    #: 58 with no ledger entry) kept in memory for the admin API: per terminal, and terminals tracked.
    max_refusals_per_terminal: int = 20
    max_refusal_terminals: int = 10_000
    #: The merchant commands forward posting operations to a running switch's admin API: how long
    #: they wait for it to answer the probe, and for the operation itself.
    cli_api_probe_timeout_ms: int = 1_000
    cli_api_timeout_s: int = 60


class SwitchConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The whole of switch.toml."""

    listeners: list[ListenerConfig] = []
    acquirers: list[AcquirerConfig] = []
    routing: RoutingConfig = RoutingConfig()
    store_forward: StoreForwardConfig = StoreForwardConfig()
    ledger: LedgerConfig = LedgerConfig()
    keys: KeysConfig = KeysConfig()
    merchants: list[MerchantConfig] = []
    terminals: list[TerminalConfig] = []
    processing: ProcessingConfig = ProcessingConfig()
    metrics: MetricsConfig = MetricsConfig()
    admin: AdminConfig = AdminConfig()
    merchant_services: MerchantServicesConfig = MerchantServicesConfig()
    server: ServerConfig = ServerConfig()


def load_config(path: str | Path) -> SwitchConfig:
    """Read and validate a TOML config; errors name the offending setting."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        return msgspec.toml.decode(data, type=SwitchConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
