"""The benchmark's printed table, ratios and acceptance targets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.loadgen import WrkResult

MIN_GATEWAY_RPS = 2000.0
"""Gateway throughput at the main connection count (req/s)."""
MAX_ADDED_P50_MS = 3.0
"""Gateway p50 minus direct p50, at 1 and at the main connection count (ms)."""
MIN_VS_LITELLM = 3.0
"""Gateway req/s over LiteLLM req/s."""
MIN_VS_THIN = 0.8
"""Gateway req/s over the thin forwarder's req/s."""


@dataclass(frozen=True)
class Row:
    """One measured (or skipped) cell: a system, a body mode, a connection count."""

    system: str
    mode: str
    """``json`` or ``stream``."""
    connections: int
    result: WrkResult | None
    cpu_ms_per_request: float | None = None
    """CPU time of the server under test per request (its whole process group)."""
    other_cpus: float | None = None
    """CPUs kept busy meanwhile by processes that are not part of the benchmark."""
    note: str = ""


class Results:
    """Rows looked up by (system, mode, connections)."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def row(self, system: str, mode: str, connections: int) -> Row | None:
        for row in self.rows:
            if (row.system, row.mode, row.connections) == (system, mode, connections):
                return row
        return None

    def get(self, system: str, mode: str, connections: int) -> WrkResult | None:
        row = self.row(system, mode, connections)
        return row.result if row else None

    def cpu_ratio(self, system: str, other: str, mode: str, connections: int) -> float | None:
        """``other``'s CPU per request over ``system``'s: capacity per core, which other
        load on the machine hardly changes (unlike req/s)."""
        mine, theirs = self.row(system, mode, connections), self.row(other, mode, connections)
        if mine and theirs and mine.cpu_ms_per_request and theirs.cpu_ms_per_request:
            return theirs.cpu_ms_per_request / mine.cpu_ms_per_request
        return None


def print_table(results: Results) -> None:
    print(f"\n{'system':<9}{'mode':<8}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'+p50 ms':>9}{'errors':>8}{'cpu ms/req':>12}{'other cpu':>11}  note")
    for row in results.rows:
        r = row.result
        if r is None:
            print(f"{row.system:<9}{row.mode:<8}{row.connections:>6}{'-':>10}{'-':>9}{'-':>9}"
                  f"{'-':>9}{'-':>8}{'-':>12}{'-':>11}  {row.note}")
            continue
        direct = results.get("direct", row.mode, row.connections)
        added = f"{(r.p50_us - direct.p50_us) / 1000:+.2f}" if direct and row.system != "direct" \
            else "-"
        cpu = f"{row.cpu_ms_per_request:.2f}" if row.cpu_ms_per_request is not None else "-"
        other = f"{row.other_cpus:.2f}" if row.other_cpus is not None else "-"
        print(f"{row.system:<9}{row.mode:<8}{row.connections:>6}{r.rps:>10,.0f}"
              f"{r.p50_us / 1000:>9.2f}{r.p99_us / 1000:>9.2f}{added:>9}{r.errors:>8}{cpu:>12}"
              f"{other:>11}"
              f"  {row.note}")


def print_noise(results: Results, cpus: int) -> None:
    """Warn when other processes competed for the CPUs during the measured rows."""
    others = [row.other_cpus for row in results.rows if row.other_cpus is not None]
    if others and max(others) > 0.2:
        print(f"\nWARNING: other processes kept up to {max(others):.1f} of {cpus} CPUs busy "
              "during measured rows ('other cpu'): absolute numbers are depressed; ratios "
              "between rows measured under similar 'other cpu' are still meaningful.")


def print_ratios(results: Results, connections: int) -> None:
    """Ratios measured side by side, with the acceptance targets (never an exit code)."""
    c = connections
    gw, gw1 = results.get("gateway", "json", c), results.get("gateway", "json", 1)
    direct, direct1 = results.get("direct", "json", c), results.get("direct", "json", 1)
    thin, litellm = results.get("thin", "json", c), results.get("litellm", "json", c)
    gws, thins = results.get("gateway", "stream", c), results.get("thin", "stream", c)
    litellms = results.get("litellm", "stream", c)

    def rps(r: WrkResult | None) -> float | None:
        return r.rps if r else None

    def ratio(a: WrkResult | None, b: WrkResult | None) -> float | None:
        return a.rps / b.rps if a and b and b.rps else None

    def added(a: WrkResult | None, b: WrkResult | None) -> float | None:
        return (a.p50_us - b.p50_us) / 1000 if a and b else None

    print("\nratios (same run, same machine)")
    line(f"gateway req/s @{c} conns", rps(gw), "{:,.0f}", ">=", MIN_GATEWAY_RPS)
    line("added p50 gateway-direct @1 conn (ms)", added(gw1, direct1), "{:.2f}", "<=",
          MAX_ADDED_P50_MS)
    line(f"added p50 gateway-direct @{c} conns (ms)", added(gw, direct), "{:.2f}", "<=",
          MAX_ADDED_P50_MS)
    line(f"gateway / litellm req/s @{c}", ratio(gw, litellm), "{:.1f}x", ">=", MIN_VS_LITELLM)
    line(f"gateway / thin req/s @{c}", ratio(gw, thin), "{:.2f}", ">=", MIN_VS_THIN)
    line(f"gateway / direct req/s @{c}", ratio(gw, direct), "{:.3f}")
    line(f"thin / litellm req/s @{c}", ratio(thin, litellm), "{:.1f}x")
    line(f"stream: gateway / thin req/s @{c}", ratio(gws, thins), "{:.2f}")
    line(f"stream: gateway / litellm req/s @{c}", ratio(gws, litellms), "{:.1f}x")
    print("  capacity per CPU (from cpu ms/req; robust to other load on the machine):")
    line(f"gateway / thin @{c}", results.cpu_ratio("gateway", "thin", "json", c), "{:.2f}",
          ">=", MIN_VS_THIN)
    line(f"gateway / litellm @{c}", results.cpu_ratio("gateway", "litellm", "json", c),
          "{:.1f}x", ">=", MIN_VS_LITELLM)
    line(f"stream: gateway / thin @{c}", results.cpu_ratio("gateway", "thin", "stream", c),
          "{:.2f}")
    gw_cpu = results.row("gateway", "json", c)
    if gw_cpu and gw_cpu.cpu_ms_per_request:
        line("gateway req/s per CPU (1000 / cpu ms/req)", 1000 / gw_cpu.cpu_ms_per_request,
              "{:,.0f}")


_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda value, goal: value >= goal,
    "<=": lambda value, goal: value <= goal,
}


def line(label: str, value: float | None, fmt: str, op: str = "",
          goal: float | None = None) -> None:
    shown = fmt.format(value) if value is not None else "n/a"
    if not op or goal is None:
        verdict = ""
    elif value is None:
        verdict = f"target {op} {goal:g}  SKIP"
    else:
        verdict = f"target {op} {goal:g}  {'PASS' if _COMPARE[op](value, goal) else 'FAIL'}"
    print(f"  {label:<44}{shown:>10}   {verdict}")
