"""What a run reports: each row's ratios to the case's baselines, the header line, the rich table of a configuration
(with the GEMM floor's columns and caption line where the op has one), and the JSON list the rows are appended to.
A row carries the device name, versions, shape, dtype and date (``environment``) and the measured GEMM rate."""

from __future__ import annotations

import json
from pathlib import Path

from .case import Case
from .floor import GEMM_RUNS

__all__ = ["add_ratios", "floor_line", "header_line", "make_table", "shape_str", "write_json"]


def add_ratios(rows: list[dict], case: Case) -> None:
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


def shape_str(case: Case, shape) -> str:
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


_FLOOR_FIELDS = ("fwd_floor_ratio", "both_floor_ratio", "both_floor_ratio_paired")  # the floor's columns


def floor_line(row: dict) -> str:
    """The caption line of a configuration's GEMM floor: what it counts, the measured rate, the floor times."""
    m, n, k = row["gemm_rate_shape"]
    return (
        f"GEMM floor: {row['floor_note']}: {row['floor_flops_both'] / 1e9:.1f} GFLOP at {row['gemm_gflops']:.1f} "
        f"GFLOP/s = {_fmt_ms(row['floor_ms_both'])} ms (forward {_fmt_ms(row['floor_ms_fwd'])} ms); the rate: "
        f"{row['dtype']} torch.mm {m}×{n}×{k}, {row['threads']} threads, best of ≥ {GEMM_RUNS}, "
        f"{row['gemm_gflops_before']:.1f} before the timing and {row['gemm_gflops_after']:.1f} after; paired: "
        "each step ÷ the floor at the rate of one GEMM run just before it, median over the steps"
    )


def make_table(case: Case, rows: list[dict]):
    """A rich Table for the rows of one configuration."""
    from rich.table import Table

    first = rows[0]
    shape = shape_str(case, first["shape"].values())
    title = f"{case.op} · {shape} · {first['dtype']} · {first['model']} logits"
    labels = case.grad_labels
    ref = first.get("ref_dtype")
    floor = first.get("floor_ms_both") is not None
    table = Table(title=title, title_justify="left")
    table.add_column("peer", no_wrap=True)
    cols = ["fwd ms", "bwd ms", "fwd+bwd ms [p20-p80]", f"÷ {case.time_baseline}"]
    cols += ["fwd ÷ floor", "÷ GEMM floor", "÷ floor, paired"] if floor else []
    for col in [*cols, "peak MiB"]:
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
    if floor:
        notes.append(floor_line(first))
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
            *(_fmt_ratio(r.get(f)) for f in _FLOOR_FIELDS if floor),
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
