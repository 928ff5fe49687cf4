"""SciPy side of the neighbour benchmark (run by `cargo bench -p ddppo-buffer`).

usage: scipy_neighbours.py DIR [REPS]

For every DIR/*.npy (N x D float32, written by benches/neighbours.rs) and
n in (5, 25), times building scipy.spatial.cKDTree(X) and querying every
point, tree.query(X, k=n+1, workers=w): the all-points query, for w = 1 and
w = all CPUs. Prints one line per case: `scipy <name> <n> <workers> <seconds>`
(best of REPS).
"""

import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree


def best_of(reps, f):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    directory = Path(sys.argv[1])
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    cpus = os.cpu_count() or 1
    files = sorted(directory.glob("*.npy"))
    if not files:
        sys.exit(f"no .npy files in {directory}")
    for path in files:
        # cKDTree works in float64; convert outside the timed region.
        x = np.load(path).astype(np.float64)
        for n in (5, 25):
            for workers in sorted({1, cpus}):
                t = best_of(reps, lambda: cKDTree(x).query(x, k=n + 1, workers=workers))
                print(f"scipy {path.stem} {n} {workers} {t:.6f}", flush=True)


if __name__ == "__main__":
    main()
