"""What every round-based front end shares (federated rounds, DiLoCo): the pseudo-gradient
exchange through the engine, the agreement on the round number, and the outer optimizer that
applies the averaged pseudo-gradients to the global weights.

A round's pseudo-gradient is ``w_global - w_local`` per parameter. :func:`start_round`
queues its average over the state's ranks, with the state's compressor, error feedback and
transport, as one engine step (:class:`~commhooks.engine.step.Step`) on the communication
worker, and :class:`InFlight` closes that step when the result is needed. :func:`agree_round`
first checks, in one small all-gather, that every rank is at the same round with the same
options, and :class:`OuterStep` keeps the global weights (fp32) and steps them with any torch
optimizer, the averaged pseudo-gradient as the gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.futures import Future

from commhooks.engine.state import CompressionState
from commhooks.engine.step import Step, StepReport
from commhooks.feedback import all_finite

__all__ = [
    "InFlight",
    "OuterSpec",
    "OuterStep",
    "agree_round",
    "average_round",
    "outer_description",
    "start_round",
]

#: what an ``outer_optimizer`` argument may be: None (the front end's default), an optimizer
#: built over the model's parameters, or a factory called with the global weights
OuterSpec = torch.optim.Optimizer | Callable[[list[Tensor]], torch.optim.Optimizer] | None


class InFlight:
    """A round's exchange, queued on the state's communication worker as an open engine
    step; :meth:`result` waits for it and closes the step.

    Args:
        step: the open step.
        future: the future of its means.
    """

    def __init__(self, step: Step, future: Future[list[Tensor]]) -> None:
        self.step = step
        self.future = future
        self._result: tuple[list[Tensor] | None, StepReport] | None = None

    def result(self) -> tuple[list[Tensor] | None, StepReport]:
        """The means (None where some rank's input or the average was not finite: then
        every rank gets None, and the step's error-feedback changes are rolled back) and the
        step's report (bytes, times, ``nonfinite``). Waits the first time; a failed exchange
        rolls the step back and raises."""
        if self._result is None:
            try:
                means = self.future.wait()
            except Exception:
                self.step.state.worker.drain()
                self.step.abort()
                raise
            # The average is the same on every rank, so every rank decides alike.
            finite = all(all_finite(m) for m in means)
            if not finite:
                self.step.mark_nonfinite()
            self._result = (means if finite else None, self.step.close())
        return self._result


def start_round(
    state: CompressionState,
    keys: Sequence[str],
    tensors: Sequence[Tensor],
    *,
    memory: bool = True,
) -> InFlight:
    """Queue the mean over the state's ranks of ``tensors`` (one fp32 tensor per key, keying
    error feedback) as one engine step. ``memory=False`` sends without this rank's error
    feedback, which stays as it was (a federated client left out of the round)."""
    step = state.begin()
    return InFlight(step, step.submit(keys, tensors, last=True, memory=memory))


def average_round(
    state: CompressionState,
    keys: Sequence[str],
    tensors: Sequence[Tensor],
    *,
    memory: bool = True,
) -> tuple[list[Tensor] | None, StepReport]:
    """:func:`start_round` and wait: see :meth:`InFlight.result`."""
    return start_round(state, keys, tensors, memory=memory).result()


def agree_round(
    state: CompressionState, round_: int, front_end: str, extra: str, device: torch.device
) -> None:
    """Check, in one all-gather of two integers on the state's communication worker (after
    the exchanges queued so far), that every rank of the state is at round ``round_`` with the
    same compressor, hook options and front-end options (``extra``).

    Raises:
        RuntimeError: on every rank alike, naming the ranks' rounds, or saying that the ranks
            disagree on the options.
    """
    state.worker.run(lambda: _agree(state, round_, front_end, extra, device), device)


def _agree(
    state: CompressionState, round_: int, front_end: str, extra: str, device: torch.device
) -> None:
    fp = int(state.fingerprint(extra), 16) - (1 << 63)
    mine = torch.tensor([fp, round_], dtype=torch.int64, device=device)
    everyone = state.comm.all_gather(mine).view(-1, 2).tolist()
    if len({f for f, _ in everyone}) > 1:
        raise RuntimeError(
            f"commhooks: ranks disagree on {front_end}'s options or its compressor (rank "
            f"{state.rank} uses {state.compressor.config.spec()!r} with {extra}); every rank "
            "must build the same one"
        )
    rounds = [r for _, r in everyone]
    if len(set(rounds)) > 1:
        where = ", ".join(f"rank {i} at round {r}" for i, r in enumerate(rounds))
        raise RuntimeError(
            f"commhooks: {front_end}: ranks are at different rounds ({where}); a rank skipped "
            "or repeated a round, or resumed from another checkpoint than the others"
        )


def outer_description(opt: torch.optim.Optimizer) -> str:
    """The optimizer's class and hyperparameters (for the cross-rank agreement)."""
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return f"{type(opt).__name__}{hyper!r}"


class OuterStep:
    """The global weights (fp32 copies of the model's parameters) and the outer optimizer
    that steps them, the averaged pseudo-gradient as the gradient.

    Args:
        params: the model's parameters, in the front end's order.
        outer: None (then ``default`` builds it), a torch optimizer built over ``params``
            (it is pointed at the global weights instead, before any step), or a factory
            called with the list of global weights (``functools.partial(torch.optim.SGD,
            lr=0.7, momentum=0.9, nesterov=True)``, or an optimizer class).
        default: the factory used when ``outer`` is None.
        device: where the global weights and the optimizer state live.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        outer: OuterSpec,
        default: Callable[[list[Tensor]], torch.optim.Optimizer],
        device: torch.device,
    ) -> None:
        pin = device.type == "cpu" and any(p.is_cuda for p in params)
        self.weights: list[Tensor] = []
        for p in params:
            w = torch.empty(p.shape, dtype=torch.float32, device=device, pin_memory=pin)
            w.copy_(p.detach())
            self.weights.append(nn.Parameter(w, requires_grad=True))
        self.optimizer = self._build(outer, default, params)

    def _build(
        self,
        outer: OuterSpec,
        default: Callable[[list[Tensor]], torch.optim.Optimizer],
        params: Sequence[Tensor],
    ) -> torch.optim.Optimizer:
        if outer is None:
            return default(self.weights)
        if isinstance(outer, torch.optim.Optimizer):
            if outer.state:
                raise ValueError(
                    "outer_optimizer: it has already stepped; give a fresh optimizer over the "
                    "model's parameters, or a factory"
                )
            index = {id(p): i for i, p in enumerate(params)}
            for group in outer.param_groups:
                unknown = [p for p in group["params"] if id(p) not in index]
                if unknown:
                    raise ValueError(
                        f"outer_optimizer: holds {len(unknown)} tensor(s) that are not the "
                        "model's trainable parameters; build it over model.parameters()"
                    )
                group["params"] = [self.weights[index[id(p)]] for p in group["params"]]
            return outer
        if not callable(outer):
            raise ValueError(
                f"outer_optimizer={type(outer).__name__}: must be a torch optimizer or a "
                "factory that builds one from a list of tensors"
            )
        try:
            opt = outer(self.weights)
        except TypeError as e:
            raise ValueError(
                f"outer_optimizer: calling it with the global weights failed ({e}); give a "
                "torch optimizer or a factory that takes the list of tensors"
            ) from e
        if not isinstance(opt, torch.optim.Optimizer):
            raise ValueError(
                f"outer_optimizer: the factory returned a {type(opt).__name__}, not a "
                "torch.optim.Optimizer"
            )
        return opt

    def set_weights(self, indices: Sequence[int], values: Sequence[Tensor]) -> None:
        """Overwrite the global weights ``indices`` with ``values``."""
        with torch.no_grad():
            for i, v in zip(indices, values):
                self.weights[i].copy_(v)

    def step(self, indices: Sequence[int], deltas: Sequence[Tensor]) -> None:
        """One outer step on the global weights ``indices``, ``deltas`` (the averaged
        pseudo-gradients) as their gradients; the other weights and their optimizer state are
        left alone (a torch optimizer skips tensors without a gradient)."""
        for w in self.weights:
            w.grad = None
        for i, d in zip(indices, deltas):
            w = self.weights[i]
            w.grad = d.to(device=w.device, dtype=w.dtype).view(w.shape)
        self.optimizer.step()
        for w in self.weights:
            w.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": [w.detach().clone() for w in self.weights],
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["weights"]
        if len(saved) != len(self.weights) or any(
            s.shape != w.shape for s, w in zip(saved, self.weights)
        ):
            raise ValueError("state: its global weights do not match this model's parameters")
        self.set_weights(range(len(saved)), saved)
        self.optimizer.load_state_dict(state["optimizer"])
