"""The hot-swap part's load generator, weights publisher and report.

:class:`Driver` sends chat requests through the gateway at a fixed rate (open loop: each
request starts at its scheduled time whatever the others do, and its latency counts from
that time), publishes ``weights`` events to the gateway's Redis while it does, and reads
the gateway's ``/metrics`` at both ends of each window.
"""

from __future__ import annotations

import asyncio
import gc
import re
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import aiohttp
import orjson
import redis.asyncio as aioredis

from bench.loadgen import API_KEY
from shared.keys import WEIGHTS, Keys
from shared.messages import WeightsEventV1

NAMESPACE = "reef"
"""The gateway's default namespace (its weights stream is ``reef:stream:weights``)."""
BODY_MESSAGES = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
                 {"role": "user", "content": "Name one colour of the rainbow."}]
MAX_TOKENS = 8
SESSIONS = 32
_SWAPS = re.compile(r'^reef_gateway_adapter_swaps_total\{outcome="(\w+)"\} (\S+)$', re.M)
_LIVE = re.compile(r"^reef_gateway_live_adapter_version (\S+)$", re.M)


@dataclass(frozen=True)
class Sample:
    start: float
    """Scheduled start, seconds from the window's start."""
    latency: float
    ok: bool
    model: str
    lag: float = 0.0
    """How late the load generator sent it (its own stalls, not the gateway's)."""


@dataclass(frozen=True)
class GatewayState:
    swaps: dict[str, float]
    live_version: float


@dataclass
class Window:
    """One measured window: its requests and what the gateway says happened."""

    kind: str
    seconds: float
    samples: list[Sample]
    published: list[tuple[float, str]]
    """(seconds from window start, adapter name) of each weights event."""
    before: GatewayState
    after: GatewayState
    other_cpus: float = 0.0
    round_no: int = 0

    def latencies(self) -> list[float]:
        return [s.latency for s in self.samples if s.ok]

    @property
    def errors(self) -> int:
        return sum(not s.ok for s in self.samples)

    def swaps(self, outcome: str = "ok") -> int:
        return int(self.after.swaps.get(outcome, 0) - self.before.swaps.get(outcome, 0))

    def max_lag(self) -> float:
        return max((s.lag for s in self.samples), default=0.0)

    def live_after(self) -> list[float]:
        """Seconds from each event's publication to the first answer by its adapter
        (of a request started after it): the swap as a client sees it."""
        result = []
        for at, adapter in self.published:
            served = [s.start + s.latency for s in self.samples
                      if s.ok and s.model == adapter and s.start >= at]
            if served:
                result.append(min(served) - at)
        return result

    def describe(self) -> str:
        lat = sorted(self.latencies())
        text = (f"{self.kind}: {len(self.samples)} requests, p50 {pct(lat, 50) * 1000:.1f} ms, "
                f"p99 {pct(lat, 99) * 1000:.1f} ms, errors {self.errors}, "
                f"other cpus {self.other_cpus:.2f}, send lag max {self.max_lag() * 1000:.0f} ms")
        if self.published:
            text += (f", swaps ok {self.swaps()}/{len(self.published)}, live version "
                     f"{self.before.live_version:g} -> {self.after.live_version:g}")
        return text

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies())
        return {"kind": self.kind, "round": self.round_no, "requests": len(self.samples),
                "errors": self.errors, "p50": pct(lat, 50), "p90": pct(lat, 90),
                "p99": pct(lat, 99), "max": lat[-1] if lat else None,
                "other_cpus": self.other_cpus, "published": self.published,
                "swaps_ok": self.swaps(), "live_before": self.before.live_version,
                "live_after": self.after.live_version, "models": Counter(
                    s.model for s in self.samples)}


def pct(sorted_values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


class Driver:
    """Load, events and metrics for one or more gateways (``base_urls`` end in ``/v1``):
    requests go to each in turn; the state is what every gateway reached (the fewest swaps
    and the lowest live version: a version is live once every gateway routes to it)."""

    def __init__(self, base_urls: list[str], redis_url: str, adapters: list[Path]) -> None:
        self.chat_urls = [url + "/chat/completions" for url in base_urls]
        self.metrics_urls = [url.removesuffix("/v1") + "/metrics" for url in base_urls]
        self.redis = aioredis.Redis.from_url(redis_url)
        self.adapters = adapters
        self.version = 0
        self.body = orjson.dumps({"model": "reef", "messages": BODY_MESSAGES,
                                  "max_tokens": MAX_TOKENS, "temperature": 0.7})
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Driver:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=512),
            timeout=aiohttp.ClientTimeout(total=120))
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None
                        ) -> None:
        if self.session is not None:
            await self.session.close()
        await self.redis.aclose()

    async def publish(self) -> str:
        """One ``weights`` event for the next version; returns its adapter name."""
        self.version += 1
        adapter = f"reef-v{self.version}"
        path = self.adapters[(self.version - 1) % len(self.adapters)]
        event = WeightsEventV1(tenant="*", adapter=adapter, version=self.version,
                               path=str(path), step=self.version)
        await self.redis.xadd(Keys(NAMESPACE).stream(WEIGHTS), event.to_fields())  # type: ignore[arg-type]
        return adapter

    async def go_live(self, versions: int, timeout: float = 120.0) -> None:
        """Publish ``versions`` events and wait until the gateway routes to the last."""
        for _ in range(versions):
            await self.publish()
        deadline = time.monotonic() + timeout
        while (await self.state()).live_version < self.version:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not make reef-v{self.version} live "
                                   f"in {timeout:.0f} s (see its log)")
            await asyncio.sleep(0.2)

    async def state(self) -> GatewayState:
        assert self.session is not None
        states = []
        for url in self.metrics_urls:
            async with self.session.get(url) as resp:
                text = await resp.text()
            live = _LIVE.search(text)
            states.append(GatewayState({m[1]: float(m[2]) for m in _SWAPS.finditer(text)},
                                       float(live[1]) if live else 0.0))
        outcomes = {k for s in states for k in s.swaps}
        return GatewayState({k: min(s.swaps.get(k, 0.0) for s in states) for k in outcomes},
                            min(s.live_version for s in states))

    async def service_time(self, count: int = 5) -> float:
        """Median latency of requests sent one at a time (after one unmeasured)."""
        loop = asyncio.get_running_loop()
        times = []
        for i in range(count + 1):
            sample = await self._one(loop.time(), 0.0, i)
            if not sample.ok:
                raise RuntimeError("a chat request through the gateway failed")
            times.append(sample.latency)
        return statistics.median(times[1:])

    async def window(self, kind: str, rate: float, seconds: float, events: int) -> Window:
        """Requests at ``rate`` for ``seconds``; ``events`` weights events spread evenly."""
        before = await self.state()
        # No collection inside the window: a full one over the benchmark's own heap (torch
        # and transformers are imported) stalls this loop for ~0.1-0.2 s and would be
        # charged to whichever window it fell in.
        gc.collect()
        gc.disable()
        try:
            return await self._window(kind, rate, seconds, events, before)
        finally:
            gc.enable()

    async def _window(self, kind: str, rate: float, seconds: float, events: int,
                      before: GatewayState) -> Window:
        loop = asyncio.get_running_loop()
        origin = loop.time() + 0.05
        published: list[tuple[float, str]] = []
        publisher = asyncio.create_task(self._publish_spread(origin, seconds, events, published))
        tasks = []
        for i in range(int(rate * seconds)):
            at = origin + i / rate
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self._one(at, origin, i)))
        samples = await asyncio.gather(*tasks)
        await publisher
        return Window(kind, seconds, list(samples), published, before, await self.state())

    async def _publish_spread(self, origin: float, seconds: float, events: int,
                              published: list[tuple[float, str]]) -> None:
        loop = asyncio.get_running_loop()
        for k in range(events):
            # Early in each slot, so that a slow load still goes live inside the window.
            at = origin + (k + 0.25) * seconds / events
            await asyncio.sleep(max(at - loop.time(), 0.0))
            published.append((loop.time() - origin, await self.publish()))

    async def _one(self, at: float, origin: float, index: int) -> Sample:
        assert self.session is not None
        loop = asyncio.get_running_loop()
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json",
                   "X-Session-Id": f"swap-{index % SESSIONS}"}
        model, ok = "", False
        lag = loop.time() - at
        url = self.chat_urls[index % len(self.chat_urls)]
        try:
            async with self.session.post(url, data=self.body, headers=headers) as resp:
                data = await resp.read()
            ok = resp.status == 200
            if ok:
                model = str(orjson.loads(data).get("model", ""))
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
            ok = False
        return Sample(at - origin, loop.time() - at, ok, model, lag)


# --- report --------------------------------------------------------------------------------

class MeasuredLike(Protocol):
    upstream: str
    rate: float
    rate_note: str
    windows: list[Window]
    loads: str


@dataclass
class Pooled:
    """All windows of one kind for one upstream, pooled."""

    windows: list[Window] = field(default_factory=list)

    def latencies(self) -> list[float]:
        return sorted(x for w in self.windows for x in w.latencies())

    def p(self, q: float) -> float:
        return pct(self.latencies(), q)


def print_report(results: Sequence[MeasuredLike], max_ratio: float) -> None:
    print(f"\n{'upstream':<8} {'req/s':>6} {'window':<6} {'requests':>8} {'errors':>6} "
          f"{'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} {'other':>6} "
          f"{'lag ms':>6} {'swaps ok':>9} {'live version':>12}  per-round p99 ms")
    ratios = []
    for m in results:
        pools = {kind: Pooled([w for w in m.windows if w.kind == kind])
                 for kind in ("idle", "swap")}
        for kind, pool in pools.items():
            ws = pool.windows
            published = sum(len(w.published) for w in ws)
            swaps = f"{sum(w.swaps() for w in ws)}/{published}" if published else "-"
            live = (f"{ws[0].before.live_version:g} -> {ws[-1].after.live_version:g}"
                    if published else f"{ws[0].after.live_version:g}")
            rounds = ", ".join(f"{pct(sorted(w.latencies()), 99) * 1000:.1f}" for w in ws)
            print(f"{m.upstream:<8} {m.rate:>6g} {kind:<6} {sum(len(w.samples) for w in ws):>8} "
                  f"{sum(w.errors for w in ws):>6} {pool.p(50) * 1000:>7.1f} "
                  f"{pool.p(90) * 1000:>7.1f} {pool.p(99) * 1000:>7.1f} "
                  f"{pool.p(100) * 1000:>7.1f} "
                  f"{statistics.mean(w.other_cpus for w in ws):>6.2f} "
                  f"{max(w.max_lag() for w in ws) * 1000:>6.0f} {swaps:>9} {live:>12}  "
                  f"{rounds}")
        ratios.append((m, pools))
    print()
    for m, pools in ratios:
        swap_windows = pools["swap"].windows
        failed = sum(w.swaps("load_failed") for w in swap_windows)
        served = Counter(s.model for w in swap_windows for s in w.samples if s.ok)
        after = [x for w in swap_windows for x in w.live_after()]
        print(f"{m.upstream}: rate {m.rate:g} req/s ({m.rate_note}); answers in swap windows "
              f"came from {len(served)} adapters ({', '.join(sorted(served, key=_version))}); "
              f"failed loads {failed}; publish -> first answer by the new adapter: "
              + (f"median {statistics.median(after) * 1000:.0f} ms, max "
                 f"{max(after) * 1000:.0f} ms" if after else "not seen"))
        if m.loads:
            print(f"  {m.loads}")
    print("\nhot-swap targets (same run, idle and swap windows alternating)")
    for m, pools in ratios:
        idle, swap = pools["idle"], pools["swap"]
        ratio = swap.p(99) / idle.p(99)
        target = m.upstream in TARGET_UPSTREAMS
        judged = "target" if target else "whole system, for information"
        verdict = ("PASS" if ratio <= max_ratio else "FAIL") if target else (
            "(would " + ("PASS" if ratio <= max_ratio else "FAIL") + ")")
        print(f"  {m.upstream}: p99 swap / idle   {ratio:>6.2f}x   {judged} <= {max_ratio}  "
              f"{verdict}")
        paired = _paired_ratios(idle.windows, swap.windows)
        if paired:
            print(f"  {m.upstream}: p99 swap / idle, median of per-round ratios  "
                  f"{statistics.median(paired):.2f}x  ({', '.join(f'{r:.2f}' for r in paired)})")
        print(f"  {m.upstream}: p50 swap / idle   {swap.p(50) / idle.p(50):>6.2f}x")
    print(NOTE)


TARGET_UPSTREAMS = frozenset({"fake", "replicas"})
"""Upstreams whose ratio is judged against the target (the others are for information)."""

NOTE = """\
  The target is judged on the fake upstream: its answers and LoRA loads cost the same in
  both windows, so only the gateway's own swap work (reading the event, the load call,
  the switch, the unload) can move p99; and on the replicas upstream (two policy replicas
  of a tiny model behind a balancer, two gateways), where the swap machinery of issue 12
  (each replica's loads, the registry, routing by it, unloads) is all that differs. The
  policy server loads SmolLM2 adapters on the same CPUs that generate, so its rows
  measure the machine as much as the swap.
  On a shared machine a stall of the whole box (other cpus near the CPU count, the load
  generator's own send lag in the `lag ms` column) lands in whichever window it hits:
  compare the per-round p99s and the median of per-round ratios before trusting a FAIL."""


def _paired_ratios(idle: list[Window], swap: list[Window]) -> list[float]:
    """p99 of the swap window over the idle window's, round by round."""
    by_round = {w.round_no: w for w in idle}
    return [pct(sorted(w.latencies()), 99) / pct(sorted(by_round[w.round_no].latencies()), 99)
            for w in swap if w.round_no in by_round]


def _version(name: str) -> int:
    digits = name.rsplit("v", 1)[-1]
    return int(digits) if digits.isdigit() else -1
