"""Run the benchmarks: ``python -m benchmarks all`` or ``python -m benchmarks <name> [args]``.

Names: exact, matrix_free, peers, optimizers, fisher_diagonal, flatness, eigensolver, build
(the modules ``benchmarks/bench_<name>.py``; ``bench_<name>`` is accepted too).  Each runs in
its own process (``python -m benchmarks.bench_<name>``) so one benchmark's
threads, memory and imports do not bleed into the next.  ``peers`` needs
PyHessian, hessian-eigenthings and curvlinops, kept out of the dev install: it
runs under ``.venv-anchors/bin/python`` when that exists (see
benchmarks/README.md), else under this interpreter, where it prints how to
install the peers and skips.  ``all`` runs every benchmark but ``large``,
``eigensolver`` and ``build`` with their defaults and exits non-zero if any failed;
``eigensolver`` (dense solvers at n = 4k/8k/12k, minutes), ``build`` (the exact build's cost
per column at the paper's sizes, minutes) and ``large`` (a GPT-2 Hessian at 10M
parameters by default, about half an hour on 2 cores; ``--size 124m`` for GPT-2 small)
runs only when named.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = (
    "exact",
    "matrix_free",
    "peers",
    "optimizers",
    "fisher_diagonal",
    "flatness",
    "eigensolver",
    "build",
    "large",
)
ALL = tuple(n for n in NAMES if n not in ("large", "eigensolver", "build"))  # only when named
ANCHORS = ROOT / ".venv-anchors" / "bin" / "python"


def interpreter(name: str) -> str:
    if name == "peers" and ANCHORS.exists():
        return str(ANCHORS)
    return sys.executable


def run(name: str, args: list[str]) -> int:
    python = interpreter(name)
    print(
        f"\n## bench_{name}  ({python} -m benchmarks.bench_{name} {' '.join(args)})\n", flush=True
    )
    t0 = time.perf_counter()
    rc = subprocess.call([python, "-m", f"benchmarks.bench_{name}", *args], cwd=ROOT)
    print(f"\n(bench_{name}: exit {rc}, {time.perf_counter() - t0:.0f} s)", flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    name = argv[0].removeprefix("bench_").removesuffix(".py")
    if name == "all":
        failed = [n for n in ALL if run(n, argv[1:]) != 0]
        if failed:
            print(f"failed: {', '.join(failed)}")
        return 1 if failed else 0
    if name not in NAMES:
        print(f"unknown benchmark {argv[0]!r}; choose all or one of {', '.join(NAMES)}")
        return 2
    return run(name, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
