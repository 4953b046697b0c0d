"""Hook state and options in one process (a world of one): validation, refused pairings,
stats logging, checkpoints; and the ``(grad, param)`` calling convention on two ranks."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from _workers import make_model, train_alone, tuple_calls
from torch import nn

import commhooks.ddp
from commhooks.comm import build_transport
from commhooks.ddp import CompressionState, HookOptions
from commhooks.engine.state import param_name


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"start_iter": -1}, "start_iter"),
        ({"transport": "ring"}, "transport"),
        ({"min_numel": 1.5}, "min_numel"),
        ({"error_feedback": "yes"}, "error_feedback"),
        ({"log_every": -2}, "log_every"),
        ({"join_timeout_s": 0}, "join_timeout_s"),
        ({"feedback": {"decay": 0.5}}, "feedback"),
    ],
)
def test_bad_options_name_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        HookOptions(**options)


@pytest.mark.parametrize(
    ("spec", "transport", "why"),
    [
        ("topk", "allreduce", "not summable"),
        ("sign", "allreduce", "not summable"),
        ("powersgd", "reducescatter", "rounds"),
        ("uniform:entropy=true", "reducescatter", "entropy"),
        ("threshold", "reducescatter", "depend on the data"),
    ],
)
def test_invalid_pairings_are_refused_when_built(
    world_of_one: None, spec: str, transport: str, why: str
) -> None:
    with pytest.raises(ValueError, match=why):
        build_transport(commhooks.compressor(spec), transport)
    with pytest.raises(ValueError, match=why):
        CompressionState(spec, transport=transport)


def test_register_refuses_what_it_cannot_use(world_of_one: None) -> None:
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        commhooks.ddp.register(make_model(), "topk")
    ddp = nn.parallel.DistributedDataParallel(make_model())
    with pytest.raises(ValueError, match="wrapper"):
        commhooks.ddp.register(ddp, "topk", wrapper="fp8")
    with pytest.raises(ValueError, match="options"):
        CompressionState("topk", options=HookOptions(), start_iter=3)
    with pytest.raises(ValueError, match="ratio"):
        commhooks.ddp.register(ddp, "topk:ratio=2")


def test_state_binds_to_the_process_group_on_first_use() -> None:
    # Lightning builds DDPStrategy(ddp_comm_state=...) before torch.distributed starts.
    state = CompressionState("topk")
    assert state.fingerprint()  # config is checked and usable without a group
    with pytest.raises(RuntimeError, match="init_process_group"):
        state.transport  # noqa: B018 - the first use needs one
    with pytest.raises(ValueError, match="transport"):
        CompressionState("topk", transport="allreduce")  # refused before any group exists


def test_stats_count_bytes_and_are_logged(world_of_one: None, caplog: Any) -> None:
    ddp = nn.parallel.DistributedDataParallel(make_model())
    state = commhooks.ddp.register(ddp, "topk:ratio=0.01", log_every=2, min_numel=0)
    with caplog.at_level(logging.INFO, logger="commhooks.metrics"):
        train_alone(ddp, 4)
    stats = state.stats()
    n = sum(p.numel() for p in ddp.parameters())
    assert stats.steps == 4 and stats.raw_bytes == 4 * 4 * n
    assert stats.last_raw_bytes == 4 * n and stats.last_wire_bytes < stats.last_raw_bytes / 5
    assert stats.ratio == stats.raw_bytes / stats.wire_bytes > 5
    assert stats.link_bytes == 0  # a world of one puts nothing on a link
    assert stats.compress_s > 0 and stats.decompress_s > 0
    logged = [r.getMessage() for r in caplog.records if "wire B" in r.getMessage()]
    assert len(logged) == 2 and logged[0].startswith("rank 0 step 2:")


def test_state_dict_round_trips_and_refuses_another_config(world_of_one: None, tmp_path) -> None:
    ddp = nn.parallel.DistributedDataParallel(make_model())
    state = commhooks.ddp.register(ddp, "powersgd:rank=2", min_numel=0)
    train_alone(ddp, 3)
    path = tmp_path / "hook.pt"
    torch.save(state.state_dict(), path)
    saved = torch.load(path, weights_only=False)
    assert "process_group" not in saved and saved["iteration"] == 3
    assert saved["feedback"]["residuals"] and saved["feedback"]["compressor"]["q"]

    fresh = CompressionState("powersgd:rank=2", model=ddp, min_numel=0)
    fresh.load_state_dict(saved)
    assert fresh.iteration == 3 and fresh.stats() == state.stats()
    for k, v in saved["feedback"]["residuals"].items():
        assert torch.equal(fresh.feedback.state_dict()["residuals"][k], v)
    other = CompressionState("powersgd:rank=1", model=ddp, min_numel=0)
    with pytest.raises(ValueError, match="another compressor"):
        other.load_state_dict(saved)


def test_grad_param_tuples_average_in_place(run_ranks) -> None:
    res = run_ranks(tuple_calls, 2)
    for rank in res:
        for step, g in enumerate(rank["grads"]):
            # ranks hold rank+step: the average is step + 0.5
            torch.testing.assert_close(g, torch.full((64, 64), step + 0.5))
        # The third call's key repeat closed the second step.
        assert rank["iteration"] == 2


@pytest.mark.parametrize(
    ("spec", "shape", "options", "pays"),
    [
        ("topk:ratio=0.01", (64, 64), {}, True),
        ("topk:ratio=1.0", (64, 64), {}, False),  # values plus indices: more than dense
        ("topk:ratio=1.0", (64, 64), {"min_ratio": 0.0}, True),
        ("powersgd:rank=4", (64, 64), {}, True),
        # P and Q would outweigh the matrix: PowerSGD sends it as it is (ratio 1), which only
        # a min_ratio above 1 moves to the dense batch.
        ("powersgd:rank=64", (64, 64), {}, True),
        ("powersgd:rank=64", (64, 64), {"min_ratio": 1.5}, False),
        ("fp16", (64, 64), {"min_ratio": 1.9}, True),
        ("fp16", (64, 64), {"min_ratio": 3.0}, False),
        ("threshold", (64, 64), {"min_ratio": 100.0}, True),  # data-dependent size: no probe
    ],
)
def test_min_ratio_decides_per_shape_from_a_probe(
    spec: str, shape: tuple[int, ...], options: dict, pays: bool
) -> None:
    state = CompressionState(spec, **options)
    before = state.compressor.state_dict()
    assert state.pays(torch.zeros(shape)) is pays
    assert state.compressor.state_dict() == before  # the probe used its own compressor


def test_bad_min_ratio_names_the_field() -> None:
    with pytest.raises(ValueError, match="min_ratio"):
        CompressionState("topk", min_ratio=-1.0)


def test_unnamed_parameters_get_one_default_name_scheme() -> None:
    from commhooks.horovod.optimizer import _names

    params = [nn.Parameter(torch.zeros(3)) for _ in range(3)]
    hvd_names = [n for n, _ in _names(torch.optim.SGD(params, lr=0.1), None)]
    state = CompressionState("topk")
    hook_names = [state.key_of(p) for p in params]
    assert (
        hvd_names
        == hook_names
        == [param_name(i) for i in range(3)]
        == ["param0", "param1", "param2"]
    )


def test_checkpoints_with_old_default_names_load(world_of_one: None) -> None:
    ddp = nn.parallel.DistributedDataParallel(make_model())
    params = list(ddp.parameters())
    old = CompressionState(
        "topk:ratio=0.1", named_parameters=[(f"param.{i}", p) for i, p in enumerate(params)],
        min_numel=0,
    )  # fmt: skip
    ddp.register_comm_hook(old, commhooks.ddp.compression_hook)
    train_alone(ddp, 2)
    saved = old.state_dict()
    residuals = saved["feedback"]["residuals"]
    assert residuals and set(residuals) <= {f"param.{i}" for i in range(len(params))}

    new = CompressionState(
        "topk:ratio=0.1", named_parameters=[(param_name(i), p) for i, p in enumerate(params)],
        min_numel=0,
    )  # fmt: skip
    new.load_state_dict(saved)
    loaded = new.feedback.state_dict()["residuals"]
    assert set(loaded) == {n.replace(".", "") for n in residuals}
    for name, residual in residuals.items():
        assert torch.equal(loaded[name.replace(".", "")], residual)
    # Names of neither scheme are still refused.
    other = CompressionState(
        "topk:ratio=0.1", named_parameters=[(f"w{i}", p) for i, p in enumerate(params)],
        min_numel=0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="saved for other parameters"):
        other.load_state_dict(saved)
