"""Which CPU k-NN path wins where: the k-d tree walk against the AMX brute force, over d.

    python -m bench.knn_paths                      # N = 50000, k = 3, x against itself, d = 4 ... 128
    python -m bench.knn_paths --n 100000 --dims 8,12,16

Both paths run in this process on the same Gaussian points (``set_cpu_knn_path``), best of ``--reps``; the results
must be bit-identical (checked). Wall time and process CPU time are both printed: on a shared machine the CPU time
is the steadier of the two. knn.cpp's "auto" takes the AMX path from d = 12 on (kAmxMinDim).
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

import infofuse


def _time(x, k, reps):
    best = (float("inf"), float("inf"))
    out = None
    for _ in range(reps):
        wall, cpu = time.perf_counter(), time.process_time()
        out = torch.ops.infofuse.knn(x, x, k, 0, True)
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50000)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--dims", default="4,8,12,16,32,64,128")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args(argv)
    status = infofuse.build_info().get("cpu_knn_amx")
    console = Console()
    if status != "available":
        console.print(f"the AMX path cannot run here: {status}")
        return
    from infofuse._ext import _C

    threads = torch.get_num_threads()
    table = Table(title=f"CPU knn, N = {args.n}, k = {args.k}, float32, self excluded ({threads} threads)")
    for col in ("d", "tree wall ms", "tree CPU ms", "AMX wall ms", "AMX CPU ms", "tree ÷ AMX (CPU)", "identical"):
        table.add_column(col, justify="right")
    for d in (int(v) for v in args.dims.split(",")):
        x = torch.randn(1, args.n, d, generator=torch.Generator().manual_seed(d))
        times, outs = {}, {}
        for path in ("tree", "amx"):
            _C.set_cpu_knn_path(path)
            try:
                times[path], outs[path] = _time(x, args.k, args.reps)
            finally:
                _C.set_cpu_knn_path("auto")
        same = all(torch.equal(a, b) for a, b in zip(outs["tree"], outs["amx"], strict=True))
        (tw, tc), (aw, ac) = times["tree"], times["amx"]
        ms = [f"{v * 1e3:.0f}" for v in (tw, tc, aw, ac)]
        table.add_row(str(d), *ms, f"{tc / ac:.2f}×", str(same))
    console.print(table)
    console.print(f"build: {infofuse.build_info()}")


if __name__ == "__main__":
    main()
