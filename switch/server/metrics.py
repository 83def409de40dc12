"""Prometheus metrics of the switch, and the trio HTTP endpoint that serves them.

Why a registry per `Metrics` object: tests start several switches in one process, and the global
prometheus-client registry refuses a metric name twice. Naming follows Prometheus conventions (base
units in names: `_seconds`, `_entries`; `_total` on counters). Labels are bounded sets only: MTI,
two-digit transaction type of the processing code, response code, acquirer, listener, link state.
Never a PAN, a terminal id or a merchant id (cardinality and card-data safety).

Hot path cost: `labels(...)` does a dict lookup under a lock; the per-transaction counters are cached
here in plain dicts keyed by the label tuple, so an increment is one dict lookup and one `inc`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

#: Latency buckets in seconds: sub-millisecond resolution for the switch itself, up to acquirer timeouts.
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
)
#: Ledger batch sizes in entries.
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

LINK_STATES = ("disconnected", "connecting", "signing_on", "up", "down")


class Metrics:
    """Every metric the switch exports. One instance per running switch."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.transactions = Counter(
            "switch_transactions_total",
            "Terminal requests answered, by request MTI, transaction type (first two digits of the "
            "processing code) and response code",
            ["mti", "processing_code", "response_code"],
            registry=r,
        )
        self.terminal_latency = Histogram(
            "switch_terminal_latency_seconds",
            "Time from a terminal request's arrival to its answer leaving, by request MTI",
            ["mti"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.acquirer_latency = Histogram(
            "switch_acquirer_latency_seconds",
            "Time from a request sent to an acquirer to its matched answer",
            ["acquirer"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inflight = Gauge(
            "switch_inflight_requests", "Terminal requests received and not yet answered", registry=r
        )
        #: The core counts requests in flight in this plain int (two locked gauge updates per request
        #: cost more than the rest of the metrics); the gauge reads it when scraped.
        self.inflight_count = 0
        self.inflight.set_function(lambda: self.inflight_count)
        self.open_connections = Gauge(
            "switch_open_connections", "Open terminal connections", ["listener"], registry=r
        )
        self.limit_hits = Counter(
            "switch_limit_hits_total",
            "Times a configured limit was hit (connections, in-flight, frame size, idle timeout)",
            ["listener", "limit"],
            registry=r,
        )
        self.link_state = Gauge(
            "switch_acquirer_links",
            "Acquirer link connections by state",
            ["acquirer", "state"],
            registry=r,
        )
        self.acquirer_up = Gauge(
            "switch_acquirer_up",
            "1 while at least one link to the acquirer is signed on",
            ["acquirer"],
            registry=r,
        )
        self.timeouts = Counter(
            "switch_acquirer_timeouts_total",
            "Acquirer requests whose deadline passed without an answer",
            ["acquirer"],
            registry=r,
        )
        self.unmatched = Counter(
            "switch_acquirer_unmatched_answers_total",
            "Acquirer answers nobody waited for (late or unknown); never delivered",
            ["acquirer"],
            registry=r,
        )
        self.acquirer_unavailable = Counter(
            "switch_acquirer_unavailable_total",
            "Requests that found no signed-on link to their acquirer",
            ["acquirer"],
            registry=r,
        )
        self.reversals_queued = Counter(
            "switch_reversals_queued_total", "Reversals put in store-and-forward", ["acquirer"], registry=r
        )
        self.reversals_completed = Counter(
            "switch_reversals_completed_total",
            "Reversals answered by the acquirer and removed from store-and-forward",
            ["acquirer"],
            registry=r,
        )
        self.advices_queued = Counter(
            "switch_advices_queued_total", "Advices put in store-and-forward", ["acquirer"], registry=r
        )
        self.advices_completed = Counter(
            "switch_advices_completed_total", "Advices answered by the acquirer", ["acquirer"], registry=r
        )
        self.saf_sent = Counter(
            "switch_saf_sent_total",
            "Store-and-forward deliveries attempted (first and repeats)",
            ["acquirer"],
            registry=r,
        )
        self.saf_depth = Gauge("switch_saf_depth", "Items waiting in store-and-forward", registry=r)
        self.saf_oldest_age = Gauge(
            "switch_saf_oldest_age_seconds",
            "Age of the oldest item waiting in store-and-forward",
            registry=r,
        )
        self.mac_failures = Counter(
            "switch_mac_failures_total", "Messages whose MAC did not verify", ["side"], registry=r
        )
        self.unkeyed_refusals = Counter(
            "switch_unkeyed_refusals_total",
            "Requests of registered terminals that never signed on, answered 58 before any MAC check",
            registry=r,
        )
        self.decode_errors = Counter(
            "switch_decode_errors_total",
            "Frames that could not be decoded (format errors), by side",
            ["side"],
            registry=r,
        )
        self.framing_errors = Counter(
            "switch_framing_errors_total",
            "Connections closed for a bad frame header",
            ["side"],
            registry=r,
        )
        self.ledger_batch = Histogram(
            "switch_ledger_batch_entries",
            "Entries handed to the ledger writer per submit",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.ledger_commit_latency = Histogram(
            "switch_ledger_commit_latency_seconds",
            "Time from submitting entries to the ledger until they are durable",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.ledger_sequence = Gauge(
            "switch_ledger_sequence", "Highest committed ledger sequence number", registry=r
        )
        self.ledger_failures = Counter(
            "switch_ledger_failures_total", "Ledger submits that failed or were rejected", registry=r
        )
        self.sign_ons = Counter("switch_sign_ons_total", "Terminal sign-ons answered", registry=r)
        # Cached children for the per-transaction hot path.
        self._txn: dict[tuple[str, str, str], Any] = {}
        self._tlat: dict[str, Any] = {}

    def answered(self, mti: str, processing_code: str, response_code: str, latency_s: float) -> None:
        """One terminal answer left: count it and observe its latency (cached label children)."""
        key = (mti, processing_code[:2], response_code)
        child = self._txn.get(key)
        if child is None:
            child = self._txn[key] = self.transactions.labels(*key)
        child.inc()
        hist = self._tlat.get(mti)
        if hist is None:
            hist = self._tlat[mti] = self.terminal_latency.labels(mti)
        hist.observe(latency_s)

    def set_link_states(self, acquirer: str, counts: dict[str, int]) -> None:
        for state in LINK_STATES:
            self.link_state.labels(acquirer, state).set(counts.get(state, 0))
        self.acquirer_up.labels(acquirer).set(1 if counts.get("up", 0) else 0)

    def export_processor_counters(self, counters: Mapping[str, int]) -> None:
        """Serve the processing core's own counters (duplicates...) as Prometheus counters."""
        self.registry.register(_ProcessorCollector(counters))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _ProcessorCollector:
    """`switch_duplicates_total{outcome}` and `switch_processing_internal_errors_total`, read from the
    processor's Counter at scrape time (no per-transaction cost)."""

    def __init__(self, counters: Mapping[str, int]) -> None:
        self._counters = counters

    def collect(self) -> Any:
        c = self._counters
        dup = CounterMetricFamily(
            "switch_duplicates",
            "Duplicate terminal requests: replayed (repeat of a known key) or rejected (94)",
            labels=["outcome"],
        )
        dup.add_metric(["replayed"], c.get("repeats_replayed", 0))
        dup.add_metric(["rejected"], c.get("duplicates", 0) + c.get("duplicates_found_by_ledger", 0))
        yield dup
        yield CounterMetricFamily(
            "switch_processing_internal_errors",
            "Events the processing core contained after an internal error (each cost one 96)",
            value=c.get("internal_errors", 0),
        )


#: Limits of the metrics HTTP endpoint: a scrape request is tiny; anything bigger is refused.
MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0


async def serve_metrics(
    metrics: Metrics,
    host: str,
    port: int,
    *,
    before_scrape: Callable[[], None] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve GET /metrics over HTTP/1.1 (one request per connection). Reports the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("metrics on http://%s:%d/metrics", host, bound)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(REQUEST_TIMEOUT_S):
                buf = bytearray()
                while b"\r\n\r\n" not in buf:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    buf += chunk
                    if len(buf) > MAX_REQUEST_BYTES:
                        await _respond(stream, 431, b"request too large\n", "text/plain")
                        return
                line = bytes(buf.split(b"\r\n", 1)[0]).split()
                if len(line) < 2 or line[0] not in (b"GET", b"HEAD"):
                    await _respond(stream, 405, b"only GET\n", "text/plain")
                    return
                path = line[1].split(b"?", 1)[0]
                if path not in (b"/metrics", b"/"):
                    await _respond(stream, 404, b"try /metrics\n", "text/plain")
                    return
                if before_scrape is not None:
                    before_scrape()
                body = metrics.exposition()
                await _respond(
                    stream, 200, body if line[0] == b"GET" else b"", CONTENT_TYPE_LATEST, length=len(body)
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await stream.aclose()

    task_status.started(bound)
    await trio.serve_listeners(handle, listeners)


async def _respond(
    stream: trio.SocketStream, status: int, body: bytes, ctype: str, length: int | None = None
) -> None:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 431: "Too Large"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S GMT', time.gmtime())}\r\n\r\n"
    ).encode("ascii")
    await stream.send_all(head + body)
