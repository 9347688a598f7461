"""The printed summary of a benchmark run: one line per scenario (median [min .. max] of
the runs), each figure beside its same-run baseline, and a sizing rule."""

from __future__ import annotations

from typing import Any

Figures = dict[str, Any]


class _Section:
    """One scenario's summarised figures, formatted."""

    def __init__(self, figures: Figures) -> None:
        self.figures = figures

    def __call__(self, key: str, fmt: str = "{:.1f}") -> str:
        """`median [min .. max]`, or the median alone when every run gave the same."""
        value = self.figures[key]
        median, low, high = (fmt.format(value[k]) for k in ("median", "min", "max"))
        return median if low == high else f"{median} [{low} .. {high}]"

    def median(self, key: str) -> float:
        value: float = self.figures[key]["median"]
        return value

    def first(self, key: str) -> Any:
        return self.figures["runs"][0][key]


def _capacity(s: _Section) -> str:
    return (
        f"1. Capacity, {s.first('workers')} worker(s), {s.first('load_generators')} load "
        f"generator(s): {s('waiters', '{:.0f}')} streams "
        f"({s('waiters_per_worker', '{:.0f}')} per worker), errors {s('errors', '{:.0f}')}, "
        f"{s('retried_after_503', '{:.0f}')} agents retried after a full worker's 503; memory "
        f"per stream {s('rss_per_waiter_kb', '{:.2f}')} KB; "
        f"idle CPU {s('idle_cpu_percent', '{:.2f}')} % of a core with a ping every "
        f"{s.first('ping_interval_s'):g} s; /healthz at the limit p50 "
        f"{s('healthz_p50_ms', '{:.1f}')} ms, max {s('healthz_max_ms', '{:.1f}')} ms, "
        f"{s('healthz_failed', '{:.0f}')} of {s.first('healthz_probes')} failed; most files "
        f"in one worker {s('most_files_in_a_worker', '{:.0f}')}; SIGTERM to exit with all "
        f"streams open {s('shutdown_s', '{:.2f}')} s"
    )


def _latency(s: _Section) -> str:
    return (
        f"2. Latency, commit to frame, {s.first('claims')} claims at "
        f"{s.first('waiters')} waiters: p50 {s('p50_ms', '{:.2f}')} ms, p99 "
        f"{s('p99_ms', '{:.2f}')} ms, max {s('max_ms', '{:.2f}')} ms. Floor (raw asyncpg "
        f"LISTEN): p50 {s('floor_p50_ms', '{:.2f}')} ms, p99 {s('floor_p99_ms', '{:.2f}')} ms. "
        f"reinitd p99 minus floor p99: {s('p99_minus_floor_p99_ms', '{:.2f}')} ms; per-claim "
        f"overhead over the floor p50 {s('overhead_p50_ms', '{:.2f}')} ms, p99 "
        f"{s('overhead_p99_ms', '{:.2f}')} ms; server CPU per claim (paced, idle upkeep "
        f"included) {s('server_cpu_per_claim_us', '{:.0f}')} µs"
    )


def _burst(s: _Section) -> str:
    return (
        f"   Burst, all claims in one transaction: {s('delivered', '{:.0f}')} of "
        f"{s('waiters', '{:.0f}')} delivered, the last {s('all_delivered_s', '{:.3f}')} s "
        f"after COMMIT; CPU per delivered claim: server "
        f"{s('server_cpu_per_claim_us', '{:.0f}')} µs, PostgreSQL "
        f"{s('postgres_cpu_per_claim_us', '{:.0f}')} µs; the server's GC pauses meanwhile "
        f"{s('gc_pause_total_ms', '{:.1f}')} ms. Beside plain aiohttp writing each "
        f"NOTIFY's payload to its streams (no read), same run: the last "
        f"{s('fanout_all_delivered_s', '{:.3f}')} s = {s('all_delivered_ratio', '{:.2f}')}x; "
        f"server CPU {s('fanout_server_cpu_per_claim_us', '{:.0f}')} µs per claim = "
        f"{s('server_cpu_per_claim_ratio', '{:.2f}')}x"
    )


def _storm(s: _Section) -> str:
    return (
        f"3. Reconnect storm, {s.first('agents')} wait=true agents at once, "
        f"{s.first('workers')} worker(s), beside plain aiohttp (no database) in the same run: "
        f"{s('connects_per_s', '{:.0f}')} connects/s vs {s('plain_connects_per_s', '{:.0f}')} "
        f"= {s('connects_ratio', '{:.2f}')}x; server CPU per connect "
        f"{s('server_cpu_per_connect_ms', '{:.3f}')} ms vs "
        f"{s('plain_server_cpu_per_connect_ms', '{:.3f}')} ms = "
        f"{s('cpu_per_connect_ratio', '{:.2f}')}x (PostgreSQL "
        f"{s('postgres_cpu_per_connect_ms', '{:.3f}')} ms more); memory per idle stream "
        f"{s('memory_per_stream_kb', '{:.2f}')} KB vs {s('plain_memory_per_stream_kb', '{:.2f}')}"
        f" KB = {s('memory_per_stream_ratio', '{:.2f}')}x; errors {s('errors', '{:.0f}')} "
        f"(plain {s('plain_errors', '{:.0f}')}); time to first byte p50 "
        f"{s('ttfb_p50_ms', '{:.0f}')} ms, p99 {s('ttfb_p99_ms', '{:.0f}')} ms; already-claimed "
        f"agents served {s('claimed_delivered', '{:.0f}')} of {s('claimed', '{:.0f}')}"
    )


def _forged(s: _Section) -> str:
    return (
        f"   Forged-NOTIFY flood (a role with no grants, naming waited-on workspaces): "
        f"{s('forged_per_s', '{:.0f}')} NOTIFY/s; server CPU "
        f"{s('server_cpu_percent', '{:.0f}')} % of a core; log lines (other than the real "
        f"claims' reinit_delivered) {s('log_lines_per_s', '{:.2f}')}/s; streams ended "
        f"{s('streams_closed', '{:.0f}')}; real claims meanwhile {s('delivered', '{:.0f}')} "
        f"of {s('claims', '{:.0f}')}, p99 {s('p99_ms', '{:.2f}')} ms = floor p99 "
        f"{s('floor_p99_ms', '{:.2f}')} ms + {s('p99_minus_floor_p99_ms', '{:.2f}')} ms"
    )


def _flood(s: _Section) -> str:
    return (
        f"   Idle-socket flood, 2 x {s.first('idle_requested') // 2} connections that send "
        f"nothing ({s('idle_connected', '{:.0f}')} connected as the clients see it, "
        f"{s('idle_timed_out', '{:.0f}')} timed out, {s('idle_failed', '{:.0f}')} failed; "
        f"{s('idle_still_open', '{:.0f}')} still open after {s('flood_s', '{:.1f}')} s), "
        f"{s.first('streams')} streams open: server files once it landed "
        f"{s('server_files_in_flood', '{:.0f}')}, CPU {s('server_cpu_percent', '{:.0f}')} % of "
        f"a core; /healthz p50 {s('healthz_p50_ms', '{:.1f}')} ms, max "
        f"{s('healthz_max_ms', '{:.1f}')} ms, {s('healthz_failed', '{:.0f}')} of "
        f"{s.first('healthz_probes')} failed; /readyz p50 {s('readyz_p50_ms', '{:.1f}')} ms, "
        f"{s('readyz_failed', '{:.0f}')} of {s.first('readyz_probes')} failed; claims to open "
        f"streams {s('claim_delivered', '{:.0f}')} of {s('claim_claims', '{:.0f}')} delivered, "
        f"p50 {s('claim_p50_ms', '{:.1f}')} ms, max {s('claim_max_ms', '{:.1f}')} ms (floor "
        f"p50 {s('claim_floor_p50_ms', '{:.1f}')} ms); log grew {s('log_mb', '{:.2f}')} MB "
        f"({s('log_mb_per_s', '{:.2f}')} MB/s, {s('log_lines', '{:.0f}')} lines, most: "
        f"{s.first('log_top_events')}); /healthz answered "
        f"{s('healthz_after_flood_s', '{:.2f}')} s after the flood closed"
    )


def _compound(s: _Section) -> str:
    return (
        f"   Stalled database under a flood: PostgreSQL stopped {s.first('stall_s')} s while "
        f"{s.first('flood')} sockets sent heads (3 in 4 split in two): /healthz "
        f"{s('healthz_failed', '{:.0f}')} of {s.first('healthz_probes')} failed; peak requests "
        f"in flight and streams {s('peak_slots', '{:.0f}')}; RSS +"
        f"{s('rss_peak_growth_kb', '{:.0f}')} kB at its peak; an agent starting mid-stall "
        f"waited {s('agent_wait_s', '{:.2f}')} s ({s('agent_after_resume_s', '{:.2f}')} s after "
        f"the database came back); {s('refused_early', '{:.0f}')} heads refused early (503), "
        f"answers {s.first('flood_answers')}"
    )


def _naive(naive: Figures, out: Figures) -> str:
    line = (
        f"4. Naive baseline (a connection and LISTEN per request): held "
        f"{naive['waiters_held']} waiters, {naive['broke_with']}; "
        f"{naive['memory_per_waiter_kb']:.0f} KB per waiter (server "
        f"{naive['server_rss_per_waiter_kb']:.0f} + PostgreSQL backend PSS "
        f"{naive['postgres_pss_per_waiter_kb']:.0f})"
    )
    if "capacity_w1" in out:
        ours = out["capacity_w1"]["rss_per_waiter_kb"]["median"]
        line += f"; reinitd holds {naive['memory_per_waiter_kb'] / ours:.0f}x the waiters per GB"
    return line


def _recovery(rec: Figures) -> str:
    return (
        f"5. Recovery: listener backend killed, claim committed at once: event after "
        f"{rec['killed_listener_to_event_s']:.3f} s; PostgreSQL restarted (fast), claim "
        f"after it: event {rec['postgres_restart_to_event_s']:.3f} s after the restart began"
    )


def _presence_storm(s: _Section) -> str:
    return (
        f"6. Presence cost, storm of {s.first('agents')} wait=true agents, 1 worker, same run: "
        f"presence on {s('on_connects_per_s', '{:.0f}')} connects/s, off "
        f"{s('off_connects_per_s', '{:.0f}')}, plain aiohttp {s('plain_connects_per_s', '{:.0f}')}"
        f": on/off {s('on_over_off', '{:.3f}')}x (on/plain {s('on_connects_ratio', '{:.2f}')}x, "
        f"off/plain {s('off_connects_ratio', '{:.2f}')}x); errors on "
        f"{s('on_errors', '{:.0f}')}, off {s('off_errors', '{:.0f}')}; server CPU per connect "
        f"on {s('on_server_cpu_per_connect_ms', '{:.3f}')} ms, off "
        f"{s('off_server_cpu_per_connect_ms', '{:.3f}')} ms; PostgreSQL CPU per connect on "
        f"{s('on_postgres_cpu_per_connect_ms', '{:.3f}')} ms, off "
        f"{s('off_postgres_cpu_per_connect_ms', '{:.3f}')} ms; statements the server ran "
        f"(pg_stat_statements, the storm and the reports after it) on "
        f"{s('on_statements', '{:.0f}')} of which presence {s('on_presence_statements', '{:.0f}')}"
        f" ({s('on_presence_statement_ms', '{:.1f}')} ms of execution), off "
        f"{s('off_statements', '{:.0f}')}; per second of storm on "
        f"{s('on_statements_per_s', '{:.0f}')}, off {s('off_statements_per_s', '{:.0f}')}; rows "
        f"written: presence {s('on_presence_rows_written', '{:.0f}')}, receipts "
        f"{s('on_receipt_rows_written', '{:.0f}')}; warnings logged on "
        f"{s('on_log_warnings', '{:.0f}')}, off {s('off_log_warnings', '{:.0f}')}"
    )


def _presence_held(s: _Section) -> str:
    return (
        f"   Presence at {s('streams', '{:.0f}')} streams (1 worker): all in agent_presence "
        f"{s('presence_shown_s', '{:.2f}')} s after the last opened; presence "
        f"{s('presence_rows', '{:.0f}')} rows, {s('presence_bytes', '{:.0f}')} bytes "
        f"({s('presence_bytes_per_stream', '{:.0f}')} per stream), replicas "
        f"{s('replicas_bytes', '{:.0f}')} bytes, delivery_receipts "
        f"{s('receipts_rows', '{:.0f}')} rows, {s('receipts_bytes', '{:.0f}')} bytes; receipt lag "
        f"(frame at its agent -> row visible, polled every {s.first('receipt_poll_ms'):g} ms), "
        f"{s('receipts_seen', '{:.0f}')} of {s('delivered', '{:.0f}')} claims: p50 "
        f"{s('receipt_lag_p50_ms', '{:.0f}')} ms, p99 {s('receipt_lag_p99_ms', '{:.0f}')} ms, "
        f"max {s('receipt_lag_max_ms', '{:.0f}')} ms"
    )


def _scale(s: _Section) -> str:
    return (
        f"7. Scale, {s('streams', '{:.0f}')} streams over {s.first('workers')} workers "
        f"({s.first('load_generators')} load generators, log level {s.first('log_level')}): "
        f"errors {s('errors', '{:.0f}')} ({s('retried_after_503', '{:.0f}')} retried after a "
        f"503), opened in {s('open_s', '{:.0f}')} s; memory per stream: servers' RSS "
        f"{s('rss_per_stream_kb', '{:.2f}')} KB, kernel slab "
        f"{s('kernel_slab_per_stream_kb', '{:.2f}')} KB (unreclaimable "
        f"{s('kernel_unreclaimable_per_stream_kb', '{:.2f}')}) + TCP buffers "
        f"{s('kernel_tcp_buffers_per_stream_kb', '{:.2f}')} KB (both ends of each loopback "
        f"connection); idle CPU at the 15 s ping {s('idle_cpu_percent', '{:.1f}')} % of a core "
        f"= {s('idle_cpu_percent_per_10k', '{:.2f}')} % per 10 000 agents (PostgreSQL "
        f"meanwhile {s('postgres_idle_cpu_percent', '{:.1f}')} %); /healthz p50 "
        f"{s('healthz_p50_ms', '{:.1f}')} ms, {s('healthz_failed', '{:.0f}')} failed; "
        f"{s('delivered', '{:.0f}')} of {s('claims', '{:.0f}')} paced claims: p50 "
        f"{s('p50_ms', '{:.2f}')} ms, p99 {s('p99_ms', '{:.2f}')} ms, max "
        f"{s('max_ms', '{:.2f}')} ms (LISTEN floor p50 {s('floor_p50_ms', '{:.2f}')}, p99 "
        f"{s('floor_p99_ms', '{:.2f}')} ms); SIGTERM to exit {s('shutdown_s', '{:.2f}')} s (CPU "
        f"meanwhile: servers {s('stop_cpu_servers_s', '{:.2f}')} s, load generators "
        f"{s('stop_cpu_load_generators_s', '{:.2f}')} s, PostgreSQL "
        f"{s('stop_cpu_postgres_s', '{:.2f}')} s; the "
        f"slowest worker's cleanup {s('worker_stop_max_s', '{:.2f}')} s; "
        f"{s('stop_log_lines', '{:.0f}')} log lines meanwhile: {s.first('stop_log_top_events')})"
    )


def _lone(s: _Section) -> str:
    return (
        f"   Lone connects, {s.first('connects')} one at a time at {s.first('rate'):g}/s, "
        f"connect to response head: p50 {s('p50_ms', '{:.2f}')} ms, p99 "
        f"{s('p99_ms', '{:.2f}')} ms; plain aiohttp p50 {s('plain_p50_ms', '{:.2f}')} ms, p99 "
        f"{s('plain_p99_ms', '{:.2f}')} ms; over plain at p50 "
        f"{s('over_plain_p50_ms', '{:+.2f}')} ms, of which the database's round trip for "
        f"admit_one is {s('database_p50_ms', '{:.2f}')} ms; server CPU per connect (idle "
        f"upkeep included) {s('server_cpu_per_connect_ms', '{:.3f}')} ms, plain "
        f"{s('plain_server_cpu_per_connect_ms', '{:.3f}')} ms"
    )


def _baselines(out: Figures) -> list[str]:
    """reinitd's figure, the same run's baseline and the ratio, side by side (medians)."""
    rows: list[tuple[str, str, str, str]] = []
    for key in sorted(k for k in out if k.startswith("storm_w")):
        s, w = _Section(out[key]), f"{out[key]['runs'][0]['workers']}w"
        rows += [
            (
                f"storm connects/s ({w})",
                f"{s.median('connects_per_s'):.0f}",
                f"{s.median('plain_connects_per_s'):.0f} plain",
                f"{s.median('connects_ratio'):.2f}x",
            ),
            (
                f"server CPU per connect, ms ({w})",
                f"{s.median('server_cpu_per_connect_ms'):.3f}",
                f"{s.median('plain_server_cpu_per_connect_ms'):.3f} plain",
                f"{s.median('cpu_per_connect_ratio'):.2f}x",
            ),
            (
                f"memory per idle stream, KB ({w})",
                f"{s.median('memory_per_stream_kb'):.2f}",
                f"{s.median('plain_memory_per_stream_kb'):.2f} plain",
                f"{s.median('memory_per_stream_ratio'):.2f}x",
            ),
        ]
    if "burst" in out:
        s = _Section(out["burst"])
        rows.append(
            (
                "burst, last frame after COMMIT, s",
                f"{s.median('all_delivered_s'):.3f}",
                f"{s.median('fanout_all_delivered_s'):.3f} fan-out",
                f"{s.median('all_delivered_ratio'):.2f}x",
            )
        )
    # Latencies, each beside its floor in ms: (section, figure, ours, floor, floor's name, gap).
    for key, name, ours, floor, label, gap in (
        ("lone", "lone connect p50", "p50_ms", "plain_p50_ms", "plain", "over_plain_p50_ms"),
        (
            "latency",
            "claim -> frame p99",
            "p99_ms",
            "floor_p99_ms",
            "LISTEN",
            "p99_minus_floor_p99_ms",
        ),
    ):
        if key in out:
            s = _Section(out[key])
            rows.append(
                (
                    f"{name}, ms",
                    f"{s.median(ours):.2f}",
                    f"{s.median(floor):.2f} {label}",
                    f"{s.median(gap):+.2f} ms",
                )
            )
    if not rows:
        return []
    header = ("same-run baselines (medians)", "reinitd", "baseline", "ratio")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _sizing(out: Figures) -> list[str]:
    """Claims/s and agents per core, from the server's own CPU (medians)."""
    parts = []
    if "storm_w1" in out:
        s = _Section(out["storm_w1"])
        parts.append(
            f"a core connects ~{1000 / s.median('server_cpu_per_connect_ms'):.0f} agents/s "
            f"(PostgreSQL adds {s.median('postgres_cpu_per_connect_ms'):.3f} ms per connect)"
        )
    if "burst" in out:
        s = _Section(out["burst"])
        parts.append(
            f"delivers ~{1e6 / s.median('server_cpu_per_claim_us'):.0f} claims/s in bursts"
        )
    if "latency" in out:
        s = _Section(out["latency"])
        parts.append(
            f"~{1e6 / s.median('server_cpu_per_claim_us'):.0f} claims/s one at a time "
            "(idle upkeep included)"
        )
    if "capacity_w1" in out:
        s = _Section(out["capacity_w1"])
        upkeep = 1e4 * s.median("idle_cpu_percent") / max(1.0, s.median("waiters"))
        parts.append(
            f"holds idle agents at {s.median('rss_per_waiter_kb'):.1f} KB each and "
            f"{upkeep:.2f} % of a core per 10 000 agents with a ping every "
            f"{s.first('ping_interval_s'):g} s"
        )
    return [f"Sizing (server process CPU only): {'; '.join(parts)}."] if parts else []


# Sections summarised by a line of their own, in the report's order.
_LINES = {
    "latency": _latency,
    "burst": _burst,
    "lone": _lone,
    "forged": _forged,
    "flood": _flood,
    "compound": _compound,
    "presence_storm": _presence_storm,
    "presence_held": _presence_held,
    "scale": _scale,
}


def report(out: Figures) -> str:
    lines = [f"reinitd benchmark: {out['machine']}", "(median [min .. max] of the runs)", ""]
    for key in sorted(k for k in out if k.startswith("capacity_w")):
        lines.append(_capacity(_Section(out[key])))
    for key in ("latency", "burst"):
        if key in out:
            lines.append(_LINES[key](_Section(out[key])))
    for key in sorted(k for k in out if k.startswith("storm_w")):
        lines.append(_storm(_Section(out[key])))
    for key in ("lone", "forged", "flood", "compound"):
        if key in out:
            lines.append(_LINES[key](_Section(out[key])))
    if "naive" in out:
        lines.append(_naive(out["naive"]["runs"][0], out))
    if "recovery" in out:
        lines.append(_recovery(out["recovery"]["runs"][0]))
    for key in ("presence_storm", "presence_held", "scale"):
        if key in out:
            lines.append(_LINES[key](_Section(out[key])))
    for block in (_baselines(out), _sizing(out)):
        if block:
            lines += ["", *block]
    return "\n".join(lines)
