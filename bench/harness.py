"""The machinery every benchmark case shares: timing, peak memory, accuracy, and the table, JSON rows and plot.

How things are measured (see NOTES.md for the floors they are compared with):

- Time: each iteration runs ``loss = fn(*args)`` and ``loss.backward()`` and times the two phases separately
  (``time.perf_counter`` on CPU; CUDA events, with the L2 cache flushed before each iteration, on GPU). Peers take
  turns within every repetition, in an order rotated from one repetition to the next, so that none of them gets a
  systematically warmer (or hotter) machine. Reported: median and 20/80 % quantiles of forward, backward and their
  per-iteration sum ("both") over ``reps`` iterations after ``warmup`` ones. Gradients are set to None before every
  iteration.
- Peak memory above inputs and gradients: on CUDA, ``max_memory_allocated`` after ``reset_peak_memory_stats``
  minus what was allocated before the step minus the bytes of the gradients the step produced. On CPU, each
  (configuration, peer) runs in a fresh child process (``worker_main``) that builds the
  same inputs from the same seed, runs one warm-up step, frees the gradients, trims the allocator, resets the
  peak RSS (``5`` into ``/proc/self/clear_refs``), reads VmRSS, runs one step and reads VmHWM. The child fixes
  glibc's mmap threshold (``MALLOC_MMAP_THRESHOLD_``) so that large tensors come and go from the OS as they are
  allocated and freed, which keeps RSS a faithful account of live bytes. Children run one after the other.
- Accuracy: the loss and gradients of each peer's first (warm-up) iteration against a ground truth computed once
  per configuration from the same inputs (float64 by default): |loss - ref| / |ref| and ‖g - g_ref‖ / ‖g_ref‖.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["Case", "Config", "Inputs", "Options", "Peer", "environment", "run"]

# --------------------------------------------------------------------------------------------------------------
# What a case provides


@dataclass
class Peer:
    """One implementation under comparison.

    ``build()`` returns the loss function, called as ``fn(*inputs.args)`` and returning a scalar tensor. It runs
    once per configuration and process (``torch.compile`` wraps there).
    """

    name: str
    build: Callable[[], Callable[..., torch.Tensor]] | None
    skip: str | None = None  # why it cannot run here (not installed, GPU only, ...)
    probe: bool = True  # try it on tiny inputs before planning (False where that is costly, as for torch.compile)
    stands_in_for: str | None = None  # run only when that peer is unavailable, or when asked for by name
    models: tuple[str, ...] | None = None  # the input models it can run (None: every one); skipped on the others
    note: str = ""


@dataclass
class Inputs:
    args: tuple  # positional arguments of every peer's loss function
    leaves: tuple[torch.Tensor, ...]  # the arguments that require grad, in the order of Case.grad_labels


class Case:
    """What the harness needs to know about one op. Subclasses fill in the attributes and the four methods."""

    op: str = ""
    dims: tuple[str, ...] = ()  # names of a shape's entries, e.g. ("N", "D", "V")
    models: tuple[str, ...] = ()  # input models ("gaussian", "lm", ...)
    default_models: tuple[str, ...] = ()
    grad_labels: tuple[str, ...] = ()  # one per Inputs.leaves entry, e.g. ("dX", "dW")
    time_baseline: str = "eager"  # peer whose fwd+bwd time the others are divided by
    memory_baseline: str | None = None  # peer whose peak memory the others are divided by
    quick_shape: tuple[int, ...] = ()
    probe_shape: tuple[int, ...] = ()  # tiny shape for the availability probe
    params: dict = {}  # fixed op arguments, recorded in every row

    def default_shapes(self, device: str) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def make_inputs(self, shape: tuple[int, ...], model: str, dtype: torch.dtype, device: str, seed: int) -> Inputs:
        """Deterministic in (shape, model, dtype, device, seed): the memory children rebuild the same inputs."""
        raise NotImplementedError

    def peers(self, device: str, dtype: torch.dtype) -> list[Peer]:
        raise NotImplementedError

    def reference(self, inputs: Inputs, dtype: torch.dtype) -> tuple[float, list[torch.Tensor]]:
        """Ground-truth loss and gradients (of ``inputs.leaves``) computed in ``dtype``."""
        raise NotImplementedError


@dataclass(frozen=True)
class Config:
    shape: tuple[int, ...]
    model: str
    dtype: str  # "float32", "bfloat16", ...


@dataclass
class Options:
    ops: list[str]
    device: str
    shapes: list[tuple[int, ...]] | None = None  # None: the case's defaults (or its quick shape)
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    models: list[str] | None = None  # None: the case's defaults
    reps: int = 3
    warmup: int = 1
    peers: list[str] | None = None  # None: every peer
    out: Path = Path("bench-out")
    seed: int = 0
    ref_dtype: str | None = "float64"  # None: no accuracy columns
    memory: bool = True
    quick: bool = False


# --------------------------------------------------------------------------------------------------------------
# Environment


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict:
    """Device, versions and date, recorded in every row."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = f"{_cpu_name()} ({os.cpu_count()} CPUs)"
    try:
        import infofuse

        cpp = bool(infofuse.cpp_available())
    except Exception:
        cpp = None
    return {
        "device": device,
        "device_name": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "infofuse": _version("infofuse"),
        "infofuse_cpp": cpp,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


# --------------------------------------------------------------------------------------------------------------
# One step, timing


def _clear_grads(leaves) -> None:
    for t in leaves:
        t.grad = None


def _grad_bytes(leaves) -> int:
    return sum(t.grad.numel() * t.grad.element_size() for t in leaves if t.grad is not None)


class _CpuTimer:
    def step(self, fn, inputs: Inputs) -> tuple[torch.Tensor, float, float]:
        t0 = time.perf_counter()
        loss = fn(*inputs.args)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        return loss, (t1 - t0) * 1e3, (t2 - t1) * 1e3


class _CudaTimer:
    def __init__(self, device: str):
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        # written before every step so that no peer finds its operands in L2 (as triton's do_bench does)
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def step(self, fn, inputs: Inputs) -> tuple[torch.Tensor, float, float]:
        start, mid, end = self.events
        self.flush.zero_()
        start.record()
        loss = fn(*inputs.args)
        mid.record()
        loss.backward()
        end.record()
        torch.cuda.synchronize()
        return loss, start.elapsed_time(mid), mid.elapsed_time(end)


class _OtherCpu:
    """The share of the machine's CPUs that other processes (or the hypervisor, as steal time) used while we were
    timing: CPU timings taken beside other work are not worth much, so every row records it."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK")
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[int, int, float] | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                mine = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            return None
        busy = sum(v[:8]) - v[3] - v[4]  # all but idle and iowait; steal counts as taken from us
        return busy, int(mine[11]) + int(mine[12]), time.perf_counter()

    def fraction(self) -> float | None:
        end = self._read()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        others = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return max(others, 0) / self.hz / (end[2] - self.start[2]) / (os.cpu_count() or 1)


def _quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _summary(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": _quantile(values, 0.5), "p20": _quantile(values, 0.2), "p80": _quantile(values, 0.8)}


def _errors(loss: torch.Tensor, leaves, ref: tuple[float, list[torch.Tensor]] | None, labels) -> dict:
    value = loss.detach().double().item()
    out = {"loss": value}
    if ref is None:
        return out
    ref_loss, ref_grads = ref
    out["loss_ref"] = ref_loss
    out["loss_abs_err"] = abs(value - ref_loss)
    out["loss_rel_err"] = abs(value - ref_loss) / abs(ref_loss) if ref_loss != 0 else math.inf
    rel = {}
    for label, leaf, g_ref in zip(labels, leaves, ref_grads, strict=True):
        if leaf.grad is None:
            rel[label] = None
            continue
        g = leaf.grad.to(g_ref.dtype)
        rel[label] = ((g - g_ref).norm() / g_ref.norm()).item()
    out["grad_rel_err"] = rel
    return out


def _time_round_robin(fns: dict, inputs: Inputs, opts: Options, ref, labels, advance) -> tuple[dict, dict, dict]:
    """Times every peer ``warmup + reps`` times, taking turns. Returns (samples, accuracy, failures)."""
    timer = _CudaTimer(opts.device) if opts.device.startswith("cuda") else _CpuTimer()
    names = list(fns)
    samples = {n: {"fwd": [], "bwd": [], "both": []} for n in names}
    accuracy: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for rep in range(opts.warmup + opts.reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            if name not in failed:
                _clear_grads(inputs.leaves)
                try:
                    loss, fwd, bwd = timer.step(fns[name], inputs)
                except Exception as exc:  # a peer that breaks at this shape is reported, not fatal
                    failed[name] = _first_line(exc)
                    _clear_grads(inputs.leaves)
                    advance()
                    continue
                if rep == 0:  # accuracy from the first call, outside the timed region
                    accuracy[name] = _errors(loss, inputs.leaves, ref, labels)
                if rep >= opts.warmup:
                    samples[name]["fwd"].append(fwd)
                    samples[name]["bwd"].append(bwd)
                    samples[name]["both"].append(fwd + bwd)
                del loss
                _clear_grads(inputs.leaves)
                advance(f"  {name}: {'warm-up' if rep < opts.warmup else 'rep'} {rep + 1}, {fwd + bwd:.1f} ms")
                continue
            advance()
    return samples, accuracy, failed


# --------------------------------------------------------------------------------------------------------------
# Peak memory


def _cuda_peak_bytes(fn, inputs: Inputs) -> int:
    _clear_grads(inputs.leaves)
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = fn(*inputs.args)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    grads = _grad_bytes(inputs.leaves)
    del loss
    _clear_grads(inputs.leaves)
    return peak - before - grads


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if m is None:
        raise RuntimeError(f"/proc/self/status has no {key}")
    return int(m.group(1))


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _worker(spec: dict) -> dict:
    """Body of the memory child: one warm-up step, then the peak RSS of one more step above its start."""
    from infofuse.bench import get_case

    torch.set_num_threads(spec["threads"])
    case = get_case(spec["op"])
    dtype = getattr(torch, spec["dtype"])
    inputs = case.make_inputs(tuple(spec["shape"]), spec["model"], dtype, "cpu", spec["seed"])
    peer = next(p for p in case.peers("cpu", dtype) if p.name == spec["peer"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn = peer.build()
        fn(*inputs.args).backward()
    _clear_grads(inputs.leaves)
    gc.collect()
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status_kb("VmRSS")
    loss = fn(*inputs.args)
    loss.backward()
    hwm = _status_kb("VmHWM")
    grads = _grad_bytes(inputs.leaves)
    return {
        "peak_bytes": (hwm - base) * 1024 - grads,
        "rss_before_bytes": base * 1024,
        "rss_peak_bytes": hwm * 1024,
        "grad_bytes": grads,
    }


def _child_peak_bytes(op: str, peer: str, config: Config, opts: Options) -> tuple[int | None, str]:
    spec = {
        "op": op,
        "peer": peer,
        "shape": list(config.shape),
        "model": config.model,
        "dtype": config.dtype,
        "seed": opts.seed,
        "threads": torch.get_num_threads(),
    }
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    # torch first, then infofuse: the way any user script loads them
    code = "import sys, torch; from infofuse.bench.harness import worker_main; worker_main(sys.argv[1])"
    cmd = [sys.executable, "-c", code, json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    except subprocess.TimeoutExpired:
        return None, "memory child timed out"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)["peak_bytes"], ""
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"memory child failed (rc {proc.returncode}): {tail[:200]}"


# --------------------------------------------------------------------------------------------------------------
# Planning: which peers run


def _probe(case: Case, peer: Peer, device: str, dtype: torch.dtype, seed: int) -> str | None:
    """None if ``peer`` runs a tiny forward+backward here, else why not."""
    try:
        inputs = case.make_inputs(case.probe_shape, (peer.models or case.models)[0], dtype, device, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peer.build()(*inputs.args).backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    except Exception as exc:
        return _first_line(exc)
    return None


def plan_peers(case: Case, device: str, dtype: torch.dtype, wanted: list[str] | None, seed: int = 0):
    """(runnable peers, {skipped name: reason}) for ``case`` on ``device`` in ``dtype``."""
    peers = case.peers(device, dtype)
    if wanted is not None:
        peers = [p for p in peers if p.name in wanted]
    skipped: dict[str, str] = {}
    ok: list[Peer] = []
    for p in peers:
        reason = p.skip or (None if not p.probe else _probe(case, p, device, dtype, seed))
        if reason is None and p.build is None:
            reason = "no implementation"
        if reason is None:
            ok.append(p)
        else:
            skipped[p.name] = reason
    ok_names = {p.name for p in ok}
    runnable = []
    for p in ok:
        if p.stands_in_for in ok_names and not (wanted and p.name in wanted):
            continue  # the peer it stands in for runs
        runnable.append(p)
    for name in list(skipped):
        # a stand-in that was not needed is not worth a "skipped" line
        stand_in = next((p for p in peers if p.name == name), None)
        if stand_in and stand_in.stands_in_for in ok_names and not (wanted and name in wanted):
            del skipped[name]
    return runnable, skipped


def peers_for_model(peers: list[Peer], skipped: dict[str, str], model: str):
    """(peers, skipped) for one input model: a peer limited to other models is skipped, with why."""
    off = {p.name: f"runs on {', '.join(p.models)} inputs only" for p in peers if p.models and model not in p.models}
    return [p for p in peers if p.name not in off], {**skipped, **off}


def known_peer_names(case: Case, device: str) -> list[str]:
    return [p.name for p in case.peers(device, torch.float32)]


# --------------------------------------------------------------------------------------------------------------
# Running a configuration


def _run_config(case: Case, config: Config, peers, skipped, opts: Options, env: dict, advance, say) -> list[dict]:
    dtype = getattr(torch, config.dtype)
    on_gpu = opts.device.startswith("cuda")
    memory: dict[str, int | None] = {}
    mem_notes: dict[str, str] = {}
    if opts.memory and not on_gpu:
        # children first: they also fill inductor's on-disk cache, so the compile below is a cache hit
        for p in peers:
            say(f"{case.op} {config.model} {_shape_str(case, config.shape)}: memory of {p.name} (child process)")
            memory[p.name], mem_notes[p.name] = _child_peak_bytes(case.op, p.name, config, opts)
            advance()

    what = f"inputs and {opts.ref_dtype} reference" if opts.ref_dtype else "inputs"
    say(f"{case.op} {config.model} {_shape_str(case, config.shape)}: {what}")
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
                f"{case.op} {config.model} {_shape_str(case, config.shape)}: the {opts.ref_dtype} reference does not "
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
            failures[p.name] = _first_line(exc)
    say(f"{case.op} {config.model} {_shape_str(case, config.shape)}: timing {', '.join(fns)}")
    watch = _OtherCpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples, accuracy, failed = _time_round_robin(fns, inputs, opts, ref, case.grad_labels, advance)
    other_cpu = None if on_gpu else watch.fraction()
    failures.update(failed)

    if opts.memory and on_gpu:
        for name, fn in fns.items():
            if name not in failures:
                try:
                    memory[name] = _cuda_peak_bytes(fn, inputs)
                except Exception as exc:
                    memory[name], mem_notes[name] = None, f"memory step failed: {_first_line(exc)}"
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
        "date": env["date"],
    }
    for p in peers:
        reason = failures.get(p.name)
        s = samples.get(p.name, {"fwd": [], "bwd": [], "both": []})
        peak = memory.get(p.name)
        row = {
            **base,
            "peer": p.name,
            "status": "failed" if reason else "ok",
            "reason": reason,
            "note": p.note,
            "fwd_ms": _summary(s["fwd"]),
            "bwd_ms": _summary(s["bwd"]),
            "both_ms": _summary(s["both"]),
            "peak_mb": None if peak is None else peak / 2**20,
            "memory_note": mem_notes.get(p.name) or None,
            **accuracy.get(p.name, {}),
        }
        rows.append(row)
    _add_ratios(rows, case)
    for name, reason in skipped.items():
        rows.append({**base, "peer": name, "status": "skipped", "reason": reason})
    return rows


def _add_ratios(rows: list[dict], case: Case) -> None:
    by_peer = {r["peer"]: r for r in rows}
    t_base = by_peer.get(case.time_baseline, {}).get("both_ms")
    m_base = by_peer.get(case.memory_baseline, {}).get("peak_mb") if case.memory_baseline else None
    for r in rows:
        both = r.get("both_ms")
        r["both_ratio_to"] = case.time_baseline
        r["both_ratio"] = both["median"] / t_base["median"] if both and t_base else None
        r["memory_ratio_to"] = case.memory_baseline
        ok = r.get("peak_mb") is not None and m_base is not None and m_base > 0
        r["memory_ratio"] = r["peak_mb"] / m_base if ok else None


# --------------------------------------------------------------------------------------------------------------
# Output


def _shape_str(case: Case, shape) -> str:
    return " ".join(f"{k}={v}" for k, v in zip(case.dims, shape, strict=True))


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _fmt_err(v: float | None) -> str:
    return "-" if v is None else f"{v:.1e}"


def _fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}×"


def header_line(env: dict) -> str:
    cpp = {True: "C++ extension loaded", False: "C++ extension NOT loaded", None: "not importable"}[env["infofuse_cpp"]]
    parts = [
        f"{env['device']}: {env['device_name']}",
        f"{env['threads']} threads",
        f"torch {env['torch']}" + (f" (CUDA {env['cuda']})" if env["cuda"] else ""),
        f"triton {env['triton'] or 'not installed'}",
        f"infofuse {env['infofuse']} ({cpp})",
        f"python {env['python']}",
        env["date"],
    ]
    return " · ".join(parts)


def make_table(case: Case, rows: list[dict]):
    """A rich Table for the rows of one configuration."""
    from rich.table import Table

    first = rows[0]
    shape = _shape_str(case, first["shape"].values())
    title = f"{case.op} · {shape} · {first['dtype']} · {first['model']} logits"
    labels = case.grad_labels
    ref = first.get("ref_dtype")
    table = Table(title=title, title_justify="left")
    table.add_column("peer", no_wrap=True)
    for col in ("fwd ms", "bwd ms", "fwd+bwd ms [p20-p80]", f"÷ {case.time_baseline}", "peak MiB"):
        table.add_column(col, justify="right")
    if case.memory_baseline:
        table.add_column(f"÷ {case.memory_baseline}", justify="right")
    if ref:
        table.add_column(f"loss err (vs {ref})", justify="right")
        for label in labels:
            table.add_column(f"{label} err", justify="right")
    notes = []
    busy = first.get("other_cpu")
    if busy is not None and busy > 0.05:
        notes.append(f"warning: other processes used {busy:.0%} of the CPUs while timing; the times are skewed")
    for r in rows:
        if r["status"] == "skipped":
            notes.append(f"skipped {r['peer']}: {r['reason']}")
            continue
        if r["status"] == "failed":
            notes.append(f"failed {r['peer']}: {r['reason']}")
        if r.get("memory_note"):
            notes.append(f"{r['peer']}: {r['memory_note']}")
        both = r.get("both_ms")
        both_s = "-" if both is None else f"{_fmt_ms(both['median'])} [{_fmt_ms(both['p20'])}-{_fmt_ms(both['p80'])}]"
        cells = [
            r["peer"],
            _fmt_ms((r.get("fwd_ms") or {}).get("median")),
            _fmt_ms((r.get("bwd_ms") or {}).get("median")),
            both_s,
            _fmt_ratio(r.get("both_ratio")),
            "-" if r.get("peak_mb") is None else f"{r['peak_mb']:.1f}",
        ]
        if case.memory_baseline:
            cells.append(_fmt_ratio(r.get("memory_ratio")))
        if ref:
            cells.append(_fmt_err(r.get("loss_rel_err")))
            errs = r.get("grad_rel_err") or {}
            cells.extend(_fmt_err(errs.get(label)) for label in labels)
        table.add_row(*cells)
    peers_notes = [f"{r['peer']}: {r['note']}" for r in rows if r.get("note") and r["status"] != "skipped"]
    table.caption = "\n".join(notes + peers_notes) or None
    table.caption_justify = "left"
    return table


def write_json(path: Path, rows: list[dict]) -> None:
    """Appends ``rows`` to the JSON list in ``path`` (created if missing; a file that is not a list is moved
    aside to ``<name>.bak`` rather than overwritten)."""
    existing: list = []
    if path.exists():
        try:
            existing = json.loads(path.read_text())
            if not isinstance(existing, list):
                raise ValueError("not a list")
        except ValueError:
            path.replace(path.with_suffix(path.suffix + ".bak"))
            existing = []
    path.write_text(json.dumps(existing + rows, indent=1) + "\n")


def write_plot(path: Path, case: Case, rows: list[dict]) -> None:
    """Per configuration: stacked forward/backward time (with the 20-80 % range of their sum) and peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "ok" and r.get("both_ms"):
            groups.setdefault((tuple(r["shape"].values()), r["dtype"], r["model"]), []).append(r)
    n = max(len(groups), 1)
    fig, axes = plt.subplots(n, 2, figsize=(12, 3.6 * n), squeeze=False)
    for (ax_t, ax_m), ((shape, dtype, model), rs) in zip(axes, groups.items(), strict=True):
        names = [r["peer"] for r in rs]
        pos = range(len(rs))
        fwd = [r["fwd_ms"]["median"] for r in rs]
        bwd = [r["bwd_ms"]["median"] for r in rs]
        both = [r["both_ms"] for r in rs]
        ax_t.bar(pos, fwd, label="forward", color="#4c72b0")
        ax_t.bar(pos, bwd, bottom=fwd, label="backward", color="#dd8452")
        mid = [f + b for f, b in zip(fwd, bwd, strict=True)]
        lo = [max(m - s["p20"], 0) for m, s in zip(mid, both, strict=True)]
        hi = [max(s["p80"] - m, 0) for m, s in zip(mid, both, strict=True)]
        ax_t.errorbar(pos, mid, yerr=[lo, hi], fmt="none", ecolor="black", capsize=3, lw=1)
        ax_t.set_ylabel("ms (median; bar: p20-p80 of fwd+bwd)")
        ax_t.legend(fontsize=8)
        peaks = [r.get("peak_mb") or 0.0 for r in rs]
        ax_m.bar(pos, peaks, color="#55a868")
        ax_m.set_ylabel("peak MiB above inputs + grads")
        title = f"{_shape_str(case, shape)} · {dtype} · {model}"
        for ax in (ax_t, ax_m):
            ax.set_xticks(list(pos), names, rotation=20, ha="right", fontsize=8)
            ax.set_title(title, fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    if rows:
        fig.suptitle(f"{case.op} on {rows[0]['device_name']} ({rows[0]['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------
# Entry point


def _configs(case: Case, opts: Options) -> list[Config]:
    if opts.shapes:
        shapes = opts.shapes
    elif opts.quick:
        shapes = [case.quick_shape]
    else:
        shapes = case.default_shapes(opts.device)
    for s in shapes:
        if len(s) != len(case.dims):
            raise ValueError(f"{case.op} shapes have {len(case.dims)} entries ({','.join(case.dims)}); got {s}")
    models = opts.models or list(case.default_models)
    for m in models:
        if m not in case.models:
            raise ValueError(f"{case.op} has no input model {m!r}; known: {', '.join(case.models)}")
    return [Config(tuple(s), m, d) for d in opts.dtypes for s in shapes for m in models]


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
        for config in _configs(case, opts):
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


def worker_main(spec_json: str) -> None:
    """Entry of the memory child (also ``python -m infofuse.bench.harness '<json spec>'`` by hand)."""
    print(json.dumps(_worker(json.loads(spec_json))), flush=True)


if __name__ == "__main__":
    worker_main(sys.argv[1])
