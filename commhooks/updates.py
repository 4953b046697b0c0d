"""Update compression: each rank runs its optimizer on its own gradients, and the parameter
updates, not the gradients, are averaged through a compressor with error feedback.

Adaptive optimizers (Adam, AdamW, Adagrad) divide each element by a running RMS of what
they are given. Fed compressed gradients, they divide by the RMS of the compression noise
too: error feedback's released residuals and sign or sparse spikes inflate the second moment,
and the step shrinks where the gradient is small (``docs/convergence.md`` measures it). Fed
the rank's own dense gradients, their statistics stay those of plain training; what is
compressed is the update, whose elements Adam has already put on one scale, so a sign, a
quantizer or a low-rank fit loses less of it. Error feedback keeps what each rank's update
lost for its next step, as 1-bit Adam does for its momentum.

Each rank keeps its own optimizer state (moments of its own gradients); the parameters stay
identical on every rank, since every rank applies the same averaged update.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from commhooks.compressors.base import Compressor, CompressorConfig
from commhooks.engine.average import goes_dense
from commhooks.engine.state import CommStats, CompressionState
from commhooks.feedback import FeedbackConfig
from commhooks.registry import compressor as build_compressor

__all__ = [
    "SPARSE_WARMUP", "UpdateCompression", "check_owned", "compress_updates_of", "update_options",
]  # fmt: skip

#: The error-feedback options update compression gives a compressor with a kept ``ratio``
#: (top-k, DGC, random-k) when none are passed: a sparsity warm-up whose kept share falls
#: exponentially from 50% to the compressor's own ratio over the first 30 steps
#: (``docs/convergence.md`` measures it against longer, gentler ones).
SPARSE_WARMUP = FeedbackConfig(warmup_steps=30, warmup_ratio=0.5)


class UpdateCompression(torch.optim.Optimizer):
    """Methods grafted onto a subclass of the user's optimizer class, so the result is still
    an instance of that class for schedulers and checkpoints (see :func:`compress_updates_of`).
    """

    _uc: CompressionState
    _uc_sent: list[Tensor]  # the parameters whose updates are averaged
    _uc_keys: list[str]  # their error-feedback names
    _uc_small: bool  # small tensors' gradients arrive averaged: their updates are not sent
    _uc_hooked: set[int] | None  # ids of the parameters whose gradients DDP's hook sees (None: all)
    # GradScaler then calls step() on every rank, with ``grad_scale`` and ``found_inf`` set,
    # instead of skipping it on the ranks that overflowed.
    _step_supports_amp_scaling = True

    def step(self, closure: Any = None) -> Any:
        """Take the optimizer's step on this rank's gradients, then replace each parameter's
        change by its average over ranks, sent through the compressor with error feedback.

        Under a GradScaler, the ranks first agree on whether any of them overflowed (one
        small all-reduce): if so, every rank skips the step, as plain DDP's averaged
        gradients make them do; else the gradients are unscaled here and the step taken."""
        found = getattr(self, "found_inf", None)
        if found is not None:
            scale = getattr(self, "grad_scale", None)
            if self._uc_any_overflowed(found):
                # Counted as a skipped step, with the small gradients' traffic the DDP hook
                # recorded in it; nothing was exchanged, so nothing is committed.
                step = self._uc.current()
                step.mark_nonfinite()
                step.close()
                return None
            self.grad_scale = self.found_inf = None  # the base step must not unscale again
            try:
                if scale is not None:
                    self._uc_unscale(scale)
                return self._uc_step(closure)
            finally:
                self.grad_scale, self.found_inf = scale, found
        return self._uc_step(closure)

    def _uc_any_overflowed(self, found: Tensor) -> bool:
        """Whether any rank's GradScaler found an inf or NaN this step (the same answer on
        every rank)."""
        comm = self._uc.bind()
        flag = found.detach().reshape(1).to(torch.float32).clone()
        self._uc.worker.run(lambda: comm.all_reduce(flag), flag.device)
        return bool(flag.item() > 0)

    def _uc_unscale(self, scale: Tensor) -> None:
        inv = scale.double().reciprocal().float()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(inv.to(p.grad.device))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group as the optimizer does; its parameters' updates are averaged too (those
        outside DDP's module, or frozen when it was built, whatever their size: DDP averages
        none of their gradients)."""
        super().add_param_group(param_group)
        if hasattr(self, "_uc_sent"):  # not while the base class builds its first groups
            new = [p for p in self.param_groups[-1]["params"] if p.requires_grad]
            sent = [p for p in new if self._uc_sends(p)]
            self._uc_sent.extend(sent)
            self._uc_keys.extend(self._uc.key_of(p) for p in sent)

    def _uc_sends(self, p: Tensor) -> bool:
        """Whether ``p``'s update is sent (not a small tensor whose gradient DDP averaged)."""
        hooked = self._uc_hooked is None or id(p) in self._uc_hooked
        return not (self._uc_small and hooked and goes_dense(self._uc, p))

    def _uc_step(self, closure: Any) -> Any:
        params = self._uc_sent
        before = [p.detach().clone() for p in params]
        loss = super().step(closure)  # type: ignore[misc]  # a closure may need autograd
        with torch.no_grad():
            # The step the DDP hook opened for the small tensors' gradients, if it did.
            step = self._uc.current()
            # No parameter left to send (all small, their gradients averaged by the hook):
            # the step still closes, so the step counter follows the optimizer's.
            if params:
                deltas = [p - b for p, b in zip(params, before)]
                means = step.average(self._uc_keys, deltas, last=True)
                for p, b, d in zip(params, before, means):
                    torch.add(b, d, out=p)
            step.close()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's own state (this rank's moments) and the compression state."""
        out = super().state_dict()  # type: ignore[misc]
        out["commhooks"] = self._uc.state_dict()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("commhooks", None)
        super().load_state_dict(state_dict)  # type: ignore[misc]
        if saved is not None:
            self._uc.load_state_dict(saved)

    @property
    def compression_state(self) -> CompressionState:
        return self._uc

    def stats(self) -> CommStats:
        """Bytes and time of the update exchanges so far (see :class:`CommStats`)."""
        return self._uc.stats()


def update_options(
    compressor: str | CompressorConfig | Compressor[Any], options: dict[str, Any]
) -> tuple[Compressor[Any], dict[str, Any]]:
    """The compressor and hook options update compression runs with: ``options`` as given,
    plus ``feedback=SPARSE_WARMUP`` where the compressor keeps a ``ratio`` under 50% (top-k,
    DGC, random-k) and neither ``feedback`` nor ``options`` was passed.

    Adam puts its updates on one scale per element, so a 1% sparsifier sends each element
    about once in a hundred steps, a burst of what error feedback held; early in training,
    when the loss falls fastest, that delay costs most. The warm-up sends more then. Pass
    ``feedback=commhooks.FeedbackConfig()`` for none, or your own ``warmup_steps``."""
    built = build_compressor(compressor)
    options = dict(options)
    if (
        hasattr(built.config, "ratio")
        and "feedback" not in options
        and "options" not in options
        and built.config.ratio < SPARSE_WARMUP.warmup_ratio
    ):
        options["feedback"] = SPARSE_WARMUP
    return built, options


def compress_updates_of(
    optimizer: torch.optim.Optimizer,
    state: CompressionState,
    *,
    small_averaged: bool = False,
    module: nn.Module | None = None,
) -> Any:
    """Make ``optimizer`` (in place, and return it) average its updates over ranks through
    ``state`` after each step. Its parameters must be identical on every rank, and its
    gradients the rank's own (not averaged). Every option of ``state`` applies to the updates:
    ``start_iter`` dense steps first, small and 1-D tensors dense, error feedback.

    ``small_averaged``: the gradients of the tensors the engine sends dense (small, 1-D; see
    :func:`~commhooks.engine.average.goes_dense`) arrive already averaged over ranks, so their
    updates are the same everywhere and are not sent again.

    ``module``: the model whose gradients DDP's hook sees; the optimizer must own every one of
    its trainable parameters, since no other exchange averages them.

    Raises:
        ValueError: the optimizer is already wrapped, or misses some of ``module``'s trainable
            parameters (named; raised on every rank, before any collective).
    """
    if isinstance(optimizer, UpdateCompression):
        raise ValueError("optimizer: its updates are already compressed")
    hooked = None
    if module is not None:
        check_owned(optimizer, module)
        hooked = {id(p) for p in module.parameters() if p.requires_grad}
    cls = type(optimizer)
    optimizer.__class__ = type(f"UpdateCompressed{cls.__name__}", (UpdateCompression, cls), {})
    uc: Any = optimizer
    uc._uc = state
    uc._uc_small = small_averaged
    uc._uc_hooked = hooked
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    uc._uc_sent = [p for p in params if uc._uc_sends(p)]
    uc._uc_keys = [state.key_of(p) for p in uc._uc_sent]
    return optimizer


def check_owned(optimizer: torch.optim.Optimizer, module: nn.Module) -> None:
    """Refuse an optimizer that does not own every trainable parameter of ``module`` (a
    ValueError naming the first few it misses)."""
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in owned]
    if missing:
        names = ", ".join(missing[:8]) + (
            f", ... ({len(missing)} in all)" if len(missing) > 8 else ""
        )
        raise ValueError(
            f"optimizer: does not own the model's trainable parameters {names}; under update "
            "compression no exchange averages their gradients, so the replicas would drift "
            "apart. Build the optimizer over every trainable parameter (param groups for other "
            "settings), or freeze those (requires_grad=False) before wrapping"
        )
