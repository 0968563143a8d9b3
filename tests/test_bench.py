"""The benchmark harness, run for real on a tiny shape, and its input builders."""

from __future__ import annotations

import datetime as dt
import json
import math

import pytest
import torch

from infofuse.bench import case_names, get_case
from infofuse.bench.cli import main as bench_main
from infofuse.bench.cli import parse_options
from infofuse.bench.linear_cross_entropy import make_inputs
from infofuse.bench.planning import plan_peers

# ------------------------------------------------------------------------------------------------ input builders


def test_gaussian_logits_have_std_4_and_uniform_targets():
    n, d, v = 2048, 256, 512
    x, w, t = make_inputs((n, d, v), "gaussian", seed=1)
    assert x.shape == (n, d) and w.shape == (v, d) and t.shape == (n,)
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) < v
    std = (x @ w.T).std().item()
    assert abs(std - 4.0) < 0.15, std
    # uniform targets: every class has some hits, none dominates
    counts = torch.bincount(t, minlength=v)
    assert counts.max().item() < 20
    for tensor in (x, w):
        assert tensor.count_nonzero().item() == tensor.numel()


def test_lm_logits_prior_context_and_targets():
    n, d, v = 4096, 128, 1000
    x, w, t = make_inputs((n, d, v), "lm", seed=2)
    assert torch.all(x[:, 0] == 1)
    prior = -1.5 * torch.log1p(torch.arange(v, dtype=torch.float32))
    torch.testing.assert_close(w[:, 0], prior)
    context_std = (x[:, 1:] @ w[:, 1:].T).std().item()
    assert abs(context_std - 2.0) < 0.1, context_std
    assert int(t.min()) >= 0 and int(t.max()) < v
    # targets follow p_j ∝ (1+j)^-1.5: about 44 % are class 0 at V = 1000
    p0 = 1.0 / (torch.arange(1, v + 1, dtype=torch.float64) ** -1.5).sum().item()
    frac0 = (t == 0).double().mean().item()
    assert abs(frac0 - p0) < 0.03, (frac0, p0)
    assert t.unique().numel() > 50  # not degenerate
    assert x.count_nonzero() > 0 and w.count_nonzero() > 0


def test_inputs_are_seeded_and_cast():
    a = make_inputs((64, 32, 100), "gaussian", seed=3)
    b = make_inputs((64, 32, 100), "gaussian", seed=3)
    c = make_inputs((64, 32, 100), "gaussian", seed=4)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], c[0])
    x16, w16, t16 = make_inputs((64, 32, 100), "lm", dtype=torch.bfloat16, seed=3)
    assert x16.dtype == w16.dtype == torch.bfloat16 and t16.dtype == torch.int64
    with pytest.raises(ValueError, match="unknown logit model"):
        make_inputs((4, 4, 4), "uniform")


def test_case_inputs_require_grad():
    case = get_case("linear_cross_entropy")
    inputs = case.make_inputs((16, 8, 32), "gaussian", torch.float32, "cpu", 0)
    assert [t.requires_grad for t in inputs.leaves] == [True, True]
    assert len(inputs.leaves) == len(case.grad_labels)


# ------------------------------------------------------------------------------------------------ planning and CLI


def test_registry_and_cpu_peer_plan():
    assert "linear_cross_entropy" in case_names()
    with pytest.raises(KeyError):
        get_case("no_such_op")
    case = get_case("linear_cross_entropy")
    peers, skipped = plan_peers(case, "cpu", torch.float32, ["infofuse", "eager", "cce", "liger"])
    names = [p.name for p in peers]
    assert "eager" in names
    assert "infofuse" in names or "infofuse-reference" in names
    assert skipped["cce"] == "GPU only" and skipped["liger"] == "GPU only"


def test_knn_gpu_peers_leave_the_cpu_libraries_out():
    """On a GPU the k-NN benchmark runs infofuse's two backends beside chunked cdist + topk; scikit-learn, NPEET
    and faiss-cpu would search on the CPU, so they are skipped, not timed as GPU peers."""
    peers = {p.name: p for p in get_case("knn_entropy").peers("cuda", torch.float32)}
    assert {"infofuse-triton", "infofuse-cuda", "torch-chunked"} <= set(peers)
    assert all(peers[name].skip and "CPU only" in peers[name].skip for name in ("sklearn", "npeet", "faiss"))
    on_cpu = {p.name: p for p in get_case("knn_entropy").peers("cpu", torch.float32)}
    assert all("CPU only" not in (on_cpu[name].skip or "") for name in ("sklearn", "npeet", "faiss"))


def test_a_peer_limited_to_some_models_is_skipped_on_the_others():
    from infofuse.bench.case import Peer
    from infofuse.bench.planning import peers_for_model

    anywhere, maxnorm = Peer("a", lambda: None), Peer("b", lambda: None, models=("chebyshev",))
    peers, skipped = peers_for_model([anywhere, maxnorm], {"c": "GPU only"}, "euclidean")
    assert [p.name for p in peers] == ["a"] and skipped == {"c": "GPU only", "b": "runs on chebyshev inputs only"}
    peers, skipped = peers_for_model([anywhere, maxnorm], {}, "chebyshev")
    assert [p.name for p in peers] == ["a", "b"] and skipped == {}


def test_cli_rejects_unknown_names():
    with pytest.raises(SystemExit):
        parse_options(["--peers", "eager,nonesuch", "--device", "cpu"])
    with pytest.raises(SystemExit):
        parse_options(["--op", "nonesuch", "--device", "cpu"])
    opts = parse_options(["--quick", "--device", "cpu", "--shape", "32,16,64", "--shape", "8,8,8"])
    assert opts.shapes == [(32, 16, 64), (8, 8, 8)] and opts.reps == 2


def test_main_module_help(capsys):
    from infofuse.__main__ import main

    assert main(["--help"]) == 0
    assert "bench" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2


# ------------------------------------------------------------------------------------------------ a real run

_PEERS = ["infofuse", "infofuse-reference", "eager"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    argv = ["--quick", "--device", "cpu", "--op", "linear_cross_entropy", "--peers", ",".join(_PEERS)]
    argv += ["--models", "gaussian,lm", "--shape", "128,32,512", "--out", str(out)]
    assert bench_main(argv) == 0
    return out, json.loads((out / "results.json").read_text())


def _finite_positive(v) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v > 0


def test_quick_run_rows(quick_run):
    _, rows = quick_run
    ran = [r for r in rows if r["status"] == "ok"]
    # every requested peer runs on CPU (infofuse falls back to its reference if the C++ extension is missing)
    assert sorted((r["model"], r["peer"]) for r in ran) == sorted((m, p) for m in ("gaussian", "lm") for p in _PEERS)
    for r in ran:
        assert r["op"] == "linear_cross_entropy" and r["device"] == "cpu" and r["device_name"]
        assert r["torch"] == torch.__version__ and r["python"] and r["infofuse"]
        assert r["shape"] == {"N": 128, "D": 32, "V": 512}
        assert r["dtype"] == "float32" and r["reduction"] == "mean" and r["ref_dtype"] == "float64"
        dt.datetime.fromisoformat(r["date"])
        for key in ("fwd_ms", "bwd_ms", "both_ms"):
            q = r[key]
            assert all(_finite_positive(q[k]) for k in ("median", "p20", "p80")), (key, q)
            assert q["p20"] <= q["median"] <= q["p80"]
        assert r["peak_mb"] is not None and math.isfinite(r["peak_mb"]), r
        assert r["both_ratio_to"] == "eager" and _finite_positive(r["both_ratio"])
        assert set(r["grad_rel_err"]) == {"dX", "dW"}
        # every peer here computes in float32: close to the float64 truth
        assert r["loss_rel_err"] < 1e-5, r
        assert r["grad_rel_err"]["dX"] < 1e-4 and r["grad_rel_err"]["dW"] < 1e-4, r
    for r in ran:
        if r["peer"] in ("eager", "infofuse-reference"):
            # they materialise the N×V float32 logits (256 KiB) and their gradient
            assert r["peak_mb"] > 0.2, r
    eager = {r["model"]: r for r in ran if r["peer"] == "eager"}
    assert eager["gaussian"]["both_ratio"] == 1.0
    assert eager["gaussian"]["loss_rel_err"] < 1e-6


def test_quick_run_appends_and_plots(quick_run, tmp_path):
    out, rows = quick_run
    png = out / "linear_cross_entropy.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    # results.json is a list that a second run appends to
    from infofuse.bench.report import write_json

    copy = tmp_path / "results.json"
    copy.write_text(json.dumps(rows))
    write_json(copy, rows[:1])
    assert len(json.loads(copy.read_text())) == len(rows) + 1


def test_reference_out_of_memory_leaves_out_the_accuracy_columns(monkeypatch, tmp_path, capsys):
    """A ground truth too large for the device is reported and skipped; the timings still come out."""
    from infofuse.bench.linear_cross_entropy import CASE

    def oom(inputs, dtype):
        raise torch.OutOfMemoryError("planted")

    monkeypatch.setattr(CASE, "reference", oom)
    argv = ["--quick", "--device", "cpu", "--op", "linear_cross_entropy", "--peers", "eager", "--no-memory"]
    assert bench_main([*argv, "--shape", "64,16,128", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["status"] for r in rows] == ["ok"] and rows[0]["ref_dtype"] is None and "grad_rel_err" not in rows[0]
    assert _finite_positive(rows[0]["both_ms"]["median"])
    assert "does not fit in memory" in capsys.readouterr().out


def test_quick_run_rows_carry_the_gemm_floor(quick_run):
    """Each row records the GEMM rate measured in the run and its time ÷ the 3-GEMM (forward: 1-GEMM) floor."""
    _, rows = quick_run
    for r in (r for r in rows if r["status"] == "ok"):
        assert _finite_positive(r["gemm_gflops"]) and r["gemm_gflops"] == max(
            r["gemm_gflops_before"], r["gemm_gflops_after"]
        )
        assert r["floor_gemms"] == {"fwd": 1, "both": 3} and r["floor_flops_both"] == 3 * 2 * 128 * 512 * 32
        assert math.isclose(r["floor_ms_both"], r["floor_flops_both"] / (r["gemm_gflops"] * 1e9) * 1e3)
        assert math.isclose(r["both_floor_ratio"], r["both_ms"]["median"] / r["floor_ms_both"])
        assert math.isclose(r["fwd_floor_ratio"], r["fwd_ms"]["median"] / r["floor_ms_fwd"])
        assert _finite_positive(r["gemm_gflops_paired"]) and _finite_positive(r["both_floor_ratio_paired"])


# ------------------------------------------------------------------------------------------------ GEMM floor


def test_gemm_floors_of_the_three_ops():
    """Linear cross-entropy: 3 GEMMs of 2·N·V·D forward + backward, 1 forward; symmetric CLIP: 3 (1) of 2·N·M·D;
    k-NN: brute force's distance GEMM 2·N²·d both ways, none for the max-norm (no GEMM form)."""
    lce = get_case("linear_cross_entropy").floor_gemms((4096, 512, 32768), "gaussian")
    assert lce.gemm == (4096, 32768, 512)
    assert lce.flops("fwd") == 2 * 4096 * 32768 * 512 and lce.flops("both") == 3 * 2 * 4096 * 32768 * 512
    nce = get_case("info_nce").floor_gemms((8192, 256), "clip")
    assert nce.flops("fwd") == 2 * 8192 * 8192 * 256 and nce.flops("both") == 3 * 2 * 8192 * 8192 * 256
    knn = get_case("knn_entropy")
    euclid = knn.floor_gemms((100000, 16, 3), "euclidean")
    assert euclid.flops("fwd") == euclid.flops("both") == 2 * 100000**2 * 16 and "tree" in euclid.what
    assert knn.floor_gemms((100000, 16, 3), "chebyshev") is None


def test_floor_fields_and_ratios():
    from infofuse.bench.floor import GemmFloor, add_floor_ratios, floor_fields, gemm_flops, rate_shape

    assert gemm_flops(3, 5, 7) == 210
    assert rate_shape(4096, 32768, 512) == (2048, 8192, 512) and rate_shape(100, 200, 16) == (100, 200, 16)
    floor = GemmFloor((1000, 2000, 500), fwd=1, both=3)
    fields = floor_fields(floor, (100.0, 125.0))  # GFLOP/s before and after the timing: the better one counts
    assert fields["gemm_gflops"] == 125.0 and fields["gemm_rate_shape"] == [1000, 2000, 500]
    assert math.isclose(fields["floor_ms_fwd"], 2e9 / 125e9 * 1e3) and math.isclose(fields["floor_ms_both"], 48.0)
    rows = [
        {"fwd_ms": {"median": 32.0}, "both_ms": {"median": 60.0}, **fields},
        {"fwd_ms": None, "both_ms": None, **fields},  # a failed peer
        {"fwd_ms": {"median": 1.0}, "both_ms": {"median": 2.0}, **floor_fields(None, None)},  # no GEMM floor
    ]
    add_floor_ratios(rows)
    assert math.isclose(rows[0]["fwd_floor_ratio"], 2.0) and math.isclose(rows[0]["both_floor_ratio"], 1.25)
    assert rows[1]["both_floor_ratio"] is None and rows[2]["both_floor_ratio"] is None


def test_paired_ratio_takes_each_step_at_its_own_rate():
    """A step of t ms beside a GEMM run at r GFLOP/s is t·r·1e6 FLOPs' worth of GEMM time; the paired ratio is the
    median over the steps of that ÷ the floor's FLOPs, so a machine slowed for one step does not move it."""
    from infofuse.bench.floor import GemmFloor, paired_fields

    floor = GemmFloor((1000, 1000, 500), fwd=1, both=3)  # 1 and 3 GFLOP
    # three steps of 3 GFLOP's worth each at their own rates (the second at half speed), one skewed at the end
    samples = {"fwd": [10.0, 20.0, 10.0, 30.0], "both": [30.0, 60.0, 30.0, 90.0], "gemm": [100.0, 50.0, 100.0, 100.0]}
    got = paired_fields(floor, samples)
    assert got["gemm_gflops_paired"] == 100.0
    assert math.isclose(got["both_floor_ratio_paired"], 1.0) and math.isclose(got["fwd_floor_ratio_paired"], 1.0)
    assert paired_fields(None, samples)["both_floor_ratio_paired"] is None
    assert paired_fields(floor, {**samples, "gemm": []})["both_floor_ratio_paired"] is None


def test_measured_gemm_rate_is_a_rate():
    from infofuse.bench.floor import GemmProbe, measure_gemm_rate

    rate = measure_gemm_rate((64, 128, 32), torch.float32, "cpu", runs=2)
    assert _finite_positive(rate) and rate < 1e5  # GFLOP/s: below 100 TFLOP/s on any CPU
    probe = GemmProbe((64, 128, 32), torch.float32, "cpu")
    assert probe.flops == 2 * 64 * 128 * 32 and _finite_positive(probe())


# ------------------------------------------------------------------------------------------------ k-NN screening model


def test_knn_screening_model_tiers_add_up_and_agree_with_brute_force():
    """The CPU model of the Triton search's tiers (bench/knn_screening.py) on small samples of every data model: each
    sampled query ends in one tier, the certified answers are brute force's, offset data is screened centred and
    tight clusters need the second tier, where the search's probe would start them."""
    from infofuse.bench.knn_screening import MODELS, tier_fractions

    for name, make in MODELS.items():
        f = tier_fractions(make(3000, 128, torch.Generator().manual_seed(5)).float(), 5, queries=96, chunk=32)
        assert f["wrong"] == 0, (name, f)
        assert abs(f["tf32"] + f["tf32x3"] + f["direct"] - 1) < 1e-12, (name, f)
        assert f["centred"] == (name in ("offset", "cone")), (name, f)
        assert f["first"] == ("tf32x3" if name == "clusters" else "tf32"), (name, f)
        if name == "clusters":
            assert f["tf32"] < 0.5 < f["tf32x3"], f


# ------------------------------------------------------------------------------------------------ SASS reader

_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/              @!P0 BRA `(.L_x_1) ;
        /*0030*/                   FSEL R3, R3, +INF , P1 ;
        /*0040*/                   FSEL R5, R5, +INF , P1 ;
.L_x_1:
        /*0050*/                   FMNMX R6, R2, R3, PT ;
.L_x_2:
        /*0060*/                   SHFL.BFLY PT, R7, R6, 0x1, 0x1f ;
        /*0070*/               @P2 BRA `(.L_x_2) ;
        /*0080*/                   ISETP.GE.AND P3, PT, R8, R9, PT ;
        /*0090*/               @P3 BRA `(.L_x_0) ;
        /*00a0*/                   EXIT ;
.L_x_3:
        /*00b0*/                   IADD3 R1, R1, 0x1, RZ ;
        /*00c0*/                   BRA `(.L_x_1) ;
"""


def test_sass_loops_nesting_shortest_way_and_out_of_line_code():
    """An outer loop (instructions 1-9) with a skippable span (3-4) and a nested loop (6-7); code laid out after the
    loop that branches back into it (11-12) is not a loop."""
    from infofuse.bench.sass import sass_loops

    ops, loops = sass_loops(_SASS)
    assert ops[0] == "MOV" and ops[-1] == "BRA" and len(ops) == 13
    assert [(lp.first, lp.last, lp.depth) for lp in loops] == [(1, 9, 0), (6, 7, 1)]
    outer, inner = loops
    assert outer.own == 7 and outer.opcodes == {"LDG": 1, "BRA": 2, "FSEL": 2, "FMNMX": 1, "ISETP": 1}
    assert outer.shortest == 5  # LDG, the branch that skips the FSELs, FMNMX, ISETP, the back edge
    assert inner.own == inner.shortest == 2


def test_merge_rounds_count_the_merge_loop():
    """merge_rounds' count (a tile costs the most entries any query takes from it) equals a literal run of the
    screening kernel's merge: rounds of one entry per query while some query's best tile entry beats its worst."""
    from infofuse.bench.sass import merge_rounds

    n, d, kp, bq, bc = 300, 3, 4, 16, 8
    got = merge_rounds(n, d, kp, bq, bc, blocks=3, seed=5)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, d, generator=g)
    rounds = tiles = 0
    for _ in range(3):
        r0 = int(torch.randint(0, n - bq + 1, (1,), generator=g))
        dist = torch.cdist(x[r0 : r0 + bq], x).square()
        dist[torch.arange(bq), torch.arange(bq) + r0] = float("inf")
        kept = torch.full((bq, kp), float("inf"))
        for c0 in range(0, n, bc):
            t = dist[:, c0 : c0 + bc].clone()
            while bool((t.min(1).values < kept.max(1).values).any()):
                c_min, c_arg = t.min(1)
                worst, w_slot = kept.max(1)
                take = c_min < worst
                kept[take, w_slot[take]] = c_min[take]
                t[torch.arange(bq), c_arg] = float("inf")
                rounds += 1
            tiles += 1
    assert math.isclose(got, rounds / tiles, rel_tol=0, abs_tol=1e-12), (got, rounds / tiles)
    assert rounds > tiles / 4  # the case does exercise the merge
