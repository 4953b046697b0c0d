"""commhooks.integrations.lightning on real Lightning, 2 CPU processes over gloo."""

from __future__ import annotations

import pathlib

import pytest
import torch
from _frameworks import assert_compressed, on_ranks

from commhooks.integrations.lightning import CompressedDDPStrategy, CompressedModelParallelStrategy

HERE = pathlib.Path(__file__).resolve().parent


def test_compresses_on_two_cpu_ranks() -> None:
    stats = assert_compressed(on_ranks(HERE / "_lightning_worker.py"))
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


def test_fsdp2_strategy_compresses_on_two_cpu_ranks() -> None:
    stats = assert_compressed(on_ranks(HERE / "_lightning_fsdp_worker.py"))
    assert {steps for steps, _, _ in stats.values()} == {6}


def test_fsdp2_strategy_refuses_a_bad_option_before_training() -> None:
    with pytest.raises(ValueError, match="start_iter"):
        CompressedModelParallelStrategy("uniform", start_iter=-1)
    with pytest.raises(RuntimeError, match=r"compression_state: .*fit\(\)"):
        _ = CompressedModelParallelStrategy("uniform").compression_state


def test_a_resumed_fit_keeps_the_hook_state_bit_for_bit(tmp_path: pathlib.Path) -> None:
    """ModelCheckpoint at step 10 of 20 writes each rank's hook state beside the checkpoint;
    fit(ckpt_path=...) from it to step 20 ends with the parameters of the straight run, bit
    for bit, and the hook's step counter and stats carried on (PowerSGD's Q, error feedback
    and start_iter's count). Without the side files the resume warns, naming what restarts
    from zero, and lands elsewhere."""
    on_ranks(HERE / "_lightning_resume_worker.py", str(tmp_path), timeout=600)
    for rank in range(2):
        res = torch.load(tmp_path / f"result{rank}.pt", weights_only=False)
        straight, resumed, bare = res["straight"], res["resumed"], res["bare"]
        assert "epoch=0-step=10.ckpt.commhooks-rank1.pt" in res["sides"]
        for a, b in zip(straight["params"], resumed["params"]):
            assert torch.equal(a, b)
        assert resumed["iteration"] == straight["iteration"] == 20
        for field in ("steps", "raw_bytes", "wire_bytes"):
            assert getattr(resumed["stats"], field) == getattr(straight["stats"], field)
        assert resumed["warnings"] == []
        assert 0 < resumed["stats"].wire_bytes < resumed["stats"].raw_bytes
        assert bare["iteration"] == 10
        assert not all(torch.equal(a, b) for a, b in zip(straight["params"], bare["params"]))
        assert any("restart from zero" in w and "step counter" in w for w in bare["warnings"])


def test_a_resumed_fsdp2_fit_keeps_the_compression_state_bit_for_bit(
    tmp_path: pathlib.Path,
) -> None:
    """The FSDP2 strategy's distributed checkpoint at step 10 of 20 gets each rank's
    compression state beside it (error feedback of 4-bit codes); fit(ckpt_path=...) from it
    ends with the straight run's parameters, bit for bit, and its step counter and stats.
    Without the side files the resume warns and lands elsewhere."""
    on_ranks(HERE / "_lightning_fsdp_resume_worker.py", str(tmp_path), timeout=600)
    for rank in range(2):
        res = torch.load(tmp_path / f"result{rank}.pt", weights_only=False)
        straight, resumed, bare = res["straight"], res["resumed"], res["bare"]
        assert f"epoch=0-step=10.ckpt.commhooks-rank{rank}.pt" in res["sides"]
        assert straight["feedback_bytes"] > 0
        for a, b in zip(straight["params"], resumed["params"]):
            assert torch.equal(a, b)
        assert resumed["iteration"] == straight["iteration"] == 20
        for field in ("steps", "raw_bytes", "wire_bytes"):
            assert getattr(resumed["stats"], field) == getattr(straight["stats"], field)
        assert resumed["warnings"] == []
        assert 0 < resumed["stats"].wire_bytes < resumed["stats"].raw_bytes
        assert bare["iteration"] == 10
        assert not all(torch.equal(a, b) for a, b in zip(straight["params"], bare["params"]))
        assert any("restart from zero" in w for w in bare["warnings"])
