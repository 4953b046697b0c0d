"""The shared-scale symmetric-code kernels' own checks (their numbers are compared with the
torch path in tests/compressors/test_shared_scale.py, their bytes across CPU levels and
threads in test_native_build.py)."""

from __future__ import annotations

import pytest
import torch

from commhooks import native


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.float32], ids=str)
def test_codes_of_a_width_the_kernels_would_misread_are_refused(dtype: torch.dtype) -> None:
    # Checked before the library is loaded, so this holds without a compiler too.
    codes = torch.zeros(10, dtype=dtype)
    with pytest.raises(ValueError, match="int8, int16 or int32"):
        native.symm_decode(codes, 4, torch.ones(3), 1.0, torch.empty(10))
