"""The PNG of an op's rows: per configuration, forward and backward time stacked (with the 20-80 % range of their
sum) beside peak memory."""

from __future__ import annotations

from pathlib import Path

from .case import Case
from .report import shape_str

__all__ = ["write_plot"]


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
        title = f"{shape_str(case, shape)} · {dtype} · {model}"
        for ax in (ax_t, ax_m):
            ax.set_xticks(list(pos), names, rotation=20, ha="right", fontsize=8)
            ax.set_title(title, fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    if rows:
        fig.suptitle(f"{case.op} on {rows[0]['device_name']} ({rows[0]['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
