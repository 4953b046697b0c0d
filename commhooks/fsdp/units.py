"""What :func:`commhooks.fsdp.register` reads from a ``fully_shard``-ed model: its FSDP units
(one per ``fully_shard`` call that holds parameters), their mesh and the layout of the
gradients FSDP2 hands its reduce-scatter and all-reduce hook, checked before anything is
registered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule

__all__ = ["Unit", "fsdp_root", "fsdp_units"]


@dataclass(frozen=True)
class Unit:
    """One FSDP unit: a module's parameter group.

    ``params``: (fully qualified name, shape of this rank's padded shard) per parameter, in
    the order FSDP2 lays their gradients out. ``mesh``: the 1-D mesh it is sharded over.
    """

    name: str
    module: FSDPModule
    group: Any  # torch's FSDPParamGroup
    params: tuple[tuple[str, torch.Size], ...]
    mesh: DeviceMesh

    @property
    def numels(self) -> list[int]:
        """Elements of each parameter's padded shard."""
        return [shape.numel() for _, shape in self.params]

    @property
    def shard_numel(self) -> int:
        """Elements of this rank's shard of the whole unit (the reduce-scatter's output)."""
        return sum(self.numels)


def fsdp_units(model: nn.Module) -> list[Unit]:
    """The FSDP units of ``model`` (a root module ``fully_shard`` was called on), outermost
    first.

    Raises:
        ValueError: ``model`` is not ``fully_shard``-ed; a module has several parameter groups
            (``shard_placement_fn`` with per-parameter meshes), which torch's reduce-scatter
            and all-reduce hooks refuse; a module is sharded over a 2-D mesh (native HSDP, whose
            dense all-reduce runs before any hook); units use different meshes; or a
            ``gradient_divide_factor`` was set (the hooks average, as FSDP2's default does).
    """
    if not isinstance(model, FSDPModule):
        raise ValueError(
            f"model: a {type(model).__name__} that is not fully_shard-ed; call "
            "torch.distributed.fsdp.fully_shard on its blocks and on the root first, then "
            "commhooks.fsdp.register on the root"
        )
    names = {id(p): n for n, p in model.named_parameters()}
    units: list[Unit] = []
    seen: set[int] = set()  # fully_shard([a, b]) gives a and b one parameter group
    for fqn, module in model.named_modules():
        if not isinstance(module, FSDPModule):
            continue
        label = fqn or "<root>"
        groups = module._get_fsdp_state()._fsdp_param_groups
        if len(groups) > 1:
            raise ValueError(
                f"model: module {label!r} has {len(groups)} FSDP parameter groups (per-parameter "
                "meshes through shard_placement_fn); torch's custom reduce-scatter and "
                "all-reduce hook take one group per module: shard it over one mesh"
            )
        if not groups or id(groups[0]) in seen:
            continue
        group = groups[0]
        seen.add(id(group))
        mesh = group.mesh_info.mesh
        if mesh.ndim != 1:
            raise ValueError(
                f"model: module {label!r} is sharded over a {mesh.ndim}-D mesh {mesh}; native "
                "HSDP all-reduces densely before any hook. Shard each module over the ranks of "
                "its node (commhooks.fsdp.node_mesh()) and let register() exchange across nodes"
            )
        if group.gradient_divide_factor is not None:
            raise ValueError(
                f"model: module {label!r} has gradient_divide_factor="
                f"{group.gradient_divide_factor}; the compressed exchange averages over ranks "
                "as FSDP2 does by default: leave set_gradient_divide_factor unset"
            )
        params = tuple(
            (names[id(fp.sharded_param)], torch.Size(fp.padded_sharded_param_size))
            for fp in group.fsdp_params
        )
        units.append(Unit(label, module, group, params, mesh))
    if not units:
        raise ValueError("model: fully_shard-ed, but no FSDP unit holds parameters")
    meshes = {tuple(u.mesh.mesh.flatten().tolist()) for u in units}
    if len(meshes) > 1:
        raise ValueError(
            f"model: units are sharded over different meshes ({sorted(meshes)}); "
            "register() needs every unit on the same mesh"
        )
    return units


def fsdp_root(module: nn.Module, where: str) -> nn.Module:
    """The outermost ``fully_shard``-ed module in ``module`` (itself, or the one submodule a
    framework's ``configure_model`` sharded as the root).

    Raises:
        ValueError: none is, or several are side by side (register each one instead).
    """
    if isinstance(module, FSDPModule):
        return module
    roots: list[str] = []
    found: list[nn.Module] = []
    for name, sub in module.named_modules():
        if isinstance(sub, FSDPModule) and not any(name.startswith(r + ".") for r in roots):
            roots.append(name)
            found.append(sub)
    if len(found) != 1:
        what = f"several ({', '.join(roots)})" if found else "none"
        raise ValueError(
            f"{where}: expected one fully_shard-ed root module in {type(module).__name__}, "
            f"found {what}; call fully_shard on the root of the model you train last"
        )
    return found[0]
