"""Prometheus metrics, defined once at import (registering twice raises)."""

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from reinitd.server.database import OUTAGE_KINDS

# `_created` samples only double the scrape; nobody alerts on them. (Untyped upstream.)
disable_created_metrics()  # type: ignore[no-untyped-call]

_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Tally(Collector):
    """A counter for the hottest paths: a plain integer, read only when scraped (a Counter
    takes a lock on every increment)."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.value = 0
        REGISTRY.register(self)

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.value)


PAYLOADS_RECEIVED = Tally("reinitd_claim_payloads", "NOTIFY payloads received on the claim channel")

OPEN_STREAMS = Gauge("reinitd_open_streams", "Reinit requests currently waiting", ["wait"])
EVENTS_DELIVERED = Counter(
    "reinitd_events_delivered_total",
    "Reinit events written to agents, by how they were found",
    ["path"],
)
PAYLOADS_INVALID = Counter(
    "reinitd_claim_payloads_invalid_total", "NOTIFY payloads ignored as invalid", ["kind"]
)
LISTENER_CONNECTED = Gauge(
    "reinitd_listener_connected", "1 while the LISTEN connection is up, else 0"
)
LISTENER_RECONNECTS = Counter(
    "reinitd_listener_reconnects_total", "LISTEN connections re-established after a loss"
)
DOORBELL_OUTCOMES = ("claimed", "refused", "unconfirmed", "no_waiters")
DOORBELLS = Counter(
    "reinitd_doorbells_total",
    "NOTIFYs naming a workspace, by what the database said: claimed, refused (the claim "
    "failed, or is in the past), unconfirmed (nothing to deliver: a forgery or a stray "
    "NOTIFY), no_waiters (no stream here waits on it: not read)",
    ["outcome"],
)
READS = Counter(
    "reinitd_reads_total",
    "Batched build reads for doorbells, resyncs and the safety-net timer",
    ["outcome"],
)
READ_SECONDS = Histogram(
    "reinitd_read_duration_seconds", "Duration of one batched build read", buckets=_FAST_BUCKETS
)
SLOTS_IN_USE = Gauge(
    "reinitd_admission_slots",
    "Process slots held by admitted requests (at rest: equal to the open streams)",
)
DURABLE_CHECK_SECONDS = Histogram(
    "reinitd_durable_check_duration_seconds",
    "Duration of the per-request build read",
    buckets=_FAST_BUCKETS,
)
CONNECT_READ_BATCH = Histogram(
    "reinitd_connect_read_batch_size",
    "Connects read from the database together, in one round trip",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1000),
)
RESPONSES = Counter("reinitd_responses_total", "Reinit responses by status", ["status"])
NOTIFY_TO_WRITE_SECONDS = Histogram(
    "reinitd_notify_to_write_seconds",
    "From the listener's receipt of a NOTIFY to the frame written",
    buckets=_FAST_BUCKETS,
)
QUEUE_OVERFLOWS = Counter(
    "reinitd_queue_overflows_total", "Streams ended because their bounded queue overflowed"
)
STALLED_CLIENTS = Counter(
    "reinitd_stalled_clients_total", "Streams ended because the client stopped reading"
)
REFUSALS = Counter(
    "reinitd_refusals_total", "Requests refused, by reason (auth, limits, conflicts)", ["reason"]
)
DATABASE_OUTAGES = Counter(
    "reinitd_database_outages_total",
    "Requests refused with 503 because PostgreSQL was away or turned the server away, by kind "
    "(not_allowed: the login, password or database, for an operator to fix)",
    ["kind"],
)

CLOSE_REASONS = ("evicted", "shed", "silent")
# Heads answered 503 from the admission gate, without reaching the database.
GATE_REFUSALS = ("database_stalled", "queued_too_long", "queue_full")
CONNECTIONS = Gauge("reinitd_connections", "Open client connections")
CONNECTIONS_CLOSED = Counter(
    "reinitd_connections_closed_total",
    "Client connections closed by the connection budget: evicted (an idle one, or one waiting "
    "for admission, answered 503, to make room), shed (a new one, with neither), silent (no byte "
    "before the first-byte deadline)",
    ["reason"],
)
ACCEPT_ERRORS = Counter(
    "reinitd_accept_errors_total", "Connections the kernel could not hand over (out of files)"
)
CLIENT_GONE = Counter(
    "reinitd_client_gone_total",
    "Requests whose client hung up before the answer could be sent (answered 499 in the log)",
)

PRESENCE_REPORT_OUTCOMES = ("ok", "reasserted", "failed")
PRESENCE_REPORTS = Counter(
    "reinitd_presence_reports_total",
    "Presence reports to the database: ok (what changed), reasserted (everything held: the "
    "first, and after a failure, a reconnect or a database that lost this replica), failed",
    ["outcome"],
)
RECEIPT_OUTCOMES = ("written", "dropped")
RECEIPTS = Counter(
    "reinitd_receipts_total",
    "Delivery receipts: written to the database, or dropped (the buffer was full while the "
    "database was away, or the server stopped before it came back)",
    ["outcome"],
)
RECEIPTS_PENDING = Gauge(
    "reinitd_receipts_pending", "Delivery receipts waiting to be written to the database"
)

# Every labelled series exists from the start, at 0, so that alert rules have something to
# evaluate before the first occurrence.
for _outcome in DOORBELL_OUTCOMES:
    DOORBELLS.labels(_outcome)
for _outcome in ("ok", "failed"):
    READS.labels(_outcome)
for _kind in ("too_long", "bad_json", "bad_uuid"):
    PAYLOADS_INVALID.labels(_kind)
for _path in ("seeded", "notify", "resync"):
    EVENTS_DELIVERED.labels(_path)
for _reason in CLOSE_REASONS:
    CONNECTIONS_CLOSED.labels(_reason)
for _outcome in PRESENCE_REPORT_OUTCOMES:
    PRESENCE_REPORTS.labels(_outcome)
for _outcome in RECEIPT_OUTCOMES:
    RECEIPTS.labels(_outcome)
for _kind in OUTAGE_KINDS:
    DATABASE_OUTAGES.labels(_kind)
for _reason in GATE_REFUSALS:
    REFUSALS.labels(_reason)
for _wait in ("true", "false"):
    OPEN_STREAMS.labels(_wait)
for _status in ("200", "204", "400", "401", "404", "405", "409", "429", "499", "500", "503"):
    RESPONSES.labels(_status)
for _reason in (
    "no_token",
    "malformed_token",
    "unknown_token",
    "bad_timeout",
    "not_waiting",
    "agent_stream_limit",
    "server_full",
    "wait_ended",
    "shutting_down",
    "bad_request",
    "database_unavailable",
):
    REFUSALS.labels(_reason)

GC_PAUSE = Histogram(
    "reinitd_gc_pause_seconds",
    "Garbage-collection pauses of this process, by generation (2: a full collection)",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
GC_PAUSE_SECONDS = {generation: GC_PAUSE.labels(str(generation)) for generation in (0, 1, 2)}
GC_SETTLES = Counter(
    "reinitd_gc_settles_total",
    "Full collections run by reinitd itself (after a storm of new streams, and every 10 min)",
)
