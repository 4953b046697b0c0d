"""``commhooks.fsdp.register``: compression on a ``fully_shard``-ed model in one line."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from commhooks.comm.collectives import TorchCollectives
from commhooks.comm.transport import ReduceScatterTransport, transport_class
from commhooks.compressors.base import Compressor, CompressorConfig
from commhooks.engine import CompressionState, HookOptions
from commhooks.fsdp.hooks import CompressedReduceScatter, all_reduce_hook
from commhooks.fsdp.mesh import HIERARCHICAL, Layout, resolve
from commhooks.fsdp.state import FSDPCompression
from commhooks.fsdp.units import Unit, fsdp_units
from commhooks.registry import compressor as build_compressor

__all__ = ["register"]


def register(
    model: torch.nn.Module,
    compressor: str | CompressorConfig | Compressor[Any],
    **options: Any,
) -> FSDPCompression:
    """Compress the gradient exchange of ``model`` (the root module, after ``fully_shard`` on
    it and its blocks) and return the state (stats, checkpoints).

    Every rank must call it at the same point: it creates process groups.

    Args:
        model: the root FSDP module.
        compressor: a spec string (``"uniform:bits=8"``), config or compressor.
        **options: fields of :class:`~commhooks.engine.HookOptions`. ``topology``:
            ``"auto"`` (the default) picks the mode from the mesh: ``"hierarchical"`` where
            the model is sharded over one node's ranks (:func:`commhooks.fsdp.node_mesh`),
            ``"flat"`` (the reduce-scatter mode) where it is sharded over every rank.
            ``transport``: between nodes in the hierarchical mode; in the reduce-scatter mode
            ``"auto"`` takes the compressed reduce-scatter (each destination's chunk
            compressed once and sent in one all-to-all) for static-size single-round codecs,
            all-reduce for PowerSGD, all-gather for codecs whose size depends on the data.
            ``coalesce`` and ``fallback`` (DDP buckets) do not apply.

    Tuning: the hierarchical mode is the one to use across nodes: error feedback costs 1/L of
    the model per rank and only the inter-node link carries compressed bytes. The
    reduce-scatter mode suits one node over a slow fabric; with error-feedback codecs it keeps
    a residual of the whole gradient per rank (see docs/fsdp.md), so prefer casts or unbiased
    codecs there.

    Raises:
        ValueError: the model is not ``fully_shard``-ed, has several parameter groups per
            module, a 2-D mesh, a custom gradient divide factor, a mesh that does not fit
            ``topology``; or an option is invalid or does not apply.
    """
    opts = HookOptions(**options)
    if opts.coalesce:
        raise ValueError("coalesce=True: holds DDP buckets; FSDP2 exchanges one unit at a time")
    if opts.fallback != "off":
        raise ValueError(f"fallback={opts.fallback!r}: times DDP buckets; not under FSDP2")
    if opts.nonfinite_check == "device":
        raise ValueError(
            "nonfinite_check='device': under FSDP2 a skipped step is agreed on the host (one "
            "flag per step), so every rank of a node skips it alike; leave it 'auto' or 'host'"
        )
    units = fsdp_units(model)
    codec = build_compressor(compressor)
    transport_class(codec, opts.transport)  # a pairing that cannot work raises now
    layout = resolve(units[0].mesh, opts.topology, opts.ranks_per_node)
    transport = opts.transport
    if layout.mode != HIERARCHICAL and transport == "auto":
        transport = _scatter_transport(codec)
    # Host checks: the step's overflow verdict must reach every rank of the node (and every
    # chunk's owner), which a device-side count kept per rank would not.
    engine_opts = dataclasses.replace(
        opts, topology="flat", ranks_per_node=0, transport=transport, nonfinite_check="host"
    )
    keys = {u.name: _keys(u, layout) for u in units}
    if layout.nodes is not None:
        cross = layout.nodes.cross
        assert isinstance(cross, TorchCollectives)
        group = cross.group
    else:
        group = units[0].mesh.get_group()
    engine = CompressionState(codec, options=engine_opts, process_group=group)
    engine.bind()
    state = FSDPCompression(engine, layout, units, keys)
    for unit in units:
        # Unused parameters then send zeros, so every unit's layout is the same each step.
        unit.module.set_reduce_scatter_unused_params(True, recurse=False)
        if layout.mode == HIERARCHICAL:
            unit.module.set_all_reduce_hook(all_reduce_hook(state, unit))
        else:
            unit.module.set_custom_reduce_scatter(CompressedReduceScatter(state, unit))
    return state


def _scatter_transport(codec: Compressor[Any]) -> str:
    """The reduce-scatter mode's ``transport="auto"``: the compressed reduce-scatter wherever
    the codec allows it (static size, one round: each destination's chunk compressed once,
    one all-to-all, ``(n-1)/n`` of the compressed gradient on each rank's link, no
    all-gather); else all-reduce for summable payloads (PowerSGD) and all-gather for codecs
    whose size depends on the data, which average whole gradients and keep the chunk."""
    try:
        ReduceScatterTransport.check(codec)
    except ValueError:
        return "allreduce" if codec.capabilities.summable else "allgather"
    return "reducescatter"


def _keys(unit: Unit, layout: Layout) -> list[str]:
    """Per parameter of ``unit``, the engine's key: ``"<name>/<shard>"`` for this rank's
    shard (hierarchical), the parameter's name for its whole gradient (reduce-scatter)."""
    if layout.mode == HIERARCHICAL:
        shard = unit.mesh.get_local_rank()
        return [f"{name}/{shard}" for name, _ in unit.params]
    return [name for name, _ in unit.params]
