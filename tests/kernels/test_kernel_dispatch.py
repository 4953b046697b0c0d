"""The one dispatch point: which backend serves which tensors, and its switches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import commhooks
from commhooks import native
from commhooks.kernels import backend_for, backend_for_device, mode


def test_cpu_tensors_get_the_c_kernels() -> None:
    backend = backend_for(torch.zeros(native.MIN_NUMEL), op="sign")
    assert backend is not None and backend.name == "native"
    assert backend_for(torch.zeros(10), op="sign") is None  # too small to pay for the call
    assert backend_for(torch.zeros(native.MIN_NUMEL, dtype=torch.float64), op="sign") is None
    assert backend_for_device(torch.device("cpu"), "sparse-feedback") is None  # C has its own


def test_torch_mode_turns_every_kernel_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMHOOKS_KERNELS", "torch")
    assert backend_for(torch.zeros(native.MIN_NUMEL), op="sign") is None
    c = commhooks.compressor("uniform:bits=4")
    assert c.kernels is not None and c.kernels.backend(torch.zeros(native.MIN_NUMEL)) is None


def test_a_wrong_mode_says_what_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMHOOKS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="expected auto, torch or triton"):
        mode()


def test_configs_the_kernels_do_not_implement_have_none() -> None:
    x = torch.zeros(native.MIN_NUMEL)
    for spec in ("sign:entropy=true", "uniform:bits=3", "uniform:shared_scale=true",
                 "ternary:mode=threshold", "adaptive:stochastic=true"):  # fmt: skip
        c = commhooks.compressor(spec)
        assert c.kernels is not None and c.kernels.backend(x) is None, spec


def test_the_package_imports_without_triton() -> None:
    """Triton is imported only when a device backend is first asked for."""
    code = "import sys, commhooks, commhooks.kernels; assert 'triton' not in sys.modules"
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def test_triton_on_cpu_after_triton_was_imported_says_to_set_the_interpreter() -> None:
    """The interpreter cannot be switched on once triton.language is imported (Lightning and
    torch.compile import it): a clear error instead of Triton's "outside of a kernel"."""
    code = (
        "import triton.language, torch\n"
        "from commhooks.kernels import backend_for\n"
        "try:\n"
        "    backend_for(torch.zeros(8), op='sign')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["COMMHOOKS_KERNELS"] = "triton"
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
    )
    assert "set TRITON_INTERPRET=1 before the process starts" in res.stdout, res.stderr[-4000:]
