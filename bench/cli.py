"""Command line of ``python -m infofuse bench``: infofuse's ops beside their peers on this machine.

Examples::

    python -m infofuse bench                                   # every op, default shapes, on cuda if present
    python -m infofuse bench --quick --peers infofuse,eager    # smoke test
    python -m infofuse bench --distributed --world 3           # infofuse.distributed on 3 gloo ranks
    python -m infofuse bench --op linear_cross_entropy --models gaussian,lm --shape 4096,512,32768 --reps 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import case_names, get_case
from .case import Options
from .harness import run
from .planning import known_peer_names

_DTYPES = ("float32", "bfloat16", "float16")


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape must be comma-separated integers like 4096,512,32768: {text!r}"
        ) from None
    if any(v <= 0 for v in shape):
        raise argparse.ArgumentTypeError(f"shape entries must be positive: {text!r}")
    return shape


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(
        prog="python -m infofuse bench",
        description="Time, peak memory and accuracy of infofuse's ops beside their peers, in one process, "
        "on the same inputs. Prints a table per configuration, appends rows to OUT/results.json and draws "
        "OUT/<op>.png.",
    )
    p.add_argument("--op", type=_names, default=None, help=f"comma-separated ops (default all: {case_names()})")
    p.add_argument("--device", default=default_device, help=f"cpu or cuda[:i] (default {default_device})")
    p.add_argument(
        "--shape",
        type=_shape,
        action="append",
        default=None,
        help="N,D,V for linear_cross_entropy; repeatable (default: the op's target shape for the device)",
    )
    p.add_argument(
        "--dtype",
        type=_names,
        default=None,
        help=f"comma-separated from {', '.join(_DTYPES)} (default float32 on cpu, bfloat16 on cuda)",
    )
    p.add_argument("--models", type=_names, default=None, help="input models, e.g. gaussian,lm (default gaussian)")
    p.add_argument("--reps", type=int, default=None, help="timed iterations per peer (default 3 on cpu, 20 on cuda)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 1 on cpu, 3 on cuda)")
    p.add_argument("--peers", type=_names, default=None, help="comma-separated peers to run (default all)")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder (default bench-out/)")
    p.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    p.add_argument(
        "--ref-dtype",
        choices=("float64", "float32", "none"),
        default="float64",
        help="dtype of the ground truth for the error columns; none skips them (default float64)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the cpu (default torch's)")
    p.add_argument("--quick", action="store_true", help="tiny shape and 2 reps, for smoke tests")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="benchmark infofuse.distributed on spawned gloo ranks instead (its options: --distributed --help)",
    )
    return p


def parse_options(argv: list[str] | None = None) -> Options:
    parser = build_parser()
    a = parser.parse_args(argv)
    ops = a.op or case_names()
    for op in ops:
        if op not in case_names():
            parser.error(f"unknown op {op!r}; known: {', '.join(case_names())}")
    device = a.device
    on_gpu = device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    dtypes = a.dtype or (["bfloat16"] if on_gpu else ["float32"])
    for d in dtypes:
        if d not in _DTYPES:
            parser.error(f"unknown dtype {d!r}; choose from {', '.join(_DTYPES)}")
    if a.peers is not None:
        known = {name for op in ops for name in known_peer_names(get_case(op), device)}
        unknown = [n for n in a.peers if n not in known]
        if unknown:
            parser.error(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    reps = a.reps if a.reps is not None else 2 if a.quick else 20 if on_gpu else 3
    warmup = a.warmup if a.warmup is not None else 1 if a.quick else 3 if on_gpu else 1
    if reps < 1 or warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    return Options(
        ops=ops,
        device=device,
        shapes=a.shape,
        dtypes=dtypes,
        models=a.models,
        reps=reps,
        warmup=warmup,
        peers=a.peers,
        out=a.out,
        seed=a.seed,
        ref_dtype=None if a.ref_dtype == "none" else a.ref_dtype,
        memory=not a.no_memory,
        quick=a.quick,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--distributed" in argv:  # its own options: python -m infofuse bench --distributed --help
        from .distributed import main as distributed_main

        return distributed_main([a for a in argv if a != "--distributed"])
    opts = parse_options(argv)
    try:
        run(opts)
    except ValueError as exc:  # a bad --shape/--models combination found while planning
        print(f"infofuse bench: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
