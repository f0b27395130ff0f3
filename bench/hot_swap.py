"""Hot-swap part: gateway latency while new adapters go live vs idle, side by side.

A real Reef gateway (``python -m services.gateway``, private ``redis-server``) in front of
an upstream that speaks vLLM's dynamic LoRA routes, one of:

- ``fake``: ``bench/lora_upstream.py``, zero-latency chat answers, and a
  ``/v1/load_lora_adapter`` that reads the real adapter directory from disk (plus
  ``--swap-load-delay-ms``, the device copy of a real vLLM). The gateway's own cost of a
  swap is all that can move the latency: this is the comparison the target is about.
- ``policy``: Reef's policy server (``python -m services.policy``) with SmolLM2-135M; a
  load there really reads and converts the adapter on the same 2 CPUs that generate, so
  this shows what a user of the embedded model sees, with CPU-bound noise.
- ``replicas``: issue 12's setting: two policy replicas behind a round-robin balancer
  (``tests/round_robin.py``, its own process), two gateways, the load split between them.
  The replicas follow the ``weights`` stream and register what they hold; the gateways
  route to a version once both hold it. The model is a tiny random Llama
  (``tests/tiny_policy.py``, a millisecond per token), so loads and generation are cheap
  and what moves p99 is the swap machinery (loads, registry, routing, unloads).

Adapters are real PEFT adapters of the converted SmolLM2 (r=16 on q/k/v/o, random B),
made once under ``var/bench/adapters/``. An open-loop load generator (asyncio + aiohttp,
fixed rate, latency measured from each request's *scheduled* start, so a stall cannot
hide) sends chat requests for model ``reef`` (the gateway's adapter name, routed to the
live adapter). Windows of equal length alternate, idle and swap (the order flips every
round); in a swap window ``--swap-events`` ``weights`` events are published at even
intervals and each must make the gateway load the new adapter upstream and switch: the
gateway's ``reef_gateway_adapter_swaps_total`` and ``reef_gateway_live_adapter_version``
are read at both ends of every window, and the answers' ``model`` shows which adapter
served each request.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import swap_load
from bench.procs import Child, free_port, http_ok, own_cpu_seconds, running, system_busy_seconds
from bench.swap_load import Window
from bench.systems import ROOT, Target, redis_server, reef_gateway
from tests.tiny_policy import make_tiny_policy_model

MODEL = "SmolLM2-135M-Instruct"
ADAPTER_DIR = ROOT / "var" / "bench" / "adapters" / "smollm2-r16-qkvo"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
ADAPTER_NAME = "reef"
"""The model name clients ask for; the gateway routes it to the live adapter."""
MAX_P99_RATIO = 1.2
"""Target: p99 during swaps over p99 idle."""
UPSTREAMS = ("fake", "policy", "replicas")
TINY_DIR = ROOT / "var" / "bench" / "tiny-policy"
"""The ``replicas`` upstream's data directory: the tiny model and its adapters."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("hot-swap part")
    group.add_argument("--swap-upstreams", default=",".join(UPSTREAMS),
                       help="comma-separated subset of fake,policy,replicas (default: all)")
    group.add_argument("--swap-seconds", type=float, default=10.0,
                       help="per window, fake upstream (default 10)")
    group.add_argument("--swap-policy-seconds", type=float, default=15.0,
                       help="per window, policy server (default 15: it answers ~1 req/s)")
    group.add_argument("--swap-rounds", type=int, default=3,
                       help="idle+swap window pairs per upstream (order flips each round)")
    group.add_argument("--swap-events", type=int, default=4, help="weights events per window")
    group.add_argument("--swap-rate", type=float, default=200.0,
                       help="requests/s against the fake upstream")
    group.add_argument("--swap-policy-rate", type=float, default=0.0,
                       help="requests/s against the policy server (0: 40%% of what one "
                            "measured request takes, i.e. well below saturation)")
    group.add_argument("--swap-load-delay-ms", type=float, default=200.0,
                       help="extra time the fake upstream's LoRA load takes")


# --- adapters ------------------------------------------------------------------------------

def ensure_adapters(model_dir: Path, count: int = 4) -> list[Path]:
    """``count`` PEFT adapters of the converted model, made once (random B, fixed seeds)."""
    paths = [ADAPTER_DIR / f"a{i}" for i in range(count)]
    if all((p / "adapter_model.safetensors").is_file() for p in paths):
        return paths
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for seed, path in enumerate(paths):
        torch.manual_seed(seed)
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        model.save_pretrained(str(tmp))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        base = model.unload()
    return paths


# --- the upstreams -------------------------------------------------------------------------

@contextmanager
def fake_lora_upstream(log_dir: Path, delay_ms: float) -> Iterator[Target]:
    port = free_port()
    argv = [sys.executable, "-m", "bench.lora_upstream", "--port", str(port),
            "--load-delay-ms", str(delay_ms)]
    base = f"http://127.0.0.1:{port}/v1"
    with running("lora-upstream", argv, log_dir, http_ok(base + "/models"), cwd=ROOT) as child:
        yield Target("fake", base, child)


@contextmanager
def policy_server(log_dir: Path, redis_url: str, name: str = "policy",
                  model: str = MODEL, data_dir: Path = ROOT / "var") -> Iterator[Target]:
    """Reef's policy server (by default on the converted model cached in ``var/``), a
    replica following the benchmark Redis's ``weights`` stream."""
    port = free_port()
    env = {**os.environ, "REEF_PROFILE": "dev", "REEF_DATA_DIR": str(data_dir),
           "REEF_POLICY_HOST": "127.0.0.1", "REEF_POLICY_PORT": str(port),
           "REEF_MODEL_NAME": model, "REEF_LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
           "OMP_WAIT_POLICY": "PASSIVE", "REEF_REDIS_URL": redis_url,
           "REEF_NAMESPACE": swap_load.NAMESPACE, "REEF_POLICY_REPLICA_ID": name,
           # Two replicas on two CPUs: one torch thread each, not two each.
           **({"REEF_POLICY_THREADS": "1"} if name.startswith("replica") else {})}
    argv = [sys.executable, "-m", "services.policy"]
    probe = http_ok(f"http://127.0.0.1:{port}/readyz")
    with running(name, argv, log_dir, probe, env=env, cwd=ROOT, timeout=240) as child:
        yield Target(name, f"http://127.0.0.1:{port}/v1", child)


@contextmanager
def balancer(log_dir: Path, backends: list[Target]) -> Iterator[Target]:
    """A round-robin balancer (its own process) over ``backends``."""
    port = free_port()
    argv = [sys.executable, "-m", "tests.round_robin", "--port", str(port)]
    for backend in backends:
        argv += ["--backend", backend.base_url.removesuffix("/v1")]
    probe = http_ok(f"http://127.0.0.1:{port}/healthz")
    with running("balancer", argv, log_dir, probe, cwd=ROOT) as child:
        yield Target("balancer", f"http://127.0.0.1:{port}/v1", child)


# --- one upstream's run --------------------------------------------------------------------

@dataclass
class Measured:
    """Every window of one upstream, and how the rate was chosen."""

    upstream: str
    rate: float
    rate_note: str
    windows: list[Window]
    loads: str = ""


def run_upstream(args: argparse.Namespace, name: str, adapters: list[Path], log_dir: Path
                 ) -> Measured:
    log_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        redis_url, redis = stack.enter_context(redis_server(log_dir, None))
        upstreams = _upstreams(stack, args, name, log_dir, redis_url)
        front = (stack.enter_context(balancer(log_dir, upstreams)) if len(upstreams) > 1
                 else upstreams[0])
        gateway_dirs = [log_dir / f"gw{i}" for i in range(2 if name == "replicas" else 1)]
        for folder in gateway_dirs:
            folder.mkdir(exist_ok=True)
        gateways = [stack.enter_context(reef_gateway(
            folder, None, front.base_url, redis_url,
            extra_env={"REEF_ADAPTER_UNLOAD_GRACE_SECONDS": "2",
                       "REEF_ADAPTER_NAME": ADAPTER_NAME, "REEF_LOG_LEVEL": "WARNING"}))
            for folder in gateway_dirs]
        children = [redis, front.child, *(u.child for u in upstreams),
                    *(g.child for g in gateways)]
        if name == "replicas":
            adapters = make_tiny_policy_model(TINY_DIR)[1]
        measured = asyncio.run(_drive(args, name, adapters, redis_url, gateways,
                                      list({id(c): c for c in children}.values())))
        if name == "fake":
            measured.loads = _fake_loads(front.base_url)
        return measured


def _upstreams(stack: ExitStack, args: argparse.Namespace, name: str, log_dir: Path,
               redis_url: str) -> list[Target]:
    if name == "fake":
        return [stack.enter_context(fake_lora_upstream(log_dir, args.swap_load_delay_ms))]
    if name == "policy":
        return [stack.enter_context(policy_server(log_dir, redis_url))]
    model_dir, _ = make_tiny_policy_model(TINY_DIR)
    return [stack.enter_context(policy_server(log_dir, redis_url, f"replica-{r}",
                                              str(model_dir), TINY_DIR)) for r in "ab"]


async def _drive(args: argparse.Namespace, name: str, adapters: list[Path], redis_url: str,
                 gateways: list[Target], children: list[Child]) -> Measured:
    gc.collect()
    gc.freeze()  # what is alive now is never scanned again: shorter collections later
    urls = [g.base_url for g in gateways]
    async with swap_load.Driver(urls, redis_url, adapters) as driver:
        await driver.go_live(1)
        if name == "fake":
            rate, note = args.swap_rate, "fixed"
        elif args.swap_policy_rate > 0:
            rate, note = args.swap_policy_rate, "fixed"
        else:
            service = await driver.service_time()
            rate = round(0.4 / service, 2)
            note = f"40% of 1 / {service * 1000:.0f} ms (one request alone)"
        print(f"  {name}: gateway(s) {', '.join(urls)}, {rate:g} req/s ({note}); "
              "warm-up ...", flush=True)
        seconds = args.swap_policy_seconds if name == "policy" else args.swap_seconds
        await driver.window("warm-up", rate, min(5.0, seconds), events=0)
        windows = []
        for round_no in range(args.swap_rounds):
            order = ("idle", "swap") if round_no % 2 == 0 else ("swap", "idle")
            for kind in order:
                before = _cpu(children)
                window = await driver.window(kind, rate, seconds,
                                             events=args.swap_events if kind == "swap" else 0)
                window.other_cpus = _other_cpus(before, _cpu(children), window.seconds)
                window.round_no = round_no + 1
                print(f"  {name} round {round_no + 1} {window.describe()}", flush=True)
                windows.append(window)
        return Measured(name, rate, note, windows)


def _cpu(children: list[Child]) -> tuple[float, float]:
    ours = own_cpu_seconds() + sum(c.cpu_seconds() for c in children)
    return ours, system_busy_seconds()


def _other_cpus(before: tuple[float, float], after: tuple[float, float], seconds: float
                ) -> float:
    ours, busy = after[0] - before[0], after[1] - before[1]
    return max(busy - ours, 0.0) / seconds


def _fake_loads(base_url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/stats", timeout=5) as resp:
        stats = json.loads(resp.read())
    loads = stats["load_seconds"]
    return (f"fake upstream: {len(loads)} LoRA loads, {min(loads) * 1000:.0f}-"
            f"{max(loads) * 1000:.0f} ms each (disk read + header parse + delay), "
            f"{stats['unloads']} unloads")


def run(args: argparse.Namespace, log_dir: Path) -> None:
    """The hot-swap part: every chosen upstream, then the table."""
    from shared.local_model import prepare

    log_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.swap_upstreams.split(",") if n]
    unknown = set(names) - set(UPSTREAMS)
    if unknown:
        raise SystemExit(f"--swap-upstreams: unknown {', '.join(sorted(unknown))}")
    model_dir, _ = prepare(MODEL, ROOT / "var")
    adapters = ensure_adapters(model_dir)
    size = sum(f.stat().st_size for f in adapters[0].iterdir())
    print(f"\nreef hot-swap benchmark: upstreams {', '.join(names)}; {args.swap_rounds} "
          f"round(s) of idle + swap windows of {args.swap_seconds:g} s (policy "
          f"{args.swap_policy_seconds:g} s), {args.swap_events} "
          f"weights events per swap window; adapters r=16 q/k/v/o ({size / 2**20:.1f} MiB "
          f"each) in {ADAPTER_DIR}; load average {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} CPUs; logs in {log_dir}", flush=True)
    results = []
    for name in names:
        started = time.monotonic()
        results.append(run_upstream(args, name, adapters, log_dir / name))
        print(f"  {name}: done in {time.monotonic() - started:.0f} s", flush=True)
    swap_load.print_report(results, MAX_P99_RATIO)
    (log_dir / "hot-swap-results.json").write_text(json.dumps(
        [{"upstream": m.upstream, "rate": m.rate, "windows": [
            {**w.summary(), "samples": [(round(s.start, 4), round(s.latency, 5), s.ok, s.model)
                                        for s in w.samples]} for w in m.windows]}
         for m in results]))
