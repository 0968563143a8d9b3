"""The code style checks of the project (ruff on Python, clang-format on csrc/) pass on the tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY_PATHS = ["python", "bench", "tests", "triton_kernels", "setup.py"]


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is not installed (it is in the 'test' extras)"
    return found


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)


def test_ruff_check_and_format():
    ruff = _tool("ruff")
    for cmd in ([ruff, "check", *PY_PATHS], [ruff, "format", "--check", *PY_PATHS]):
        result = _run(*cmd)
        assert result.returncode == 0, f"{' '.join(cmd[1:3])} failed:\n{result.stdout}{result.stderr}"


def test_clang_format():
    sources = sorted(
        str(p.relative_to(ROOT)) for ext in ("cpp", "h", "cuh", "cu") for p in ROOT.glob(f"csrc/**/*.{ext}")
    )
    assert sources, "no C++ sources found under csrc/"
    result = _run(_tool("clang-format"), "--dry-run", "-Werror", *sources)
    assert result.returncode == 0, f"clang-format would change:\n{result.stderr[:4000]}"
