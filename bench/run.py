"""Benchmarks: figures and ratios measured in one run, printed, never asserted by timing tests.

    python bench/run.py            # everything
    python bench/run.py spine      # one group
    python bench/run.py --list

Each group is a function in a ``bench_*.py`` module that prints its own figures; this runner
only finds, times and reports them. Shared machines are noisy: read ratios measured in the same
run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

GROUPS = {
    "spine": "bench_spine",
    "quantize": "bench_quantize",
    "static": "bench_static",
    "lowbit": "bench_lowbit",
    "rnnweights": "bench_rnn_weights",
    "int4conv": "bench_int4_conv",
    "prune": "bench_prune",
    "factorize": "bench_factorize",
    "distill": "bench_distill",
    "conformance": "bench_conformance",
    "realworld": "bench_realworld",
    "auto": "bench_auto",
    "big": "bench_big",
    "recurrent": "bench_recurrent",
    "dataaware": "bench_dataaware",
    "detector": "bench_detector",
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("groups", nargs="*", help="groups to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list groups and exit")
    args = parser.parse_args()
    if args.list:
        for name, module in GROUPS.items():
            print(f"{name:12s} bench/{module}.py")
        return 0
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        print(f"unknown group(s): {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    failed = []
    for name in args.groups or list(GROUPS):
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        module = importlib.import_module(GROUPS[name])
        ok = module.run()
        print(
            f"--- {name}: {'ok' if ok else 'TARGET MISSED'} in {time.perf_counter() - start:.1f} s",
            flush=True,
        )
        if not ok:
            failed.append(name)
    if failed:
        print(f"\ntargets missed in: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
