"""The state :func:`commhooks.fsdp.register` returns: the engine's
:class:`~commhooks.engine.CompressionState` over the exchange's group, one step per backward,
stats and checkpoints.

A step opens on the first exchange of a backward and closes when the last FSDP unit's
gradients are exchanged. FSDP2 runs its own end-of-backward callback (which reduces the units
autograd did not reach) from the autograd engine's final callbacks, queued when backward
starts; the first exchange of a step queues another final callback, which autograd runs after
FSDP2's, so it sees every unit's exchange. Should a backward end without it (a
``post_backward`` called by hand), the step closes when a unit is exchanged again, as
:meth:`CompressionState.begin_tensor` does.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from commhooks.engine import CommStats, CompressionState, Step
from commhooks.fsdp.mesh import Layout
from commhooks.fsdp.units import Unit

__all__ = ["FSDPCompression"]

logger = logging.getLogger(__name__)


class FSDPCompression:
    """Compression of an FSDP2 model's gradient exchange; built by
    :func:`commhooks.fsdp.register`.

    Attributes:
        engine: the :class:`~commhooks.engine.CompressionState` (over the cross-node group in
            the hierarchical mode, over every rank in the reduce-scatter mode).
        layout: the mode and its groups.
        units: the FSDP units, outermost first.
    """

    def __init__(
        self,
        engine: CompressionState,
        layout: Layout,
        units: list[Unit],
        keys: dict[str, list[str]],
    ) -> None:
        self.engine = engine
        self.layout = layout
        self.units = units
        #: per unit, the engine's keys of its parameters (one error-feedback memory each)
        self.keys = keys
        self._step: Step | None = None
        self._seen: set[str] = set()
        self._device = torch.device("cpu")

    @property
    def mode(self) -> str:
        """``"hierarchical"`` or ``"reducescatter"``."""
        return self.layout.mode

    # -- called from FSDP2's hooks ------------------------------------------------------------

    def exchange(self, unit: Unit, tensors: list[Tensor], scatter: bool = False) -> list[Tensor]:
        """The means over the engine's ranks of ``tensors`` (a unit's gradients, one per
        parameter), exchanged in this backward's step; with ``scatter``, this rank's chunk of
        each (flat), as :meth:`Step.submit` cuts them."""
        if self._step is not None and unit.name in self._seen:
            self.close()  # the last step's backward ended without its callback
        if self._step is None:
            self._step = self.engine.begin()
            try:
                torch.autograd.Variable._execution_engine.queue_callback(self.close)
            except RuntimeError:
                logger.debug("commhooks.fsdp: exchange outside backward; step closes later")
        self._seen.add(unit.name)
        self._device = tensors[0].device
        step = self._step
        try:
            return step.average(self.keys[unit.name], tensors, scatter=scatter)
        except Exception:
            self._step = None
            self._seen.clear()
            raise

    def close(self) -> None:
        """Close the open step: agree across every rank on whether any had non-finite
        gradients, then commit error feedback, or roll it back and put a NaN into every
        rank's gradients so that every rank skips the step alike."""
        step, self._step = self._step, None
        self._seen.clear()
        if step is None or step.closed:
            return
        bad = torch.tensor([1.0 if step.nonfinite else 0.0], device=self._device)
        if self.layout.nodes is not None:
            # The engine agreed across nodes; the node's other shards may have overflowed.
            self.layout.nodes.local.all_reduce(bad)
        if bad.item():
            step.mark_nonfinite()
            self._mark_grads()
        step.close()

    def _mark_grads(self) -> None:
        with torch.no_grad():
            for unit in self.units:
                for fp in unit.group.fsdp_params:
                    grad = fp.sharded_param.grad
                    if grad is None:
                        continue
                    local = grad.to_local() if hasattr(grad, "to_local") else grad
                    if local.numel():
                        local.view(-1)[:1].fill_(float("nan"))

    # -- public ---------------------------------------------------------------------------------

    def stats(self) -> CommStats:
        """Cumulative bytes and times, as the DDP hook's: ``raw_bytes`` (what FSDP2's dense
        exchange would have been handed), ``wire_bytes``, ``link_bytes`` (in the hierarchical
        mode: between nodes only), per-step ``last_*`` fields, ``nonfinite_steps``."""
        return self.engine.stats()

    def feedback_bytes(self) -> int:
        """Bytes of error-feedback memory this rank holds (residuals and momenta, every
        memory of the engine's)."""
        total = 0
        for memory in self.engine.memories():
            saved = memory.state_dict()
            for group in ("residuals", "momenta"):
                total += sum(t.numel() * t.element_size() for t in saved[group].values())
        return total

    def state_dict(self) -> dict[str, Any]:
        """``{"layout": ..., "rank<r>": this rank's engine state, serialized}``.

        Each rank's entry has its own key and is one opaque value, so that
        ``torch.distributed.checkpoint`` saves every rank's shard of the error feedback next to
        the model's sharded state and loads it back whole, whatever the fresh state's own
        ``state_dict()`` (the template ``dcp.load`` fills) holds yet.
        """
        buf = io.BytesIO()
        torch.save(self.engine.state_dict(), buf)
        return {"layout": self.layout.name, _rank_key(): buf.getvalue()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved (through ``torch.distributed.checkpoint`` or
        ``torch.save``).

        Raises:
            ValueError: the state was saved under another mesh or mode (names both), or holds
                no entry for this rank.
        """
        saved = state.get("layout")
        if saved != self.layout.name:
            raise ValueError(
                f"state: saved under {saved!r}, this job runs {self.layout.name!r}; the error "
                "feedback is kept per shard and cannot be re-split: resume on the same mesh"
            )
        key = _rank_key()
        if key not in state:
            raise ValueError(f"state: no entry {key!r}; load the checkpoint this mesh saved")
        mine = state[key]
        if isinstance(mine, bytes):
            mine = torch.load(io.BytesIO(mine), weights_only=False)
        self._step = None
        self._seen.clear()
        self.engine.load_state_dict(mine)


def _rank_key() -> str:
    return f"rank{dist.get_rank()}"
