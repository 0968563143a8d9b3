"""The benchmark run: plan, then for each configuration measure every peer and report (``run``).

A newcomer reads the modules in this order:

- ``case``: what a case provides (``Case``, ``Peer``, ``Inputs``) and what a run asks for (``Options``, ``Config``);
- ``planning``: which peers run (probed on tiny inputs) and the configurations;
- ``timing``: CPU and CUDA timers, peers in turn, median and 20/80 % quantiles, the other processes' CPU share;
- ``memory``: peak memory above inputs and gradients (CUDA peak; peak RSS of a fresh child process on CPU);
- ``accuracy``: loss and gradient errors against the case's ground truth;
- ``floor``: the GEMM floor, the op's least GEMM FLOPs over this machine's GEMM rate measured in the same process;
- ``environment``: device name, versions and date recorded in every row;
- ``report``: ratios, the rich table, the JSON rows; ``plot``: the PNG;
- this module: ``run`` and ``_run_config``, which tie them together.

The names other code imported from here before the split (``Case``, ``Options``, ``plan_peers``, ``write_json``,
``worker_main`` ...) are still importable from here. See NOTES.md for how each quantity is measured and the floors.
"""

from __future__ import annotations

import gc
import sys
import time
import warnings
from pathlib import Path

import torch

from .accuracy import errors
from .case import Case, Config, Inputs, Options, Peer, first_line
from .environment import environment
from .floor import GemmProbe, add_floor_ratios, floor_fields, measure_gemm_rate, paired_fields, rate_shape
from .memory import child_peak_bytes, cuda_peak_bytes, worker_main
from .planning import configs, known_peer_names, peers_for_model, plan_peers
from .plot import write_plot
from .report import add_ratios, header_line, make_table, shape_str, write_json
from .timing import OtherCpu, summary, time_round_robin

__all__ = [
    "Case",
    "Config",
    "Inputs",
    "Options",
    "Peer",
    "environment",
    "errors",
    "header_line",
    "known_peer_names",
    "make_table",
    "peers_for_model",
    "plan_peers",
    "run",
    "worker_main",
    "write_json",
    "write_plot",
]


def _run_config(case: Case, config: Config, peers, skipped, opts: Options, env: dict, advance, say) -> list[dict]:
    dtype = getattr(torch, config.dtype)
    on_gpu = opts.device.startswith("cuda")
    memory: dict[str, int | None] = {}
    mem_notes: dict[str, str] = {}
    if opts.memory and not on_gpu:
        # children first: they also fill inductor's on-disk cache, so the compile below is a cache hit
        for p in peers:
            say(f"{case.op} {config.model} {shape_str(case, config.shape)}: memory of {p.name} (child process)")
            memory[p.name], mem_notes[p.name] = child_peak_bytes(case.op, p.name, config, opts)
            advance()

    what = f"inputs and {opts.ref_dtype} reference" if opts.ref_dtype else "inputs"
    say(f"{case.op} {config.model} {shape_str(case, config.shape)}: {what}")
    inputs = case.make_inputs(config.shape, config.model, dtype, opts.device, opts.seed)
    ref, ref_dtype = None, opts.ref_dtype
    if ref_dtype is not None:
        try:
            ref = case.reference(inputs, getattr(torch, ref_dtype))
        except (torch.OutOfMemoryError, MemoryError):  # a dense ground truth at a shape made to avoid it
            ref_dtype = None
            if on_gpu:
                torch.cuda.empty_cache()
            say(
                f"{case.op} {config.model} {shape_str(case, config.shape)}: the {opts.ref_dtype} reference does not "
                "fit in memory; no accuracy columns here (try --ref-dtype float32)"
            )
        gc.collect()
    advance()

    fns, failures = {}, {}
    for p in peers:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fns[p.name] = p.build()
        except Exception as exc:
            failures[p.name] = first_line(exc)
    floor = case.floor_gemms(config.shape, config.model)
    gemm = None if floor is None else rate_shape(*floor.gemm)
    if gemm is not None:
        say(f"{case.op} {config.model} {shape_str(case, config.shape)}: GEMM rate at {gemm}, before the timing")
        rate_before = measure_gemm_rate(gemm, dtype, opts.device, seed=opts.seed)
    probe = None if gemm is None else GemmProbe(gemm, dtype, opts.device, seed=opts.seed)
    say(f"{case.op} {config.model} {shape_str(case, config.shape)}: timing {', '.join(fns)}")
    watch = OtherCpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples, accuracy, failed = time_round_robin(fns, inputs, opts, ref, case.grad_labels, advance, probe)
    del probe
    other_cpu = None if on_gpu else watch.fraction()
    failures.update(failed)
    rates = None
    if gemm is not None:
        rates = (rate_before, measure_gemm_rate(gemm, dtype, opts.device, seed=opts.seed))
        say(f"{case.op} {config.model}: GEMM rate {rates[0]:.1f} GFLOP/s before the timing, {rates[1]:.1f} after")

    if opts.memory and on_gpu:
        for name, fn in fns.items():
            if name not in failures:
                try:
                    memory[name] = cuda_peak_bytes(fn, inputs)
                except Exception as exc:
                    memory[name], mem_notes[name] = None, f"memory step failed: {first_line(exc)}"
            advance()

    mem_method = None
    if opts.memory:
        mem_method = "cuda max_memory_allocated delta" if on_gpu else "VmHWM - VmRSS in a fresh child process"
    rows = []
    base = {
        "op": case.op,
        **{k: env[k] for k in ("device", "device_name", "threads", "torch", "cuda", "triton", "python")},
        "infofuse": env["infofuse"],
        "infofuse_cpp": env["infofuse_cpp"],
        "shape": dict(zip(case.dims, config.shape, strict=True)),
        "dtype": config.dtype,
        "model": config.model,
        **case.params,
        "reps": opts.reps,
        "warmup": opts.warmup,
        "seed": opts.seed,
        "ref_dtype": ref_dtype,
        "memory_method": mem_method,
        "other_cpu": other_cpu,
        **floor_fields(floor, rates),
        "floor_note": None if floor is None else floor.what,
        "date": env["date"],
    }
    for p in peers:
        reason = failures.get(p.name)
        s = samples.get(p.name, {"fwd": [], "bwd": [], "both": [], "gemm": []})
        peak = memory.get(p.name)
        row = {
            **base,
            "peer": p.name,
            "status": "failed" if reason else "ok",
            "reason": reason,
            "note": p.note,
            "fwd_ms": summary(s["fwd"]),
            "bwd_ms": summary(s["bwd"]),
            "both_ms": summary(s["both"]),
            "peak_mb": None if peak is None else peak / 2**20,
            "memory_note": mem_notes.get(p.name) or None,
            **paired_fields(floor, s),
            **accuracy.get(p.name, {}),
        }
        rows.append(row)
    add_ratios(rows, case)
    add_floor_ratios(rows)
    for name, reason in skipped.items():
        rows.append({**base, "peer": name, "status": "skipped", "reason": reason})
    return rows


def run(opts: Options, console=None) -> tuple[list[dict], list[Path]]:
    """Runs every selected case; prints tables; writes ``results.json`` and one PNG per op under ``opts.out``.

    Returns (rows of this run, paths written).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import get_case

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=160)  # a log file gets the whole table, not 80 squeezed columns
    t_start = time.perf_counter()
    env = environment(opts.device)
    console.print(header_line(env))

    # plan everything first, so the progress bar knows its length
    plans = []
    total = 0
    for op in opts.ops:
        case = get_case(op)
        by_dtype = {}
        for dtype in opts.dtypes:
            by_dtype[dtype] = plan_peers(case, opts.device, getattr(torch, dtype), opts.peers, opts.seed)
        for config in configs(case, opts):
            peers, skipped = peers_for_model(*by_dtype[config.dtype], config.model)
            plans.append((case, config, peers, skipped))
            k = len(peers)
            total += 1 + (opts.warmup + opts.reps) * k + (k if opts.memory else 0)

    opts.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    written: list[Path] = []
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task("starting", total=total)

            log = not console.is_terminal  # a log file also gets each step as a line: a run cut short says where

            def log_line(text):
                if log and text:
                    console.print(f"{time.perf_counter() - t_start:7.1f} s {text}", highlight=False)

            def advance(text=None):
                progress.advance(task)
                log_line(text)

            def say(text):
                progress.update(task, description=text)
                log_line(text)

            for case, config, peers, skipped in plans:
                config_rows = _run_config(case, config, peers, skipped, opts, env, advance, say)
                rows.extend(config_rows)
                progress.console.print(make_table(case, config_rows))
    finally:
        if rows:
            results = opts.out / "results.json"
            write_json(results, rows)
            written.append(results)
            for op in dict.fromkeys(r["op"] for r in rows):
                png = opts.out / f"{op}.png"
                write_plot(png, get_case(op), [r for r in rows if r["op"] == op])
                written.append(png)
    for p in written:
        console.print(f"wrote {p}")
    console.print(f"total wall time {time.perf_counter() - t_start:.1f} s")
    return rows, written


if __name__ == "__main__":  # the memory child's entry, as before the split
    worker_main(sys.argv[1])
