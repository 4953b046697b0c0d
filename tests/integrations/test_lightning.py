"""commhooks.integrations.lightning on real Lightning, 2 CPU processes over gloo."""

from __future__ import annotations

import pathlib

import pytest
from _frameworks import TORCHRUN, assert_compressed, run

from commhooks.integrations.lightning import CompressedDDPStrategy, CompressedModelParallelStrategy

HERE = pathlib.Path(__file__).resolve().parent


def test_compresses_on_cpu_under_torchrun() -> None:
    stats = assert_compressed(run([*TORCHRUN, str(HERE / "_lightning_worker.py")]))
    # 6 optimizer steps, one hook step each; the first 2 dense (start_iter), sent raw.
    assert {steps for steps, _, _ in stats.values()} == {6}


@pytest.mark.parametrize("arg", ["ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper"])
def test_refuses_lightnings_own_hook_arguments(arg: str) -> None:
    with pytest.raises(ValueError, match=arg):
        CompressedDDPStrategy("sign", **{arg: None})


def test_refuses_a_bad_hook_option_or_spec_before_training() -> None:
    with pytest.raises(ValueError, match="start_iter"):
        CompressedDDPStrategy("sign", start_iter=-1)
    with pytest.raises(ValueError, match="wrapper"):
        CompressedDDPStrategy("sign", wrapper="fp8")
    with pytest.raises(ValueError):
        CompressedDDPStrategy("nosuchcompressor")


def test_state_before_fit_is_refused() -> None:
    with pytest.raises(RuntimeError, match=r"compression_state: .*fit\(\)"):
        _ = CompressedDDPStrategy("sign").compression_state


def test_fsdp2_strategy_compresses_on_cpu_under_torchrun() -> None:
    stats = assert_compressed(run([*TORCHRUN, str(HERE / "_lightning_fsdp_worker.py")]))
    assert {steps for steps, _, _ in stats.values()} == {6}


def test_fsdp2_strategy_refuses_a_bad_option_before_training() -> None:
    with pytest.raises(ValueError, match="start_iter"):
        CompressedModelParallelStrategy("uniform", start_iter=-1)
    with pytest.raises(RuntimeError, match=r"compression_state: .*fit\(\)"):
        _ = CompressedModelParallelStrategy("uniform").compression_state
