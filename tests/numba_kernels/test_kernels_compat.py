"""numba_kernels._compat: numba.cuda imports on a NumPy without ``np.row_stack``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# numba-cuda registers overload(np.row_stack) when its array module loads (lazily,
# on first use of the CUDA target); that module is the one that fails on NumPy 2.5.
_IMPORT_ARRAYOBJ = "import numba.cuda.np.arrayobj"


def _run(code: str, sim: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    if sim:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_without_shim_numba_cuda_fails_when_row_stack_is_missing():
    # the failure the shim exists for; if this starts passing, the shim can go
    r = _run(f"import numpy as np\ndel np.row_stack\nimport numba.cuda\n{_IMPORT_ARRAYOBJ}\n", sim=False)
    assert r.returncode != 0
    assert "row_stack" in r.stderr


@pytest.mark.parametrize("sim", [False, True], ids=["driver", "simulator"])
def test_import_cuda_restores_row_stack(sim):
    code = (
        "import numpy as np\n"
        "del np.row_stack\n"
        "from numba_kernels._compat import import_cuda\n"
        "cuda = import_cuda()\n"
        f"{_IMPORT_ARRAYOBJ}\n"
        "assert np.row_stack is np.vstack\n"
        "print(cuda.__name__, hasattr(cuda, 'jit'))\n"
    )
    r = _run(code, sim=sim)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["numba.cuda", "True"]


def test_import_cuda_keeps_an_existing_row_stack():
    r = _run(
        "import numpy as np\n"
        "sentinel = object()\n"
        "np.row_stack = sentinel\n"
        "from numba_kernels._compat import import_cuda\n"
        "import_cuda()\n"
        "assert np.row_stack is sentinel\n",
        sim=True,
    )
    assert r.returncode == 0, r.stderr
