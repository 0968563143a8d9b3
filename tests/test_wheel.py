"""The wheel path, end to end: ``pip wheel .`` with build isolation (no torch in the build environment) gives a
pure-Python wheel; installed into a fresh venv that sees neither this checkout nor its ahead-of-time build, it
compiles the C++ extension at first use and every op's CPU backend matches the package's reference.

One test, a few minutes on 2 cores (most of it the compile at first use; the times are printed, ``pytest -s``).
The fresh venv gets torch the way the Makefile's does: the same version pinned exactly (``torch==2.13.0+cpu``,
which pip finds on this machine's disk and never resolves to a CUDA build), or, where the running torch is not
installed inside the running venv (a GPU machine's system torch), ``--system-site-packages``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Run by the fresh venv's python from a directory outside the checkout. Defaults everywhere (impl=None on CPU
# tensors picks the C++ backend); impl="reference" and the reference functions are the package's definitions.
SMOKE = r"""
import os, sys
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import infofuse
from infofuse import _ext

here = os.path.dirname(infofuse.__file__)
assert here.startswith(sys.prefix), (here, sys.prefix)
assert os.path.isfile(os.path.join(here, "csrc", "infofuse.cpp")), "the C++ sources are not in the wheel"
try:
    import infofuse._C
except ModuleNotFoundError:
    pass
else:
    raise AssertionError("a pure-Python wheel holds an ahead-of-time build infofuse._C")
ext_dir = os.environ["TORCH_EXTENSIONS_DIR"]
assert _ext._C is None and _ext._LOAD_ERROR is None, "import infofuse tried to build or failed"
assert not os.listdir(ext_dir), "import infofuse compiled something"

torch.manual_seed(0)
tol = dict(rtol=1e-4, atol=1e-5)


class InfofuseOps(TorchDispatchMode):
    # the infofuse ops a call dispatches (below autograd): the C++ backend's, not the Triton or reference path's

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "infofuse":
            self.names.add(func.name())
        return func(*args, **(kwargs or {}))


def check(name, ours_fn, ref_fn, inputs, spy=True):
    seen = InfofuseOps()
    if spy:  # a dispatch mode and torch.compile do not mix
        with seen:
            ours = ours_fn()
        assert seen.names, f"{name} dispatched no infofuse op"
        assert not [n for n in seen.names if any(w in n for w in ("triton", "chunked", "fused"))], seen.names
    else:
        ours = ours_fn()
    ref = ref_fn()
    if isinstance(ours, tuple):
        for o, r in zip(ours, ref):
            torch.testing.assert_close(o, r, **tol, msg=lambda m: f"{name}: {m}")
        ours, ref = ours[0], ref[0]
    else:
        torch.testing.assert_close(ours, ref, **tol, msg=lambda m: f"{name}: {m}")
    if inputs:
        g_ours = torch.autograd.grad(ours.sum(), inputs)
        g_ref = torch.autograd.grad(ref.sum(), inputs)
        for i, (a, b) in enumerate(zip(g_ours, g_ref)):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name} grad {i}: {m}")
    print("ok", name, sorted(seen.names) if spy else "(compiled)")


x = torch.randn(37, 16, requires_grad=True)
w = torch.randn(53, 16, requires_grad=True)
t = torch.randint(0, 53, (37,))
# the first use, inside torch.compile(fullgraph=True): the build runs at trace time instead of breaking the graph
compiled = torch.compile(infofuse.linear_cross_entropy, backend="eager", fullgraph=True)
check("compiled linear_cross_entropy", lambda: compiled(x, w, t),
      lambda: infofuse.linear_cross_entropy_reference(x, w, t), (x, w), spy=False)
check("linear_cross_entropy", lambda: infofuse.linear_cross_entropy(x, w, t),
      lambda: infofuse.linear_cross_entropy_reference(x, w, t), (x, w))
assert infofuse.cpp_available(), infofuse.build_info()
info = infofuse.build_info()
assert info["loaded"] and info["build"].startswith("first use"), info
assert infofuse.available_impls("cpu")[0] == "cpu", infofuse.available_impls("cpu")
print("build_info", info)

a = torch.nn.functional.normalize(torch.randn(24, 16), dim=-1).requires_grad_()
b = torch.nn.functional.normalize(torch.randn(24, 16), dim=-1).requires_grad_()
labels = torch.randint(0, 4, (24,))
for name, f in [
    ("info_nce", lambda **kw: infofuse.info_nce(a, b, scale=10.0, **kw)),
    ("clip_loss", lambda **kw: infofuse.clip_loss(a, b, 10.0, **kw)),
    ("siglip_loss", lambda **kw: infofuse.siglip_loss(a, b, 10.0, -5.0, **kw)),
    ("nt_xent", lambda **kw: infofuse.nt_xent(a, b, 0.1, **kw)),
    ("supcon_loss", lambda **kw: infofuse.supcon_loss(a, labels, 0.1, **kw)),
]:
    check(name, f, lambda f=f: f(impl="reference"), (a, b) if name != "supcon_loss" else (a,))

p = torch.randn(64, 3, requires_grad=True)
q = torch.randn(48, 3, requires_grad=True)
y = p.detach() + 0.5 * torch.randn(64, 3)
assert torch.equal(infofuse.knn(p, q, k=4)[1], infofuse.knn_reference(p, q, k=4)[1]), "knn indices"
# knn's outputs carry no gradient; the estimators below differentiate through the neighbour distances
check("knn", lambda: infofuse.knn(p, q, k=4), lambda: infofuse.knn_reference(p, q, k=4), ())
check("knn_entropy", lambda: infofuse.knn_entropy(p, k=3), lambda: infofuse.knn_entropy(p, k=3, impl="reference"),
      (p,))
check("ksg_mutual_information", lambda: infofuse.ksg_mutual_information(p.detach(), y, k=3),
      lambda: infofuse.ksg_mutual_information(p.detach(), y, k=3, impl="reference"), ())
check("knn_kl_divergence", lambda: infofuse.knn_kl_divergence(p, q, k=2),
      lambda: infofuse.knn_kl_divergence(p, q, k=2, impl="reference"), (p, q))
check("koleo_loss", lambda: infofuse.koleo_loss(p), lambda: infofuse.koleo_loss(p, impl="reference"), (p,))
print("SMOKE OK")
"""

# A second process: the cached build loads without compiling. A third: INFOFUSE_NO_JIT=1 leaves the backends off.
CACHED = r"""
import infofuse
assert infofuse.cpp_available(), infofuse.build_info()
print("CACHED OK", infofuse.build_info()["build"])
"""
NO_JIT = r"""
import torch, infofuse
assert not infofuse.cpp_available()
info = infofuse.build_info()
assert info["loaded"] is False and "INFOFUSE_NO_JIT=1" in info["error"], info
x, w, t = torch.randn(4, 8), torch.randn(5, 8), torch.randint(0, 5, (4,))
try:
    infofuse.linear_cross_entropy(x, w, t, impl="cpu")
except RuntimeError as exc:
    assert "INFOFUSE_NO_JIT=1" in str(exc), exc
else:
    raise AssertionError("impl='cpu' ran without the extension")
print("NO_JIT OK")
"""


def _run(cmd, *, cwd, env, what, timeout=1200):
    start = time.perf_counter()
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    seconds = time.perf_counter() - start
    print(f"{what}: {seconds:.1f} s")
    assert proc.returncode == 0, (
        f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n"
        f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    )
    return proc


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without what would let a child see the checkout, the running venv or a preset build."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_NO_BUILD_ISOLATION", "TORCH_EXTENSIONS_DIR")
        and not k.startswith("INFOFUSE_")
    }
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra)
    return env


def _copy_source(dest: Path) -> None:
    """What a build reads, without this checkout's build outputs (build/, *.egg-info, the ahead-of-time .so)."""
    skip = shutil.ignore_patterns("*.so", "*.o", "__pycache__", "*.egg-info", "results", "build")
    dest.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    for name in ("python", "csrc", "triton_kernels", "bench"):
        shutil.copytree(ROOT / name, dest / name, ignore=skip)


def test_pure_wheel_builds_installs_and_compiles_the_extension_at_first_use(tmp_path):
    total = time.perf_counter()
    src = tmp_path / "src"
    _copy_source(src)
    env = _clean_env()

    # 1. the wheel, built with build isolation: its build environment has setuptools and wheel, and no torch
    wheelhouse = tmp_path / "wheelhouse"
    built = _run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w", wheelhouse],
        cwd=tmp_path,
        env=env,
        what="pip wheel (build isolation)",
    )
    wheels = list(wheelhouse.glob("infofuse-*.whl"))
    assert len(wheels) == 1, (wheels, built.stderr[-3000:])
    assert wheels[0].name.endswith("-py3-none-any.whl"), f"not a pure-Python wheel: {wheels[0].name}"
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    assert not [n for n in names if n.endswith((".so", ".pyd", ".o"))], sorted(names)
    expected = [
        "infofuse/__init__.py",
        "infofuse/_ops/_library.py",
        "infofuse/triton_kernels/__init__.py",
        "infofuse/bench/__init__.py",
        "infofuse/csrc/infofuse.cpp",
    ]
    expected += [f"infofuse/csrc/{p.relative_to(ROOT / 'csrc')}" for p in (ROOT / "csrc").rglob("*") if p.is_file()]
    assert not [n for n in expected if n not in names], sorted(set(expected) - names)

    # 2. a fresh venv, outside the checkout, with torch and then the wheel (removed at the end: it is ~1 GB)
    venv = tmp_path / "venv"
    try:
        _install_and_use(tmp_path, venv, wheels[0], env)
    finally:
        shutil.rmtree(venv, ignore_errors=True)
    print(f"whole wheel test: {time.perf_counter() - total:.1f} s")


def _install_and_use(tmp_path: Path, venv: Path, wheel: Path, env: dict[str, str]) -> None:
    torch_inside = Path(torch.__file__).resolve().is_relative_to(Path(sys.prefix).resolve())
    _run(
        [sys.executable, "-m", "venv", *([] if torch_inside else ["--system-site-packages"]), venv],
        cwd=tmp_path,
        env=env,
        what="venv",
    )
    python = venv / "bin" / "python"
    if torch_inside:
        _run(
            [python, "-m", "pip", "install", "-q", f"torch=={torch.__version__}"],
            cwd=tmp_path,
            env=env,
            what=f"pip install torch=={torch.__version__}",
        )
    _run([python, "-m", "pip", "install", "-q", wheel], cwd=tmp_path, env=env, what="pip install <wheel>")

    # 3. first use compiles (the CPU sources: this test runs the CPU backend), in one process; then the cache
    run = tmp_path / "run"
    run.mkdir()
    ext_dir = tmp_path / "torch_extensions"
    ext_dir.mkdir()
    jit_env = _clean_env(TORCH_EXTENSIONS_DIR=str(ext_dir), INFOFUSE_SKIP_CUDA_BUILD="1")
    smoke = _run([python, "-c", SMOKE], cwd=run, env=jit_env, what="first use: compile + smoke test of every op")
    assert "SMOKE OK" in smoke.stdout, smoke.stdout
    compiling = [line for line in smoke.stderr.splitlines() if line.startswith("infofuse: compiling")]
    assert len(compiling) == 1 and f"for torch {torch.__version__} (first use, ~" in compiling[0], smoke.stderr
    built_dirs = [p.name for p in ext_dir.iterdir()]
    tag = torch.__version__.replace(".", "_").replace("+", "_")
    assert len(built_dirs) == 1 and f"_torch{tag}_" in built_dirs[0], built_dirs

    cached = _run([python, "-c", CACHED], cwd=run, env=jit_env, what="second process: cached build")
    assert "CACHED OK first use" in cached.stdout and "compiling" not in cached.stderr, (cached.stdout, cached.stderr)

    no_jit_env = _clean_env(TORCH_EXTENSIONS_DIR=str(tmp_path / "unused"), INFOFUSE_NO_JIT="1")
    no_jit = _run([python, "-c", NO_JIT], cwd=run, env=no_jit_env, what="INFOFUSE_NO_JIT=1")
    assert "NO_JIT OK" in no_jit.stdout and not (tmp_path / "unused").exists()
