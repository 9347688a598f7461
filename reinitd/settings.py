"""Server settings: one frozen value built by the CLI (or a test) and stored on the app."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str
    # LISTEN cannot go through a transaction-pooling PgBouncer: point this straight at Postgres.
    listen_database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    ping_interval: float = 15.0
    write_timeout: float = 10.0
    resync_interval: float = 30.0
    probe_interval: float = 2.0
    probe_timeout: float = 2.0
    queue_limit: int = 16
    pool_min_size: int = 2
    pool_max_size: int = 10
    shutdown_timeout: float = 5.0
    backlog: int = 4096
    # Admission limits (make bench measured ~19 000 idle streams per process at 20 000 files).
    max_streams: int = 18_000
    max_streams_per_agent: int = 8
    # A client must finish its request headers within this (slowloris); also the idle
    # keep-alive limit between requests.
    header_timeout: float = 30.0
    max_line_size: int = 8190
    max_field_size: int = 8190
    max_headers: int = 64

    @property
    def listen_dsn(self) -> str:
        return self.listen_database_url or self.database_url
