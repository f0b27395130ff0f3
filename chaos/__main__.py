"""``python -m chaos`` (``make chaos``): at least 5,000 turns through the gateway while
every kind of process is SIGKILLed and restarted, Redis is restarted on its append-only
file, the upstream answers 500 or times out, the trainer meets poisonous datums,
transient backend failures and forced gate refusals, an operator rolls back once and
users send late feedback; then every answered turn is accounted for (see
``chaos.account``) and every fault must be followed by a training step. Exits 1 when a
turn was lost or duplicated, feedback was not used exactly once, the trainer stalled, or
the pipeline did not drain. The figures also go to ``<data-dir>/chaos.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from chaos.faults import KILLED, RESTARTED, ROLLBACK
from chaos.run import ChaosConfig, run

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=5000)
    parser.add_argument("--faults-per-kind", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rate", type=float, default=40.0,
                        help="turns started per second (0: unpaced)")
    parser.add_argument("--error-rate", type=float, default=0.03,
                        help="share of upstream requests answered 500")
    parser.add_argument("--timeout-rate", type=float, default=0.02,
                        help="share of upstream requests that time out")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--kinds", default=",".join(KILLED + RESTARTED + (ROLLBACK,)),
                        help="comma-separated faults: processes to kill, redis, rollback "
                             "(default: all)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="default: var/chaos/run-<time>")
    args = parser.parse_args()
    data_dir = args.data_dir or ROOT / "var" / "chaos" / time.strftime("run-%Y%m%d-%H%M%S")
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    print(f"chaos: {args.turns} turns, {args.faults_per_kind} fault(s) of every kind, "
          f"upstream 500s {args.error_rate:.0%} and timeouts {args.timeout_rate:.0%}; "
          f"data in {data_dir}", flush=True)
    report = run(ChaosConfig(data_dir, turns=args.turns, faults_per_kind=args.faults_per_kind,
                             concurrency=args.concurrency, rate=args.rate,
                             error_rate=args.error_rate, timeout_rate=args.timeout_rate,
                             seed=args.seed, kinds=tuple(args.kinds.split(","))))
    print(report.render(), flush=True)
    (data_dir / "chaos.json").write_text(json.dumps(report.to_json(), indent=2))
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
