"""The printed summary of a benchmark run: one line per scenario (median [min .. max] of
the runs)."""

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
        f"generator(s), --max-streams {s.first('max_streams')}: {s('waiters', '{:.0f}')} "
        f"streams ({s('waiters_per_worker', '{:.0f}')} per worker), errors "
        f"{s('errors', '{:.0f}')}; memory per stream {s('rss_per_waiter_kb', '{:.2f}')} KB; "
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
        f"{s('overhead_p99_ms', '{:.2f}')} ms"
    )


def _burst(s: _Section) -> str:
    return (
        f"   Burst, all claims in one transaction: {s('delivered', '{:.0f}')} of "
        f"{s('waiters', '{:.0f}')} delivered, the last {s('all_delivered_s', '{:.3f}')} s "
        f"after COMMIT"
    )


def _storm(s: _Section) -> str:
    return (
        f"3. Reconnect storm, {s.first('agents')} wait=true agents at once, "
        f"{s.first('workers')} worker(s): {s('connects_per_s', '{:.0f}')} connects/s; server "
        f"CPU per connect {s('server_cpu_per_connect_ms', '{:.3f}')} ms (PostgreSQL "
        f"{s('postgres_cpu_per_connect_ms', '{:.3f}')} ms more); memory per idle stream "
        f"{s('memory_per_stream_kb', '{:.2f}')} KB; errors {s('errors', '{:.0f}')}; time to "
        f"first byte p50 {s('ttfb_p50_ms', '{:.0f}')} ms, p99 {s('ttfb_p99_ms', '{:.0f}')} ms; "
        f"already-claimed agents served {s('claimed_delivered', '{:.0f}')} of "
        f"{s('claimed', '{:.0f}')}"
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


def report(out: Figures) -> str:
    lines = [f"reinitd benchmark: {out['machine']}", "(median [min .. max] of the runs)", ""]
    for key in sorted(k for k in out if k.startswith("capacity_w")):
        lines.append(_capacity(_Section(out[key])))
    if "latency" in out:
        lines.append(_latency(_Section(out["latency"])))
    if "burst" in out:
        lines.append(_burst(_Section(out["burst"])))
    for key in sorted(k for k in out if k.startswith("storm_w")):
        lines.append(_storm(_Section(out[key])))
    if "forged" in out:
        lines.append(_forged(_Section(out["forged"])))
    if "naive" in out:
        lines.append(_naive(out["naive"]["runs"][0], out))
    if "recovery" in out:
        lines.append(_recovery(out["recovery"]["runs"][0]))
    return "\n".join(lines)
