"""Trainer part: one local LoRA training step (``LocalBackend``) vs a plain peft loop.

Both train the same converted SmolLM2-135M (``shared.local_model.prepare``, cached under
``var/``) with LoRA r=16 / alpha 32 on q/k/v/o (same seed, so the same initial adapter),
on the same 16 datums (fixed seed: prompts of 32-48 random token ids, completions of
40-56, sampler logprobs and one advantage per datum), with the same loss
(``importance_sampling``, summed) and the same AdamW.

- ``local``: :class:`services.trainer.local.LocalBackend` — ``forward_backward`` then
  ``optim_step``, as the trainer service calls them.
- ``peft``: what a practitioner writes: ``get_peft_model``, the whole batch padded at
  once, full logits over the 49k vocabulary, ``log_softmax`` -> ``gather`` -> loss ->
  ``backward`` -> ``optimizer.step``.

Each runs in its own process (so peak memory is its own: ``ru_maxrss`` from ``wait4``)
and the parent drives them step by step, alternating, so both see the same machine
load. Only one of them computes at a time; each uses all the machine's CPUs.

Run: ``.venv/bin/python -m bench --part trainer [--trainer-steps 3] [--trainer-warmup 1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import system_busy_seconds

ROOT = Path(__file__).resolve().parent.parent
MODEL = "SmolLM2-135M-Instruct"
DATUMS = 16
PROMPT_TOKENS = (32, 48)
"""Range of prompt lengths (tokens, inclusive)."""
COMPLETION_TOKENS = (40, 56)
"""Range of completion lengths (tokens, inclusive)."""
LORA_RANK = 16
LORA_ALPHA = 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LEARNING_RATE = 1e-4
LOSS_FN = "importance_sampling"
SEED = 1234
MAX_RATIO = 1.1
"""Target: local s/step over the plain peft loop's s/step."""
_MARK = "BENCH_STEP "
WORKERS = ("local", "peft")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("trainer part")
    group.add_argument("--trainer-steps", type=int, default=3,
                       help="measured steps per implementation (default 3; a step is "
                            "~12 CPU-seconds here)")
    group.add_argument("--trainer-warmup", type=int, default=1,
                       help="unmeasured steps per implementation first (default 1)")
    group.add_argument("--trainer-threads", type=int, default=0,
                       help="torch threads in each worker (0: torch's default)")


def make_datums(vocab_size: int, seed: int = SEED) -> list[dict[str, Any]]:
    """16 datums in :class:`services.trainer.backend.Datum`'s layout, as plain dicts."""
    rng = random.Random(seed)
    datums = []
    for _ in range(DATUMS):
        prompt = [rng.randrange(3, vocab_size) for _ in range(rng.randint(*PROMPT_TOKENS))]
        n = rng.randint(*COMPLETION_TOKENS)
        completion = [rng.randrange(3, vocab_size) for _ in range(n)]
        sampled = [-rng.uniform(0.05, 4.0) for _ in range(n)]
        advantage = rng.gauss(0.0, 1.0)
        pad = [0.0] * (len(prompt) - 1)
        datums.append({"tokens": prompt + completion, "logprobs": pad + sampled,
                       "advantages": pad + [advantage] * n})
    return datums


# --- the worker processes ----------------------------------------------------------------

class LocalStepper:
    """Reef's local backend, as the trainer service drives it."""

    def __init__(self, model_dir: Path, state_dir: Path, threads: int) -> None:
        from services.trainer.local import LocalBackend
        from shared.settings import Settings

        settings = Settings(profile="dev", lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA,
                            lora_target_modules=TARGETS, learning_rate=LEARNING_RATE,
                            loss_fn=LOSS_FN, trainer_device="cpu")
        self.backend = LocalBackend(settings, model_dir, state_dir, threads=threads)
        self.backend.start()

    def step(self, raw: list[dict[str, Any]]) -> float:
        from services.trainer.backend import Datum

        datums = [Datum(**d) for d in raw]
        loss = self.backend.forward_backward(datums, LOSS_FN)
        self.backend.optim_step(LEARNING_RATE)
        return loss


class PeftStepper:
    """The straightforward reference loop (whole batch, full-vocabulary logits)."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from services.trainer.local import ADAM_BETAS, ADAM_EPS, ADAM_WEIGHT_DECAY, INIT_SEED

        if threads > 0:
            torch.set_num_threads(threads)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        torch.manual_seed(INIT_SEED)  # the same initial adapter as the local backend's
        config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=TARGETS,
                            lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        self.model = get_peft_model(base, config)
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=LEARNING_RATE,
            betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=ADAM_WEIGHT_DECAY)

    def step(self, raw: list[dict[str, Any]]) -> float:
        import torch

        width = max(len(d["tokens"]) - 1 for d in raw)

        def pad(rows: list[list[Any]], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=dtype)

        input_ids = pad([d["tokens"][:-1] for d in raw], torch.long)
        targets = pad([d["tokens"][1:] for d in raw], torch.long)
        mask = pad([[1] * (len(d["tokens"]) - 1) for d in raw], torch.long)
        old = pad([d["logprobs"] for d in raw], torch.float32)
        advantages = pad([d["advantages"] for d in raw], torch.float32)
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        loss = -(torch.exp(picked - old) * advantages * mask).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _reply(payload: dict[str, Any]) -> None:
    sys.stdout.write(_MARK + json.dumps(payload) + "\n")
    sys.stdout.flush()


def worker_main(argv: list[str]) -> None:
    """``python -m bench.trainer_step --worker local|peft ...``: load, then one step per
    ``step`` line on stdin, one result line each."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=WORKERS, required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--datums", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    stepper: LocalStepper | PeftStepper = (
        LocalStepper(args.model_dir, args.state_dir, args.threads) if args.worker == "local"
        else PeftStepper(args.model_dir, args.threads))
    datums = json.loads(args.datums.read_text())
    _reply({"ready": True, "load_seconds": time.perf_counter() - started,
            "rss_bytes": _rss_bytes()})
    for line in sys.stdin:
        if line.strip() != "step":
            break
        wall, cpu = time.perf_counter(), time.process_time()
        loss = stepper.step(datums)
        _reply({"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
                "loss": loss})


# --- the parent --------------------------------------------------------------------------

@dataclass
class Worker:
    """A running worker process and what it measured."""

    name: str
    proc: subprocess.Popen[str]
    load_seconds: float = 0.0
    rss_after_load: int = 0
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    other_cpus: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    max_rss: int = 0
    last: float = 0.0
    """Wall seconds of the latest step (warm-up or not)."""

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(_MARK):
                result: dict[str, Any] = json.loads(line[len(_MARK):])
                return result
        raise RuntimeError(f"trainer worker {self.name} exited ({self.proc.wait()}); "
                           "see its log")

    def step(self, measured: bool) -> None:
        assert self.proc.stdin is not None
        busy, wall = system_busy_seconds(), time.perf_counter()
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        result = self.read()
        elapsed = time.perf_counter() - wall
        others = max(system_busy_seconds() - busy - result["cpu_seconds"], 0.0) / elapsed
        self.losses.append(result["loss"])
        self.last = result["seconds"]
        if measured:
            self.seconds.append(result["seconds"])
            self.cpu_seconds.append(result["cpu_seconds"])
            self.other_cpus.append(others)

    def finish(self) -> None:
        """Ask the worker to exit and take its peak RSS from the kernel (``wait4``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.max_rss = usage.ru_maxrss * 1024  # kilobytes on Linux


def start_worker(name: str, model_dir: Path, datums: Path, log_dir: Path, threads: int
                 ) -> Worker:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    argv = [sys.executable, "-m", "bench.trainer_step", "--worker", name,
            "--model-dir", str(model_dir), "--datums", str(datums),
            "--state-dir", str(log_dir / f"state-{name}"), "--threads", str(threads)]
    log = (log_dir / f"trainer-{name}.log").open("w")
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                            text=True, cwd=ROOT, env=env, start_new_session=True)
    worker = Worker(name, proc)
    ready = worker.read()
    worker.load_seconds, worker.rss_after_load = ready["load_seconds"], ready["rss_bytes"]
    return worker


def run(args: argparse.Namespace, log_dir: Path) -> None:
    """The trainer part: prepare, start both workers, alternate their steps, print."""
    from shared.local_model import prepare

    log_dir.mkdir(parents=True, exist_ok=True)
    model_dir, converted = prepare(MODEL, ROOT / "var")
    vocab = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    datums_file = log_dir / "datums.json"
    datums = make_datums(vocab)
    datums_file.write_text(json.dumps(datums))
    lengths = [len(d["tokens"]) for d in datums]
    print(f"\nreef trainer benchmark: {MODEL} ({'converted now' if converted else 'cached'} "
          f"at {model_dir}), LoRA r={LORA_RANK} alpha={LORA_ALPHA} on {','.join(TARGETS)}, "
          f"{DATUMS} datums of {min(lengths)}-{max(lengths)} tokens, {LOSS_FN} (summed), "
          f"AdamW; {args.trainer_warmup} warm-up + {args.trainer_steps} measured steps each, "
          f"alternating; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
          f"logs in {log_dir}", flush=True)
    workers = [start_worker(name, model_dir, datums_file, log_dir, args.trainer_threads)
               for name in WORKERS]
    try:
        for index in range(args.trainer_warmup + args.trainer_steps):
            measured = index >= args.trainer_warmup
            for worker in workers if index % 2 == 0 else reversed(workers):
                worker.step(measured)
            print(f"  {'step' if measured else 'warm-up'} {index + 1}: " + ", ".join(
                f"{w.name} {w.last:.2f} s" for w in workers), flush=True)
        for worker in workers:
            worker.finish()
    finally:
        for worker in workers:
            if worker.proc.returncode is None:
                worker.proc.kill()
                worker.proc.wait()
    print_table(workers)
    (log_dir / "trainer-results.json").write_text(json.dumps(
        [{k: v for k, v in vars(w).items() if k != "proc"} for w in workers], indent=2))


def print_table(workers: list[Worker]) -> None:
    gib = 1024 ** 3
    print(f"\n{'impl':<6} {'steps':>5} {'s/step':>7} {'min':>6} {'max':>6} {'cpu s/':>7} "
          f"{'other':>6} {'load s':>6} {'rss load':>8} {'peak rss':>8}  step-1 loss")
    print(f"{'':<6} {'':>5} {'median':>7} {'':>6} {'':>6} {'step':>7} {'cpus':>6} "
          f"{'':>6} {'GiB':>8} {'GiB':>8}")
    for w in workers:
        print(f"{w.name:<6} {len(w.seconds):>5} {statistics.median(w.seconds):>7.3f} "
              f"{min(w.seconds):>6.2f} {max(w.seconds):>6.2f} "
              f"{statistics.median(w.cpu_seconds):>7.2f} {statistics.mean(w.other_cpus):>6.2f} "
              f"{w.load_seconds:>6.1f} {w.rss_after_load / gib:>8.2f} {w.max_rss / gib:>8.2f}"
              f"  {w.losses[0]:.4f}")
    local, peft = workers
    ratio = statistics.median(local.seconds) / statistics.median(peft.seconds)
    cpu_ratio = statistics.median(local.cpu_seconds) / statistics.median(peft.cpu_seconds)
    same = abs(local.losses[0] - peft.losses[0]) <= 1e-3 * max(1.0, abs(peft.losses[0]))
    print("\ntrainer targets (same run, same machine, steps alternating)")
    print(f"  local / peft s/step (median)        {ratio:>6.2f}x   target <= {MAX_RATIO}  "
          f"{'PASS' if ratio <= MAX_RATIO else 'FAIL'}")
    print(f"  local / peft CPU s/step (median)    {cpu_ratio:>6.2f}x")
    busy = max(statistics.mean(w.other_cpus) for w in workers)
    if busy > 0.5:
        print(f"  note: other processes kept {busy:.2f} CPUs busy during the steps: the wall "
              "ratio moves with them\n  (a step waits for CPU); the CPU-seconds ratio "
              "hardly does. Rerun with more --trainer-steps\n  on a quieter machine before "
              "trusting a wall-clock FAIL or PASS.")
    print(f"  local / peft peak RSS               {local.max_rss / peft.max_rss:>6.2f}x   "
          f"(peak above RSS after load: local "
          f"{(local.max_rss - local.rss_after_load) / gib:.2f} GiB, peft "
          f"{(peft.max_rss - peft.rss_after_load) / gib:.2f} GiB)")
    print(f"  same loss at step 1 (same adapter init, same batch): "
          f"{'yes' if same else 'NO: the two compute different things'} "
          f"({local.losses[0]:.4f} vs {peft.losses[0]:.4f})")


if __name__ == "__main__":
    worker_main(sys.argv[1:])
