"""The compressor contract: what every compressor declares, puts on the wire and keeps locally.

A compressor is pure tensor code. ``compress`` turns a tensor into a *payload* (the tensors that
go on the wire, nothing else) and a :class:`Context` that stays on this rank. ``decompress``
turns a payload back into a dense tensor of the input's shape and dtype.

One rule makes every transport possible: **a context never holds rank-private data**. It holds
the shape, dtype and device, plus whatever every rank derives identically (shared-seed indices,
agreed scales). So any rank's context decodes any rank's payload, which is what an all-gather
transport does.

Summable compressors also offer :meth:`Compressor.exchange`, a small state machine that a
transport drives round by round: it asks for a :class:`Message`, reduces it across ranks with the
message's op, and feeds the result back. Single-round compressors get that for free; multi-round
ones (PowerSGD, shared-scale integer quantization) implement it.
"""

from __future__ import annotations

import contextlib
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor

from commhooks.payload import Context, Kind, Message, Payload, ReduceOp

if TYPE_CHECKING:
    from commhooks.kernels.codec import FusedCodec

__all__ = [
    "Capabilities",
    "Compressor",
    "CompressorConfig",
    "Context",
    "Exchange",
    "Kind",
    "Message",
    "Payload",
    "ReduceOp",
    "SingleRoundExchange",
    "check_group",
    "check_tensor",
    "compute_dtype",
    "payload_nbytes",
    "poison",
    "shared_generator",
    "sum_buffer",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Capabilities:
    """What a transport may do with a compressor's payloads, checked when the transport is built.

    Args:
        kind: the family (sparse, quantizer, low-rank, cast, pipeline).
        summable: ``exchange`` is available: payloads can be all-reduced (summed) and the reduced
            payload decodes to the sum of the ranks' decoded tensors.
        static_size: for a given input shape and step, every rank's payload has the same byte
            size, so an all-gather needs no size exchange first.
        unbiased: ``E[decompress(compress(x))] == x``.
        rounds: the most collectives ``exchange`` issues for a group of tensors (fewer where a
            group needs fewer, e.g. PowerSGD with nothing to compress; all ranks agree).
        stateful: keeps per-key state across steps (warm starts, running statistics), so callers
            should pass stable keys.
        passthrough: the payload is the input tensor itself (lossless, no state): without
            error feedback, an all-reduce of the gradients in place is the whole exchange, and
            the engine runs it so, with no packing or copying back (``identity``).
    """

    kind: Kind
    summable: bool
    static_size: bool
    unbiased: bool
    rounds: int = 1
    stateful: bool = False
    passthrough: bool = False


class Exchange(ABC):
    """A group of tensors travelling through a summable compressor, one round at a time.

    A transport loops ``while (m := ex.message()) is not None: ex.receive(reduce(m))`` and then
    reads ``result()`` (the sum over ranks, decompressed) and ``local()`` (this rank's own
    decompressed contribution, which error feedback subtracts to form the residual).
    """

    #: whether a fused error-feedback exchange may read device values on the host to keep
    #: a non-finite tensor's residual as it was; off when the engine undoes a step that any
    #: rank overflowed on the device instead (``nonfinite_check="device"``)
    host_checks: bool = True

    @abstractmethod
    def message(self) -> Message | None:
        """The current round's message, or None once every round is done."""

    @abstractmethod
    def receive(self, reduced: Sequence[Tensor]) -> None:
        """Feed back the reduced tensors of the current round's message."""

    @abstractmethod
    def result(self) -> list[Tensor]:
        """Sum over ranks of the decompressed tensors, one per input, in the input's shape.

        In ``compute_dtype`` of the input (fp32, or fp64), like :meth:`Compressor.aggregate`:
        the transport divides by the world size and casts back.
        """

    @abstractmethod
    def local(self) -> list[Tensor]:
        """This rank's own decompressed contribution, one per input, in its shape and dtype."""

    def result_into(self, outs: Sequence[Tensor], divisor: float) -> None:
        """Write ``result()[i] / divisor`` into ``outs[i]`` (in its dtype): the transport's
        mean, straight into the caller's memory, instead of :meth:`result` (the sums may be
        divided in place). ``outs`` may be the input tensors: every input is read before any
        is written. Fused exchanges decode into ``outs`` directly."""
        for o, r in zip(outs, self.result()):
            o.copy_(r.div_(divisor))

    def abandon(self) -> None:
        """The transport stops before the last round (a rank had non-finite gradients): drop
        whatever :meth:`result` would have committed. Plain exchanges hold nothing."""
        return


def sum_buffer(ctx: Context, out: Tensor | None = None) -> Tensor:
    """Where :meth:`Compressor.aggregate` sums: ``out`` zeroed, or new zeros of ``ctx``'s
    shape in its compute dtype."""
    if out is not None:
        return out.zero_()
    return torch.zeros(ctx.shape, dtype=compute_dtype(ctx.dtype), device=ctx.device)


@dataclass(frozen=True)
class CompressorConfig:
    """Base of every compressor's frozen config. Subclasses validate in ``__post_init__``."""

    name: ClassVar[str] = ""

    def spec(self) -> str:
        """The spec string that rebuilds this config with :func:`commhooks.compressor`."""
        args = ",".join(f"{f.name}={_spec_value(getattr(self, f.name))}" for f in fields(self))
        return f"{self.name}:{args}" if args else self.name


def _spec_value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


C = TypeVar("C", bound=CompressorConfig)


def payload_nbytes(payload: Sequence[Tensor]) -> int:
    """Exact bytes a payload puts on the wire."""
    return sum(t.numel() * t.element_size() for t in payload)


def shared_generator(
    seed: int, key: str | None, step: int, device: torch.device
) -> torch.Generator:
    """A generator that every rank builds identically from (seed, key, step).

    Deriving it per call, rather than advancing one stream, keeps ranks in agreement even when
    they compress tensors in different orders.
    """
    mix = zlib.crc32(f"{seed}:{key}:{step}".encode())
    g = torch.Generator(device=device)
    g.manual_seed(mix)
    return g


class Compressor(ABC, Generic[C]):
    """Base of every compressor. Subclasses implement ``_compress`` / ``_decompress``.

    The base class validates input dtypes, short-circuits empty tensors, builds the
    :class:`Context` and restores shape and dtype on the way back, so subclasses see only
    non-empty floating tensors.
    """

    config: C
    #: whether its hot loops have native kernels (``commhooks.native``), which the engine
    #: builds when it is set up rather than in the first training step
    uses_native_kernels: ClassVar[bool] = True
    #: fused kernels attached by composition (:class:`~commhooks.kernels.codec.FusedCodec`),
    #: tried before the torch code of ``_compress``/``_decompress`` (and by error feedback's
    #: fused path, :mod:`commhooks.feedback`); None: torch only
    kernels: FusedCodec | None = None

    def __init__(self, config: C) -> None:
        self.config = config
        self._seed = int(getattr(config, "seed", 0))
        self._draws: dict[str | None, int] = {}
        self._steps: dict[str | None, int] = {}
        self._active: str | None = None

    # -- what subclasses provide ------------------------------------------------------------

    @property
    @abstractmethod
    def capabilities(self) -> Capabilities: ...

    @abstractmethod
    def _compress(self, tensor: Tensor, key: str | None) -> tuple[Payload, Any]:
        """Compress a non-empty floating tensor; return the payload and ``Context.extra``."""

    @abstractmethod
    def _decompress(self, payload: Payload, ctx: Context) -> Tensor:
        """Decode to a tensor with ``ctx.numel`` elements (any shape, any float dtype)."""

    # -- the public contract ------------------------------------------------------------------

    def compress(self, tensor: Tensor, key: str | None = None) -> tuple[Payload, Context]:
        """Compress ``tensor``; ``key`` is a stable name, needed by stateful compressors."""
        check_tensor(tensor)
        if tensor.numel() == 0:
            return (), Context(tensor.shape, tensor.dtype, tensor.device)
        with self.working_on(key):
            fast = None if self.kernels is None else self.kernels.compress(tensor)
            payload, extra = (fast, None) if fast is not None else self._compress(tensor, key)
        return payload, Context(tensor.shape, tensor.dtype, tensor.device, extra)

    @contextlib.contextmanager
    def working_on(self, key: str | None) -> Iterator[None]:
        """Within it, :meth:`generator` and per-key state default to ``key`` (the tensor
        being compressed; nested calls restore the outer key)."""
        outer, self._active = self._active, key
        try:
            yield
        finally:
            self._active = outer

    def subtract_sent_(self, target: Tensor, payload: Payload, ctx: Context) -> Tensor:
        """``target -= decompress(payload)`` in place (error feedback's new residual).
        Sparsifiers override it to touch only the elements they sent."""
        return target.sub_(self.decompress(payload, ctx).reshape(target.shape).to(target.dtype))

    def decompress(self, payload: Payload, ctx: Context) -> Tensor:
        """Decode a payload (this rank's or any other's) to a dense tensor."""
        if ctx.numel == 0:
            return torch.empty(ctx.shape, dtype=ctx.dtype, device=ctx.device)
        payload = tuple(payload)
        fast = None if self.kernels is None else self.kernels.decompress(payload, ctx)
        out = fast if fast is not None else self._decompress(payload, ctx)
        return out.reshape(ctx.shape).to(ctx.dtype)

    def aggregate(
        self, payloads: Sequence[Payload], ctx: Context, out: Tensor | None = None
    ) -> Tensor:
        """Decode every rank's payload and return their sum (the transport divides for a mean).

        The sum is in ``compute_dtype(ctx.dtype)`` (fp32, or fp64): n half-precision gradients
        can sum past fp16's range where their mean fits. Override for aggregation rules that are
        not a plain sum (majority vote). Return new memory or ``out``: the transports divide it
        in place.

        Args:
            payloads: every rank's payload.
            ctx: the context of this rank's.
            out: where the sum may be written (contiguous, ``ctx``'s shape, the compute
                dtype), saving a buffer and a copy: the caller's own memory, which it no
                longer reads; an override may ignore it and return new memory.
        """
        if self.kernels is not None and ctx.numel:
            fast = self.kernels.aggregate(payloads, ctx, out)
            if fast is not None:
                return fast
        acc = sum_buffer(ctx, out)
        if ctx.numel == 0:
            return acc
        for p in payloads:
            acc.add_(self.decompress(p, ctx))
        return acc

    def exchange(
        self,
        tensors: Sequence[Tensor],
        keys: Sequence[str | None] | None = None,
        world_size: int = 1,
    ) -> Exchange:
        """Start an all-reduce exchange for a group of tensors (summable compressors only)."""
        if not self.capabilities.summable:
            raise ValueError(
                f"compressor {self.config.name!r}: its payload is not summable, so it cannot be "
                "all-reduced; use an all-gather transport"
            )
        keys = check_group(tensors, keys, world_size)
        return SingleRoundExchange(self, tensors, keys)

    @staticmethod
    def nbytes(payload: Sequence[Tensor]) -> int:
        return payload_nbytes(payload)

    # -- randomness and state -----------------------------------------------------------------

    def set_seed(self, seed: int) -> None:
        """Reseed the private (rank-local) randomness. Transports mix the rank in, so stochastic
        rounding noise is independent across workers and averages out."""
        self._seed = int(seed)
        self._draws.clear()

    def generator(self, device: torch.device, key: str | None = None) -> torch.Generator:
        """A fresh private generator for ``device``; never the global RNG.

        It is derived from (seed, key, how many draws that key has had), with ``key`` defaulting
        to the one :meth:`compress` is working on. Streams per key, rather than one stream, make
        a run reproducible whatever order tensors are compressed in (DDP's buckets change after
        its first step, and after a restart from a checkpoint).
        """
        key = self._active if key is None else key
        n = self._draws.get(key, 0)
        self._draws[key] = n + 1
        g = torch.Generator(device=device)
        g.manual_seed(zlib.crc32(f"{self._seed}:{key}:{n}".encode()) | (n << 32))
        return g

    def next_step(self, key: str | None) -> int:
        """Per-key call counter, for randomness that must agree across ranks."""
        step = self._steps.get(key, 0)
        self._steps[key] = step + 1
        return step

    def state_dict(self) -> dict[str, Any]:
        """Runtime state (generators, counters, per-key state); the config is not included."""
        return {
            "seed": self._seed,
            "draws": dict(self._draws),
            "steps": dict(self._steps),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._seed = int(state["seed"])
        self._draws = dict(state["draws"])
        self._steps = dict(state["steps"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class SingleRoundExchange(Exchange):
    """The exchange of a single-round summable compressor: one SUM of every tensor's payload."""

    def __init__(
        self,
        compressor: Compressor[Any],
        tensors: Sequence[Tensor],
        keys: Sequence[str | None],
        prescale: float = 1.0,
    ):
        self._c = compressor
        # Scaling before compression (and back after) keeps sums of n payloads in range.
        self._prescale = prescale
        compressed = [
            compressor.compress(t * prescale if prescale != 1.0 else t, k)
            for t, k in zip(tensors, keys)
        ]
        self._payloads = [p for p, _ in compressed]
        self._ctxs = [c for _, c in compressed]
        self._reduced: list[Payload] | None = None

    def message(self) -> Message | None:
        if self._reduced is not None:
            return None
        return Message(tuple(t for p in self._payloads for t in p), ReduceOp.SUM)

    def receive(self, reduced: Sequence[Tensor]) -> None:
        it = iter(reduced)
        self._reduced = [tuple(next(it) for _ in p) for p in self._payloads]

    def result(self) -> list[Tensor]:
        if self._reduced is None:
            raise RuntimeError("exchange: result() called before its round was received")
        return self._decode(self._reduced)

    def local(self) -> list[Tensor]:
        return [t.to(c.dtype) for t, c in zip(self._decode(self._payloads), self._ctxs)]

    def _decode(self, payloads: Sequence[Payload]) -> list[Tensor]:
        """Decoded tensors in compute dtype, the prescale undone."""
        out = [
            self._c.decompress(p, c).to(compute_dtype(c.dtype))
            for p, c in zip(payloads, self._ctxs)
        ]
        if self._prescale == 1.0:
            return out
        return [t.div_(self._prescale) for t in out]


def check_tensor(tensor: Any) -> None:
    """Compressors take floating tensors only; integer gradients are a caller bug."""
    if not isinstance(tensor, Tensor):
        raise ValueError(f"tensor: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"tensor: dtype {tensor.dtype} is not supported; compressors take "
            "float16, bfloat16, float32 or float64"
        )


def check_group(
    tensors: Sequence[Tensor], keys: Sequence[str | None] | None, world_size: int
) -> list[str | None]:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r}: must be a positive integer")
    if keys is None:
        return [None] * len(tensors)
    if len(keys) != len(tensors):
        raise ValueError(f"keys: got {len(keys)} keys for {len(tensors)} tensors")
    return list(keys)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic precision for a given input dtype: fp64 stays fp64, the rest work in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def poison(t: Tensor, probe: Tensor) -> Tensor:
    """Return ``t`` made non-finite wherever ``probe`` (a scalar) is non-finite, without a sync.

    ``probe - probe`` is 0 for a finite probe and NaN otherwise, so adding it leaves finite data
    bit-identical and marks the rest. Compressors that may drop elements use it with a probe
    that sees every element (a sum), so a NaN or Inf anywhere reaches GradScaler.
    """
    return t + (probe - probe).to(t.dtype)
