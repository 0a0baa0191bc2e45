"""Search for false rewrites (and crashes) of ``tdd_fx.optimize`` on random small models.

The same generator and property as ``tests/test_property.py`` (``tests/strategies.py``), run for
as long as asked, without stopping at the first failure:

    python benchmarks/search_false_rewrites.py --examples 2000            # ~0.05 s an example
    python benchmarks/search_false_rewrites.py --examples 500 --jobs 2 --seed 7
    python benchmarks/search_false_rewrites.py --examples 300 --families loop conv --shrink

It prints what the checks saw (sites by pattern and status, guard fall-backs, comparisons), then
every kind of failure with the smallest failing model's source (ready to paste into a regression
test) and the error.  ``--shrink`` re-runs each kind's search under hypothesis to shrink it (the
generation is deterministic for a seed, so the same failure is found again, then minimised).
Failures recognised as instances of known bugs (``strategies.KNOWN_BUGS``) are labelled so.
Exit status: 0 when every failure is a known bug, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from strategies import (  # noqa: E402
    BLOCKS,
    Example,
    Stats,
    check_example,
    examples,
    failure_kind,
    known_bug,
)

HEALTH = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]


@dataclass
class Failure:
    kind: str
    source: str
    blocks: list[str]
    error: str


@dataclass
class Result:
    examples: int = 0
    counts: Counter = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)


def _quiet() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)


def _current_path(job_seed: int) -> str:
    return os.path.join(tempfile.gettempdir(), f"tdd_fx_search_{os.getpid()}_{job_seed}.py")


def search(n: int, job_seed: int, families: list[str], current: str = "") -> Result:
    """Run ``n`` generated examples with ``job_seed``; collect every failure.  Each example's
    source is written to ``current`` first, so one that kills the process can be shown."""
    _quiet()
    result = Result()
    stats = Stats()

    @seed(job_seed)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=HEALTH)
    @given(examples(families=families))
    def run(ex: Example) -> None:
        result.examples += 1
        for b in ex.blocks:
            stats.add("block " + b.split(":")[0])
        stats.add(f"dtype {ex.dtype}")
        if current:
            with open(current, "w") as fh:
                fh.write(f"# blocks: {ex.blocks}\n{ex.source}")
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # fx prints failing traced code
                check_example(ex, stats)
        except Exception as exc:
            tb = traceback.format_exc(limit=-6)
            with contextlib.redirect_stderr(io.StringIO()):
                bug = known_bug(ex, exc)
            kind = f"[known bug {bug}] " if bug else ""
            result.failures.append(Failure(kind + failure_kind(exc), ex.source, ex.blocks, tb))

    run()
    result.counts = stats.counts
    return result


def shrink(kind: str, n: int, job_seed: int, families: list[str]) -> Failure | None:
    """Find the first failure of ``kind`` again (same seed: same examples) and let hypothesis
    shrink it; the minimal example's source, or None when it is not found again."""
    _quiet()
    best: list[Failure] = []
    kind = kind.split("] ", 1)[1] if kind.startswith("[known bug") else kind

    @seed(job_seed)
    @settings(max_examples=n, deadline=None, database=None,
              phases=[Phase.generate, Phase.shrink], suppress_health_check=HEALTH)
    @given(examples(families=families))
    def run(ex: Example) -> None:
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                check_example(ex)
        except Exception as exc:
            if failure_kind(exc) == kind:
                f = Failure(kind, ex.source, ex.blocks, traceback.format_exc(limit=-6))
                if not best or len(f.source) <= len(best[-1].source):
                    best.append(f)
                raise

    with contextlib.suppress(Exception):
        run()
    return best[-1] if best else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=500, help="generated models to check")
    p.add_argument("--seed", type=int, default=0, help="search seed (each job adds its index)")
    p.add_argument("--jobs", type=int, default=1, help="processes (each one CPU thread)")
    p.add_argument("--families", nargs="+", choices=sorted(BLOCKS), default=list(BLOCKS),
                   help="block families to draw from")
    p.add_argument("--shrink", action="store_true", help="shrink one failure of each kind")
    p.add_argument("--show", type=int, default=3, help="failing sources shown per kind")
    args = p.parse_args(argv)

    start = time.time()
    jobs = max(1, args.jobs)
    sizes = [args.examples // jobs + (1 if i < args.examples % jobs else 0) for i in range(jobs)]
    seeds = [args.seed + i for i in range(jobs)]
    currents = [_current_path(s) for s in seeds]
    crashed: list[str] = []
    if jobs == 1:
        results = [search(sizes[0], seeds[0], args.families, currents[0])]
    else:
        results = []
        with ProcessPoolExecutor(jobs) as pool:
            futures = [pool.submit(search, n, s, args.families, c)
                       for n, s, c in zip(sizes, seeds, currents)]
            for fut, c in zip(futures, currents):
                try:
                    results.append(fut.result())
                except BrokenProcessPool:  # a worker died (a crash below Python?)
                    results.append(Result())
                    if os.path.exists(c):
                        with open(c) as fh:
                            crashed.append(fh.read())
    for c in currents:
        if os.path.exists(c):
            os.remove(c)
    total = Result()
    where: dict[str, tuple[int, int]] = {}
    for (n, s), r in zip(zip(sizes, seeds), results):
        total.examples += r.examples
        total.counts.update(r.counts)
        total.failures.extend(r.failures)
        for f in r.failures:
            where.setdefault(f.kind, (n, s))
    elapsed = time.time() - start

    print(f"checked {total.examples} generated models in {elapsed:.0f} s "
          f"({elapsed / max(total.examples, 1):.2f} s each, {jobs} job(s), seed {args.seed})")
    for k, v in sorted(total.counts.items()):
        print(f"  {k:<60} {v}")
    kinds = Counter(f.kind for f in total.failures)
    unknown = [f for f in total.failures if not f.kind.startswith("[known bug")]
    print(f"\n{len(total.failures)} failing model(s), {len(kinds)} kind(s); "
          f"{len(total.failures) - len(unknown)} are instances of known bugs "
          "(strategies.KNOWN_BUGS), " f"{len(unknown)} are not")
    for kind, count in kinds.most_common():
        fails = sorted((f for f in total.failures if f.kind == kind), key=lambda f: len(f.source))
        print("\n" + "=" * 100)
        print(f"{count} x {kind}")
        for f in fails[: args.show]:
            print("-" * 100)
            print(f"blocks: {f.blocks}")
            print(f.source)
            print(f.error)
        if args.shrink:
            n, s = where[kind]
            small = shrink(kind, n, s, args.families)
            print("-" * 100)
            if small is None:
                print("shrink: not found again (a flaky failure?)")
            else:
                print(f"shrunk (blocks: {small.blocks}):")
                print(small.source)
                print(small.error)
    for source in crashed:
        print("\n" + "=" * 100)
        print("a worker process died while checking this model (or one after the other worker's "
              "crash broke the pool):")
        print(source)
    return 1 if unknown or crashed else 0


if __name__ == "__main__":
    sys.exit(main())
