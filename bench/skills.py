"""Skill retrieval benchmark: latency p50/p99 per query at 100, 1,000 and 10,000 skills,
with the query embedding (what a main turn pays) and without it (the search alone), and
the BM25 fallback on the same queries.

One process, one ``SkillIndex`` (``shared.skill_index``) with a tenant per size, whose
skills are subsets of one synthetic library (so each skill text is embedded once). Every
query is new (the index caches query vectors, and a cached query would measure nothing).
For each query the three searches run back to back, so they share the machine's
conditions. Everything runs on one torch thread, as in the gateway (measured here:
switching torch from 2 threads back to 1 left numpy's matrix-vector product ~60x slower
at p50, so the build does not get more threads either); the build time is the gateway's
start-up work for that many skills.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.report import line
from shared.skill_index import Embedder, SkillIndex, embedding_available
from shared.skills import Skill

TOPICS = ["git", "docker compose", "kubernetes", "postgres", "redis", "pytest", "react",
          "typescript", "rust cargo", "terraform", "nginx", "ssh keys", "python asyncio",
          "pandas", "numpy", "fastapi", "django", "celery", "kafka", "aws s3", "gcp iam",
          "linux permissions", "systemd", "bash scripts", "regex", "unicode text", "csv files",
          "json schemas", "oauth tokens", "webhooks", "cron jobs", "email drafts",
          "meeting notes", "travel plans", "budget spreadsheets", "recipes", "poetry",
          "translations", "legal contracts", "medical questions", "tax forms", "resumes",
          "customer support", "sql migrations", "graphql", "grpc", "websockets", "tls certs",
          "dns records", "load balancers", "prometheus alerts", "grafana dashboards",
          "llm prompts", "embeddings", "pdf parsing", "image resizing", "video encoding",
          "mobile builds", "ci pipelines", "code review"]
PROBLEMS = ["fails with a timeout", "returns a permission error", "is very slow",
            "gives the wrong result", "crashes on start", "leaks memory", "needs a rewrite",
            "must be explained to a beginner", "needs a short summary", "has a security hole",
            "breaks after an upgrade", "must be tested", "needs better error messages",
            "must follow a strict format", "is ambiguous", "needs sources cited",
            "must be migrated", "needs to be automated", "must be translated",
            "must stay private"]
ADVICE = ["check the logs first", "reproduce it with a minimal example", "read the docs",
          "ask one clarifying question", "answer in a numbered list", "keep it short",
          "verify the tool output", "never print secrets", "state what is uncertain"]
OPENERS = ["Help me,", "Quick question:", "Can you explain why", "I need help because",
           "At work", "Urgent:", "Hi! My", "Not sure what to do:", "Why", "How come"]


@dataclass
class SizeResult:
    """Latencies in milliseconds at one library size."""

    skills: int
    build_seconds: float
    embed_ms: list[float] = field(default_factory=list)
    with_embedding_ms: list[float] = field(default_factory=list)
    search_only_ms: list[float] = field(default_factory=list)
    bm25_ms: list[float] = field(default_factory=list)
    hits: int = 0
    """Queries with at least one skill above the cut-off (embedding)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("skills part")
    group.add_argument("--skills-sizes", default="100,1000,10000",
                       help="library sizes to measure (comma-separated)")
    group.add_argument("--skills-queries", type=int, default=300, help="queries per size")
    group.add_argument("--skills-top-k", type=int, default=6)


def library(size: int, seed: int = 7) -> list[tuple[str, str]]:
    """``size`` (name, description) pairs, varied like a real library."""
    rng = random.Random(seed)
    out = []
    for i in range(size):
        topic, problem, advice = rng.choice(TOPICS), rng.choice(PROBLEMS), rng.choice(ADVICE)
        name = f"{topic.replace(' ', '-')}-{problem.split()[-1]}-{i}"
        out.append((name, f"When a task about {topic} {problem}: {advice}."))
    return out


def queries(count: int, rng: random.Random, seen: set[str]) -> list[str]:
    """``count`` queries never generated before (so never in the query cache)."""
    out: list[str] = []
    while len(out) < count:
        text = (f"{rng.choice(OPENERS)} my {rng.choice(TOPICS)} setup "
                f"{rng.choice(PROBLEMS)} since {rng.choice(['monday', 'the deploy', 'v2'])} "
                f"(ticket {rng.randint(1, 99_999)}). {rng.choice(ADVICE).capitalize()}?")
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else float("nan")


def run(args: argparse.Namespace, log_dir: Path) -> list[SizeResult]:
    """Measure every size; prints the table and the targets (the exit status never
    depends on them)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    sizes = sorted(int(s) for s in args.skills_sizes.split(","))
    print(f"\nreef skills retrieval benchmark: sizes {sizes}, {args.skills_queries} queries "
          f"each, top-k {args.skills_top_k}; {os.cpu_count()} CPU(s); load average "
          f"{os.getloadavg()[0]:.2f}; logs in {log_dir}", flush=True)
    if not embedding_available():
        print("  skipped: the skills extra is not installed (pip install -e '.[skills]')")
        return []
    embedder = Embedder(threads=1)  # BLAS single-threaded too (read once, at numpy's import)
    index = SkillIndex("embedding", embedder, min_similarity=0.3)
    bm25 = SkillIndex("bm25", min_bm25=1.0)
    pairs = library(max(sizes))
    skills = [Skill(id=f"sk_{i:016x}", tenant="bench", name=n, description=d,
                    body="Follow the advice.", status="active")
              for i, (n, d) in enumerate(pairs)]
    rng, seen = random.Random(11), set[str]()
    results = []
    for size in sizes:
        tenant = f"n{size}"
        started = time.perf_counter()
        index.build(tenant, skills[:size])
        result = SizeResult(size, time.perf_counter() - started)
        bm25.build(tenant, skills[:size])
        print(f"  {size:,} skills: index built in {result.build_seconds:.1f} s; "
              f"querying ...", flush=True)
        measure(result, index, bm25, embedder, tenant, queries(args.skills_queries, rng, seen),
                args.skills_top_k)
        results.append(result)
    print_table(results)
    print(f"  (load average at the end {os.getloadavg()[0]:.2f}; model dtype {embedder.dtype})")
    (log_dir / "results.json").write_text(json.dumps([asdict(r) for r in results]))
    return results


def measure(result: SizeResult, index: SkillIndex, bm25: SkillIndex, embedder: Embedder,
            tenant: str, texts: list[str], top_k: int) -> None:
    """Per query, back to back: embed alone, search with embedding, search alone, BM25."""
    index.search(tenant, "warm-up query", top_k)
    clock = time.perf_counter
    for text in texts:
        t0 = clock()
        vector = embedder.encode_query(text)
        t1 = clock()
        hits = index.search(tenant, text, top_k)  # a new query: embedded again, uncached
        t2 = clock()
        index.search_vector(tenant, vector, top_k)
        t3 = clock()
        bm25.search(tenant, text, top_k)
        t4 = clock()
        result.embed_ms.append((t1 - t0) * 1e3)
        result.with_embedding_ms.append((t2 - t1) * 1e3)
        result.search_only_ms.append((t3 - t2) * 1e3)
        result.bm25_ms.append((t4 - t3) * 1e3)
        result.hits += bool(hits)


def _pair(values: list[float]) -> str:
    return f"{percentile(values, 0.5):6.2f} / {percentile(values, 0.99):6.2f}"


def print_table(results: list[SizeResult]) -> None:
    print("\nskill retrieval, ms per query, p50 / p99 (1 torch thread)")
    print(f"  {'skills':>7}  {'build s':>8}  {'embed only':>15}  {'search+embed':>15}  "
          f"{'search only':>15}  {'bm25':>15}  {'with hits':>9}")
    for r in results:
        print(f"  {r.skills:>7,}  {r.build_seconds:>8.1f}  {_pair(r.embed_ms):>15}  "
              f"{_pair(r.with_embedding_ms):>15}  {_pair(r.search_only_ms):>15}  "
              f"{_pair(r.bm25_ms):>15}  {r.hits:>4}/{len(r.embed_ms):<4}")
    largest = max(results, key=lambda r: r.skills, default=None)
    if largest is None:
        return
    print(f"\ntargets at {largest.skills:,} skills:")
    line("p99 ms, search with the query embedding", percentile(largest.with_embedding_ms, 0.99),
         "{:.2f}", "<=", 10)
    line("p99 ms, search without the embedding", percentile(largest.search_only_ms, 0.99),
         "{:.2f}", "<=", 2)
