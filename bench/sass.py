"""What a GPU would run, read without one: compile Triton kernels for an NVIDIA target and count their SASS.

Triton compiles for a target it is told (``GPUTarget("cuda", 90, 32)``) with the ptxas it ships, no GPU needed.
This module specialises a kernel the way a launch does (integers equal to 1 become constants, 16-divisible
integers and 16-byte-aligned pointers are marked so), compiles it, and reads the cubin back: registers, spills
(local memory), shared memory, and the instructions in each loop of the SASS. A loop is the span between a label
and a branch back to it; its *own* count leaves out the loops nested in it.

Counts are not times: one instruction may stall for hundreds of cycles. They are what the kernel asks of the
issue slots (each of an SM's 4 schedulers issues one warp-instruction per cycle), which is the floor of a loop
that does little arithmetic per element, as the k-NN candidate loop at small d. The GPU has the final word.

    python -m infofuse.bench.sass [--arch 80,90] [--shapes N,d,k;…]   # the k-NN kernels at the benchmark shapes
    python -m infofuse.bench.sass --check --arch 80,90                # compile, check, exit 1 on a problem
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import torch
import triton

__all__ = [
    "Case",
    "Compiled",
    "Loop",
    "check",
    "compile_kernel",
    "knn_cases",
    "merge_rounds",
    "sass_loops",
    "tile_loop",
]

_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")
_PREDICATED = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+@")


@dataclass
class Loop:
    """Instructions first..last (indices into the kernel's instruction list), with ``own`` those not in a nested
    loop; ``depth`` 0 for an outermost loop."""

    first: int
    last: int
    depth: int = 0
    own: int = 0
    shortest: int = 0  # own instructions on the shortest way round: every forward branch that skips code taken
    opcodes: dict[str, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.last - self.first + 1


@dataclass
class Compiled:
    name: str
    arch: int
    num_warps: int
    registers: int
    spill_bytes: int  # local memory per thread: spilled registers
    shared_bytes: int  # static shared memory (Triton's dynamic share is in ``dynamic_shared``)
    dynamic_shared: int
    instructions: int
    loops: list[Loop]
    sass: str


def _tool(name: str) -> str:
    return getattr(triton.knobs.nvidia, name).path


def _specialise(fn, args: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as a launch with these argument values would build them."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.backends.nvidia.compiler import CUDABackend

    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = args[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = key
        elif isinstance(key, str):
            attrs[(i,)] = CUDABackend.parse_attr(key)
    return signature, constexprs, attrs


def compile_kernel(fn, args: dict, *, arch: int = 90, num_warps: int = 4, num_stages: int = 2) -> Compiled:
    """Compile ``fn`` (a ``triton.jit`` function) for sm_``arch`` with these argument values (CPU tensors stand in
    for device ones: only their dtype and alignment matter) and read the result back."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    while not isinstance(fn, triton.runtime.JITFunction):  # through autotuners and heuristics
        fn = fn.fn
    signature, constexprs, attrs = _specialise(fn, args)
    source = ASTSource(fn, signature, constexprs, attrs)
    kernel = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    return _read_cubin(fn.__name__, arch, num_warps, kernel)


def _read_cubin(name: str, arch: int, num_warps: int, kernel) -> Compiled:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout

    def field_of(key):
        m = re.search(rf"\b{key}:(\d+)", usage)
        return int(m.group(1)) if m else 0

    ops, loops = sass_loops(sass)
    return Compiled(
        name,
        arch,
        num_warps,
        field_of("REG"),
        field_of("LOCAL"),
        field_of("SHARED"),
        int(kernel.metadata.shared),
        len(ops),
        loops,
        sass,
    )


def sass_loops(sass: str) -> tuple[list[str], list[Loop]]:
    """(opcodes in order, loops) of nvdisasm's listing; loops outermost first, each with its own opcode counts."""
    ops: list[str] = []
    labels: dict[str, int] = {}
    branches: list[tuple[str, int, bool]] = []  # (target label, at, conditional)
    for line in sass.splitlines():
        if m := _LABEL.match(line):
            labels[m.group(1)] = len(ops)
            continue
        if m := _INSTRUCTION.match(line):
            ops.append(m.group(2))
            if b := _BRANCH.search(line):
                branches.append((b.group(1), len(ops) - 1, bool(_PREDICATED.match(line))))
    jumps = {at: (labels[t], cond) for t, at, cond in branches if t in labels}
    loops = []
    for lp in sorted((Loop(to, at) for at, (to, _) in jumps.items() if to <= at), key=lambda o: (o.first, -o.last)):
        # A back edge from code laid out after a loop (a rare path placed out of line) spans part of it: not a loop.
        if not any(o.first < lp.first <= o.last < lp.last for o in loops):
            loops.append(lp)
    for lp in loops:
        lp.depth = sum(o.first <= lp.first and lp.last <= o.last and o is not lp for o in loops)
    for lp in loops:
        inner = [o for o in loops if o.depth == lp.depth + 1 and lp.first <= o.first and o.last <= lp.last]
        mine = [i for i in range(lp.first, lp.last + 1) if not any(o.first <= i <= o.last for o in inner)]
        lp.own = len(mine)
        for i in mine:
            lp.opcodes[ops[i]] = lp.opcodes.get(ops[i], 0) + 1
        lp.shortest = _shortest(lp, inner, jumps)
    return ops, loops


def _shortest(lp: Loop, inner: list[Loop], jumps: dict[int, tuple[int, bool]]) -> int:
    """Fewest own instructions from the loop's head to its back edge, a nested loop counted as nothing."""
    skip = {o.first: o.last + 1 for o in inner}
    cost = {lp.last + 1: 0}
    for i in range(lp.last, lp.first - 1, -1):
        if i in skip:
            cost[i] = cost.get(skip[i], 0)
            continue
        to, cond = jumps.get(i, (None, False))
        ahead = cost.get(i + 1, 0) if i < lp.last else 0
        if to is not None and i < to <= lp.last + 1:
            cost[i] = 1 + (min(ahead, cost[to]) if cond else cost[to])
        else:
            cost[i] = 1 + ahead
    return cost[lp.first]


# --- the k-NN kernels at the launches of triton_kernels/knn.py on the GPU ---------------------------------------


@dataclass
class Case:
    """One GPU launch of a k-NN kernel: the kernel, its argument values, and its launch options."""

    label: str
    fn: object
    args: dict
    num_warps: int
    num_stages: int
    pairs: int  # (query, candidate) pairs a tile
    screen: bool  # the screening kernel: matrix unit in the tile loop, the merge nested in it


def knn_cases(n: int, d: int, k: int) -> list[Case]:
    """The k-NN kernels as triton_kernels/knn.py launches them on the GPU, x against itself of shape (n, d): the
    screening kernel in each of its configurations, precisions and centrings, the direct search (Euclidean and
    max-norm in float32, Euclidean in float64) and the marginal counts (max-norm float32, Euclidean float64)."""
    from infofuse.triton_kernels import knn as K

    f32, f64 = torch.empty(n, d), torch.empty(n, d, dtype=torch.float64)  # never read: dtype and alignment count
    kp = K.screen_slots(k)
    strides = dict(N=n, D=d, sxb=n * d, sxn=d, sxd=1)
    pair = dict(strides, M=n, syb=n * d, syn=d, syd=1, EXCLUDE_SELF=True)
    cases = []
    x, norms, hy = f32[None], torch.empty(1, n), torch.empty(1, K.padded_candidates(n))
    out_d, out_i = torch.empty(1, n, kp), torch.empty(1, n, kp, dtype=torch.int64)
    for config in K.screen_configs(kp):
        for precision in K.SCREEN_PRECISIONS:
            for centre in (False, True):
                mu = torch.empty(1, d) if centre else None
                args = dict(K.screen_arguments(x, x, mu, norms, hy, out_d, out_i, True, precision), **config.kwargs)
                bq, bc = config.kwargs["BLOCK_Q"], config.kwargs["BLOCK_C"]
                label = (
                    f"screen {precision}{' centred' if centre else ''} {bq}x{bc}"
                    f"{' prefetch' if config.kwargs['PREFETCH'] else ''}"
                )
                cases.append(
                    Case(label, K._knn_screen_kernel, args, config.num_warps, config.num_stages, bq * bc, True)
                )
    meta = {key: v for key, v in K.DIRECT_GPU_META.items() if key != "num_warps"}
    warps, pairs = K.DIRECT_GPU_META["num_warps"], meta["BLOCK_Q"] * meta["BLOCK_C"]
    kpd = triton.next_power_of_2(k)
    for label, x, metric in (("direct", f32, 0), ("direct max-norm", f32, 1), ("direct float64", f64, 0)):
        args = dict(
            pair,
            x_ptr=x,
            y_ptr=x,
            out_d_ptr=torch.empty(n, kpd, dtype=x.dtype),
            out_i_ptr=torch.empty(n, kpd, dtype=torch.int64),
            K=k,
            KP=kpd,
            METRIC=metric,
            ACC=K._acc(x.dtype),
            **meta,
        )
        cases.append(Case(label, K._knn_direct_kernel, args, warps, 1, pairs, False))
    for label, x, metric in (("counts max-norm", f32, 1), ("counts float64", f64, 0)):
        args = dict(
            strides,
            x_ptr=x,
            r_ptr=torch.empty(n, dtype=x.dtype),
            out_ptr=torch.empty(n, dtype=torch.int64),
            METRIC=metric,
            STRICT=True,
            ACC=K._acc(x.dtype),
            **meta,
        )
        cases.append(Case(label, K._knn_count_kernel, args, warps, 1, pairs, False))
    return cases


def check(cases: list[Case], arch: int) -> list[str]:
    """What is wrong with these kernels compiled for sm_``arch``: spilled registers, or a screening kernel without
    matrix-unit instructions. Empty when all is well (a kernel that does not compile raises)."""
    mma = "HGMMA|HMMA" if arch >= 90 else "HMMA"  # sm_90: warpgroup MMA from 64-row blocks, mma.sync below
    problems = []
    for case in cases:
        c = compile_kernel(case.fn, case.args, arch=arch, num_warps=case.num_warps, num_stages=case.num_stages)
        where = f"sm_{arch} {case.label}"
        if c.spill_bytes:
            problems.append(f"{where}: {c.spill_bytes} bytes of registers spilled ({c.registers} registers)")
        if case.screen and not re.search(rf"\b({mma})\.", c.sass):
            problems.append(f"{where}: no {mma} (the matrix unit) in the screening kernel")
    return problems


def merge_rounds(n: int, d: int, kp: int, block_q: int, block_c: int, *, blocks: int = 2, seed: int = 0) -> float:
    """Mean rounds of the screening's merge loop per candidate tile, x against itself on Gaussian data (n, d).

    A round takes one entry per query, so a tile costs as many rounds as its busiest query takes entries, and a
    query takes exactly the tile's entries that are among the KP smallest seen so far. Counted here on exact
    float32 distances for ``blocks`` random blocks of queries against all n points (the screening's rounding moves
    the count by little)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    rounds = tiles = 0
    rows = torch.arange(block_q)
    for _ in range(blocks):
        r0 = int(torch.randint(0, n - block_q + 1, (1,), generator=g))
        kept = torch.full((block_q, kp), float("inf"))
        for c0 in range(0, n, block_c * 1024):
            part = torch.cdist(x[r0 : r0 + block_q], x[c0 : c0 + block_c * 1024]).square()
            own = rows + r0 - c0
            mine = (own >= 0) & (own < part.shape[1])
            part[rows[mine], own[mine]] = float("inf")  # self excluded
            for t0 in range(0, part.shape[1], block_c):
                kept, at = torch.topk(torch.cat([kept, part[:, t0 : t0 + block_c]], 1), kp, dim=1, largest=False)
                rounds += int((at >= kp).sum(1).max())
                tiles += 1
    return rounds / tiles


def main(argv=None) -> None:
    from rich.console import Console
    from rich.table import Table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="90", help="compute capabilities ×10, comma-separated (80: A100, 90: H100)")
    p.add_argument("--shapes", default="1048576,128,10;1048576,16,3", help="N,d,k;… (default: the benchmark's)")
    p.add_argument(
        "--check",
        action="store_true",
        help="only compile and check (no spills, the matrix unit in the screening kernel); exit 1 on a problem",
    )
    args = p.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    shapes = [tuple(int(v) for v in spec.split(",")) for spec in args.shapes.split(";")]
    console = Console(width=max(Console().width, 150))
    console.print(f"Triton {triton.__version__}, torch {torch.__version__}: static SASS counts, sm_{archs}")
    if args.check:
        problems = [msg for arch in archs for n, d, k in shapes for msg in check(knn_cases(n, d, k), arch)]
        for msg in problems:
            console.print(msg)
        console.print(f"{len(problems)} problems")
        raise SystemExit(1 if problems else 0)
    for arch in archs:
        for n, d, k in shapes:
            console.print(_table(arch, n, d, k, Table))
    console.print(
        "A tile loop's warp-instructions a pair: its own instructions × warps / (queries × candidates a "
        "tile); shortest: with every forward branch that skips code taken (for the screening: a tile off "
        "the diagonal with nothing to merge). A nested loop (the merge, the direct kernel's feature loop) "
        "adds its count per iteration; with merge rounds: the shortest way plus the mean merge rounds "
        "per tile (merge_rounds, Gaussian data) times the merge loop."
    )


def _table(arch: int, n: int, d: int, k: int, Table):
    table = Table(title=f"k-NN kernels on sm_{arch}, N = {n}, d = {d}, k = {k}, x against itself")
    for col in (
        "kernel",
        "warps",
        "regs",
        "spill B",
        "shared B",
        "tile loop: instr (shortest way)",
        "warp-instr / pair (shortest)",
        "nested loops: warp-instr an iteration",
        "with merge rounds: warp-instr / pair",
    ):
        table.add_column(col)
    rounds = {}
    for case in knn_cases(n, d, k):
        c = compile_kernel(case.fn, case.args, arch=arch, num_warps=case.num_warps, num_stages=case.num_stages)
        tile, nested = tile_loop(c)
        w, pairs = case.num_warps, case.pairs
        merged = "-"
        if case.screen and len(nested) == 1:
            shape = (case.args["KP"], case.args["BLOCK_Q"], case.args["BLOCK_C"])
            if shape not in rounds:
                rounds[shape] = merge_rounds(n, d, *shape)
            merged = f"{(tile.shortest + rounds[shape] * nested[0].own) * w / pairs:.3f} ({rounds[shape]:.3f} rounds)"
        table.add_row(
            case.label,
            str(w),
            str(c.registers),
            str(c.spill_bytes),
            str(c.dynamic_shared),
            f"{tile.own} ({tile.shortest})",
            f"{tile.own * w / pairs:.3f} ({tile.shortest * w / pairs:.3f})",
            ", ".join(str(lp.own * w) for lp in nested),
            merged,
        )
    return table


def tile_loop(c: Compiled) -> tuple[Loop, list[Loop]]:
    """The kernel's candidate-tile loop (its largest outermost loop) and the loops nested in it."""
    tile = max((lp for lp in c.loops if lp.depth == 0), key=lambda lp: lp.size)
    return tile, [lp for lp in c.loops if lp.depth == 1 and tile.first <= lp.first <= tile.last]


if __name__ == "__main__":
    main()
