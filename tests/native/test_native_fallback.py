"""Without a working C compiler every native-capable compressor keeps its torch path. Runs
on every machine: it forces the missing compiler itself."""

from __future__ import annotations

import os
import subprocess
import sys


def test_without_a_compiler_the_torch_path_serves(tmp_path):
    """A machine without a working C compiler (CC=false, an empty cache): no library, a
    warning, and every compressor still compresses and decodes."""
    code = (
        "import torch, commhooks\n"
        "from commhooks import native\n"
        "assert native.lib() is None\n"
        "x = torch.randn(50_000)\n"
        "for spec in ('sign', 'uniform:bits=4', 'qsgd', 'ternary'):\n"
        "    c = commhooks.compressor(spec)\n"
        "    p, ctx = c.compress(x)\n"
        "    assert c.decompress(p, ctx).shape == x.shape\n"
        "print('ok')\n"
    )
    env = {**os.environ, "CC": "false", "COMMHOOKS_CACHE": str(tmp_path / "cache")}
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
    assert "native kernels unavailable" in res.stderr
