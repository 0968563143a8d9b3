"""The k-NN Triton kernels compiled for the GPUs they are written for, on a machine without one.

Triton compiles for a target it is told, with the ptxas in its wheel; the interpreter tests check what the kernels
compute, these check that the GPU build of the same source goes through: sm_90 (H100/H200, where the screening's
dot is a warpgroup MMA) with one feature block and KP = 32 and 64, sm_80 (A100) with the feature loop (d above
128), every screening configuration, precision and centring, the direct search and the counts. A kernel that
fails to compile, spills registers, or screens without the matrix unit fails the test (``infofuse.bench.sass
--check``). Run in fresh processes because the test session's kernels are the interpreter's."""

import os
import subprocess
import sys

import pytest


def _ptxas_missing() -> str | None:
    try:
        import triton

        path = triton.knobs.nvidia.ptxas.path
    except Exception as exc:  # an older Triton, or no NVIDIA backend in this wheel
        return f"Triton cannot name its ptxas here: {exc!r}"
    return None if path and os.path.exists(path) else f"no ptxas at {path!r}"


@pytest.mark.skipif(_ptxas_missing() is not None, reason=str(_ptxas_missing()))
def test_knn_kernels_compile_for_sm80_and_sm90():
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    runs = [("90", "4099,128,10;4099,48,18"), ("80", "4099,200,5")]  # KP = 32 (autotuned), 64 (one block), 16
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "infofuse.bench.sass", "--check", "--arch", arch, "--shapes", shape],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for arch, shape in runs
    ]
    for (arch, shape), proc in zip(runs, procs, strict=True):
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"sm_{arch} at N,d,k = {shape}:\n{out}"
        assert "0 problems" in out
