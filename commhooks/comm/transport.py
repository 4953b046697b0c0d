"""Transports: how a group of tensors crosses the process group, chosen from capabilities.

Every transport turns a group of same-device tensors (one DDP bucket's gradients, say) into
their average over ranks. All collectives are issued from the calling thread, in an order that
depends only on shapes and config, so every rank issues the same sequence; nothing launches a
collective from a future's callback (that is how torch's PowerSGD hook interleaves buckets
differently per rank and crashes gloo).

* :class:`AllReduceTransport`: summable compressors; drives the compressor's exchange, one
  packed all-reduce per round and dtype.
* :class:`AllGatherTransport`: any compressor; every rank all-gathers every rank's payload
  bytes and decodes them (traffic per rank grows with the world size).
* :class:`ReduceScatterTransport`: static-size compressors; each rank decodes and sums one
  chunk from everyone, re-compresses it with its own server-side error feedback and
  all-gathers the result (traffic per rank stays flat as the world grows).

:meth:`Transport.scatter` is the reduce-scatter: each rank gets its chunk of every average
(FSDP2's custom reduce-scatter). The reduce-scatter transport then stops after the all-to-all
(one compression, no all-gather); the others average whole tensors and keep the chunk.
"""

from __future__ import annotations

import functools
import inspect
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from commhooks.comm.collectives import Collectives, as_collectives
from commhooks.compressors.base import Compressor, Context, Payload, ReduceOp, compute_dtype
from commhooks.feedback import ErrorFeedback

__all__ = [
    "AllGatherTransport",
    "AllReduceTransport",
    "ReduceScatterTransport",
    "Traffic",
    "Transport",
    "TransportStats",
    "count_allreduce",
    "build_transport",
    "transport_class",
]


@dataclass
class Traffic:
    """Bytes handed to collectives and where the time went; the fields that add up.

    ``node_bytes``: what the hierarchical transport's dense steps inside a node put on each
    rank's intra-node link (not in ``wire_bytes`` or ``link_bytes``, which then count only what
    crosses between nodes)."""

    raw_bytes: int = 0
    wire_bytes: int = 0
    link_bytes: float = 0.0
    compress_s: float = 0.0
    comm_s: float = 0.0
    decompress_s: float = 0.0
    collectives: int = 0
    node_bytes: float = 0.0

    def add(self, other: Traffic) -> None:
        """Add ``other``'s counts to these."""
        for f in fields(Traffic):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class TransportStats(Traffic):
    """What one :meth:`Transport.run` did."""

    extra: dict[str, Any] = field(default_factory=dict)


Averaged = tuple[list[Tensor], "TransportStats"]


def _bytes_of(tensors: Sequence[Tensor]) -> Tensor:
    """Every tensor's bytes, concatenated (uint8)."""
    if not tensors:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors])


@functools.cache
def _takes_out(cls: type) -> bool:
    """Whether ``cls.aggregate`` takes an ``out`` buffer (a compressor written against the
    two-argument form overrides it without one)."""
    return "out" in inspect.signature(cls.aggregate).parameters


def _holds_sum(out: Tensor, ctx: Context) -> bool:
    """Whether ``out`` can take the fp32 (fp64) sum of payloads of ``ctx`` in place."""
    return (
        out.dtype == compute_dtype(ctx.dtype)
        and out.shape == ctx.shape
        and out.device == ctx.device
        and out.is_contiguous()
    )


def count_allreduce(stats: TransportStats, buf: Tensor, world: int) -> None:
    """Add one all-reduce of ``buf`` to ``stats``."""
    nbytes = buf.numel() * buf.element_size()
    stats.wire_bytes += nbytes
    # A ring all-reduce sends 2(n-1)/n of the buffer from each rank.
    stats.link_bytes += 2 * (world - 1) / world * nbytes
    stats.collectives += 1


def _from_bytes(buf: Tensor, like: Sequence[tuple[torch.dtype, torch.Size]]) -> list[Tensor]:
    """Inverse of :func:`_bytes_of` for tensors of the given dtypes and shapes."""
    out, pos = [], 0
    for dtype, shape in like:
        size = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        piece = buf[pos : pos + size]
        if piece.storage_offset() % piece.new_empty(0, dtype=dtype).element_size():
            # A byte slice can only be viewed as a wider dtype from an aligned offset.
            piece = piece.clone()
        out.append(piece.view(dtype).reshape(shape))
        pos += size
    return out


class Transport(ABC):
    """Moves a group of tensors across ``group`` through ``compressor`` and averages them.

    Args:
        compressor: the compressor.
        feedback: per-key error feedback wrapping it, or None to send raw gradients.
        comm: a :class:`Collectives`, or a torch process group (None: the default group).
    """

    #: the name the DDP options use to ask for this transport
    name: str = ""

    def __init__(
        self,
        compressor: Compressor[Any],
        feedback: ErrorFeedback | None = None,
        comm: Collectives | dist.ProcessGroup | None = None,
    ) -> None:
        self.check(compressor)
        self.compressor = compressor
        self.feedback = feedback
        self.comm = as_collectives(comm)
        self.world = self.comm.world
        self.rank = self.comm.rank

    @classmethod
    def check(cls, compressor: Compressor[Any]) -> None:
        """Refuse a compressor this transport cannot carry (a ValueError saying why)."""
        if not isinstance(compressor, Compressor):
            raise ValueError(f"compressor: expected a Compressor, got {type(compressor).__name__}")

    @property
    def current(self) -> Compressor[Any]:
        """The compressor in use this step (error feedback's warm-up may swap it)."""
        return self.feedback.compressor if self.feedback is not None else self.compressor

    #: whether :meth:`_run` sums ``ride`` inside its own collectives (else :meth:`run`
    #: all-reduces it on its own first)
    carries_ride: bool = False
    #: whether an exchange completes without reading device values on the host for its
    #: checks, so the engine can decide on overflows on the device
    #: (``nonfinite_check="device"``); a gathering transport still reads the sizes of
    #: data-dependent payloads
    device_checks: bool = True
    #: whether a pass-through compressor's exchange (``identity`` without error feedback) is
    #: a plain sum over the whole group: the engine then all-reduces whole buffers in place
    sums_in_place: bool = False

    def run(
        self,
        keys: Sequence[str],
        tensors: Sequence[Tensor],
        memory: bool = True,
        *,
        ride: Tensor | None = None,
        proceed: Callable[[Tensor], bool] | None = None,
        out: Sequence[Tensor] | None = None,
    ) -> tuple[list[Tensor] | None, TransportStats]:
        """Average ``tensors`` (named ``keys``) over ranks; returns them in their own dtypes.

        Args:
            keys: one name per tensor (error-feedback memory, shared randomness).
            tensors: the tensors.
            memory: False sends them without this rank's error feedback, which stays as it
                was (a federated client absent from a round joins with a zero delta).
            ride: a flat tensor summed over ranks in place on the way (the engine's overflow
                flag and small tensors): packed into a summing round where the transport has
                one (:attr:`carries_ride`), else all-reduced on its own first.
            proceed: called with the summed ``ride``; False abandons the exchange alike on
                every rank (error feedback untouched) and the means are None.
            out: where to write the means (may be ``tensors`` themselves); then returned.
        """
        stats = TransportStats(raw_bytes=sum(t.numel() * t.element_size() for t in tensors))
        if ride is not None and not self.carries_ride:
            if not self._ride_alone(ride, proceed, stats):
                return None, stats
            ride = proceed = None
        means = self._run(keys, tensors, memory, stats, ride, proceed, out)
        if means is None or out is None:
            return means, stats
        for o, m in zip(out, means):
            if o.data_ptr() != m.data_ptr():
                o.copy_(m)
        return list(out), stats

    @abstractmethod
    def _run(
        self,
        keys: Sequence[str],
        tensors: Sequence[Tensor],
        memory: bool,
        stats: TransportStats,
        ride: Tensor | None,
        proceed: Callable[[Tensor], bool] | None,
        out: Sequence[Tensor] | None,
    ) -> list[Tensor] | None:
        """:meth:`run`'s exchange, adding to ``stats``. ``ride`` and ``proceed`` are None
        unless :attr:`carries_ride`; ``out`` may be used to write the means in place."""

    def scatter(
        self,
        keys: Sequence[str],
        tensors: Sequence[Tensor],
        memory: bool = True,
        *,
        ride: Tensor | None = None,
        proceed: Callable[[Tensor], bool] | None = None,
    ) -> tuple[list[Tensor] | None, TransportStats]:
        """This rank's chunk of each tensor's average over ranks: the average, flattened and
        cut into ``world`` equal rows, row ``rank`` (a reduce-scatter, e.g. FSDP2's).

        Arguments as for :meth:`run`. A transport with :attr:`scatters` sends each
        destination only its chunk (compressed once, decoded and summed in fp32 by the
        chunk's owner); the others average whole tensors and keep the chunk, so their bytes
        are :meth:`run`'s.

        Raises:
            ValueError: a tensor's size is not a multiple of the world size.
        """
        for k, t in zip(keys, tensors):
            if t.numel() % self.world:
                raise ValueError(
                    f"tensors: {k!r} has {t.numel()} elements, not a multiple of the "
                    f"{self.world} ranks its chunks go to; pad it (FSDP2 pads dim 0)"
                )
        stats = TransportStats(raw_bytes=sum(t.numel() * t.element_size() for t in tensors))
        if ride is not None and not (self.carries_ride and not self.scatters):
            if not self._ride_alone(ride, proceed, stats):
                return None, stats
            ride = proceed = None
        if self.scatters:
            return self._scatter(keys, tensors, memory, stats), stats
        means = self._run(keys, tensors, memory, stats, ride, proceed, None)
        if means is None:
            return None, stats
        return [m.reshape(self.world, -1)[self.rank] for m in means], stats

    #: whether :meth:`scatter` sends each destination its chunk alone (:meth:`_scatter`)
    scatters: bool = False

    def _scatter(
        self, keys: Sequence[str], tensors: Sequence[Tensor], memory: bool, stats: TransportStats
    ) -> list[Tensor]:
        """:meth:`scatter`'s exchange where :attr:`scatters`, adding to ``stats``."""
        raise NotImplementedError(f"transport {self.name!r} does not scatter")

    def _ride_alone(
        self, ride: Tensor, proceed: Callable[[Tensor], bool] | None, stats: TransportStats
    ) -> bool:
        """All-reduce ``ride`` on its own; whether the exchange goes on (``proceed``)."""
        self._all_reduce(ride, ReduceOp.SUM, stats)
        return proceed is None or proceed(ride)

    # -- helpers shared by the transports ----------------------------------------------------

    def _all_reduce(self, buf: Tensor, op: ReduceOp, stats: TransportStats) -> None:
        t0 = time.perf_counter()
        self.comm.all_reduce(buf, op)
        stats.comm_s += time.perf_counter() - t0
        count_allreduce(stats, buf, self.world)

    def _all_gather_bytes(
        self, header: Tensor, body: Tensor, stats: TransportStats
    ) -> tuple[list[list[int]], list[Tensor]]:
        """Every rank's int64 ``header`` words and byte ``body``, of possibly different
        lengths, in rank order: two host reads in all (the lengths, then every header)."""
        t0 = time.perf_counter()
        own = torch.cat([header.view(torch.uint8), body])
        size = torch.tensor([own.numel(), header.numel()], dtype=torch.int64, device=own.device)
        lengths = self.comm.all_gather(size).view(self.world, 2).tolist()
        # Rounded up to 8 bytes, so that every rank's block (and its int64 header) is aligned.
        longest = -(-max(n for n, _ in lengths) // 8) * 8
        padded = torch.zeros(longest, dtype=torch.uint8, device=own.device)
        padded[: own.numel()] = own
        out = self.comm.all_gather(padded)
        stats.comm_s += time.perf_counter() - t0
        stats.wire_bytes += 16 + longest
        # A ring all-gather forwards every other rank's block once.
        stats.link_bytes += (self.world - 1) * (16 + longest)
        stats.collectives += 2
        blocks = [out[r * longest : r * longest + n] for r, (n, _) in enumerate(lengths)]
        words = torch.cat([b[: 8 * w].view(torch.int64) for b, (_, w) in zip(blocks, lengths)])
        flat, headers, pos = words.tolist(), [], 0
        for _, w in lengths:
            headers.append(flat[pos : pos + w])
            pos += w
        return headers, [b[8 * w :] for b, (_, w) in zip(blocks, lengths)]

    def _all_gather_equal(self, own: Tensor, stats: TransportStats) -> list[Tensor]:
        """Every rank's byte buffer when all have ``own``'s length: one collective."""
        t0 = time.perf_counter()
        out = self.comm.all_gather(own)
        stats.comm_s += time.perf_counter() - t0
        stats.wire_bytes += own.numel()
        stats.link_bytes += (self.world - 1) * own.numel()
        stats.collectives += 1
        return list(out.view(self.world, own.numel()).unbind(0))


class AllReduceTransport(Transport):
    """All-reduce of a summable compressor's exchange, one packed buffer per round and dtype."""

    name = "allreduce"

    @classmethod
    def check(cls, compressor: Compressor[Any]) -> None:
        if not compressor.capabilities.summable:
            raise ValueError(
                f"transport 'allreduce': {compressor.config.name!r} payloads are not summable "
                "(per-worker scales or indices); use 'allgather' or 'reducescatter'"
            )

    carries_ride = True
    sums_in_place = True

    def _run(
        self,
        keys: Sequence[str],
        tensors: Sequence[Tensor],
        memory: bool,
        stats: TransportStats,
        ride: Tensor | None,
        proceed: Callable[[Tensor], bool] | None,
        out: Sequence[Tensor] | None,
    ) -> list[Tensor] | None:
        """``ride`` goes in the first round's all-reduce when that round sums (one collective
        fewer), else on its own before it."""
        t0 = time.perf_counter()
        if self.feedback is not None and memory:
            ex = self.feedback.exchange(keys, tensors, self.world)
        else:
            ex = self.current.exchange(tensors, keys, self.world)
        pending = ride is not None
        while True:
            msg = ex.message()
            stats.compress_s += time.perf_counter() - t0
            reduced = None
            if pending and ride is not None:
                if msg is not None and msg.op is ReduceOp.SUM:
                    *reduced, summed = self._reduce_packed([*msg.tensors, ride], msg.op, stats)
                    ride.copy_(summed.reshape(-1))
                else:
                    self._all_reduce(ride, ReduceOp.SUM, stats)
                pending = False
                if proceed is not None and not proceed(ride):
                    ex.abandon()
                    return None
            if msg is None:
                break
            if reduced is None:
                reduced = self._reduce_packed(msg.tensors, msg.op, stats)
            t0 = time.perf_counter()
            ex.receive(reduced)
        t0 = time.perf_counter()
        if out is not None:
            ex.result_into(out, self.world)
            means = list(out)
        else:
            means = [s.div_(self.world).to(t.dtype) for s, t in zip(ex.result(), tensors)]
        stats.decompress_s += time.perf_counter() - t0
        return means

    def _reduce_packed(
        self, tensors: Sequence[Tensor], op: ReduceOp, stats: TransportStats
    ) -> list[Tensor]:
        """One all-reduce per dtype over the concatenation of that dtype's tensors."""
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        out: list[Tensor | None] = [None] * len(tensors)
        for idx in by_dtype.values():
            buf = torch.cat([tensors[i].reshape(-1) for i in idx])
            self._all_reduce(buf, op, stats)
            for i, piece in zip(idx, buf.split([tensors[i].numel() for i in idx])):
                out[i] = piece.view(tensors[i].shape)
        return out  # type: ignore[return-value]


class AllGatherTransport(Transport):
    """All-gather of every rank's payload bytes; every rank decodes and aggregates them all."""

    name = "allgather"

    def _run(
        self,
        keys: Sequence[str],
        tensors: Sequence[Tensor],
        memory: bool,
        stats: TransportStats,
        ride: Tensor | None,
        proceed: Callable[[Tensor], bool] | None,
        out: Sequence[Tensor] | None,
    ) -> list[Tensor]:
        t0 = time.perf_counter()
        c = self.current
        device = tensors[0].device if tensors else torch.device("cpu")
        compressed = [self._compress(k, t, memory) for k, t in zip(keys, tensors)]
        parts = [t for p, _ in compressed for t in p]
        body = _bytes_of(parts).to(device)
        static = c.capabilities.static_size
        stats.compress_s += time.perf_counter() - t0
        if static:
            # Every rank's parts have our shapes: one all-gather of equal-sized buffers.
            gathered = self._all_gather_equal(body, stats)
            layouts = [[(t.dtype, t.shape) for t in parts]] * self.world
        else:
            # Sizes depend on the data: the part shapes travel in a header, after a size
            # exchange.
            header = torch.tensor(
                [d for t in parts for d in (t.dim(), *t.shape)], dtype=torch.int64, device=device
            )
            headers, gathered = self._all_gather_bytes(header, body, stats)
            layouts = [
                [(t.dtype, sh) for t, sh in zip(parts, self._parse_header(h, len(parts)))]
                for h in headers
            ]
        t0 = time.perf_counter()
        per_rank: list[list[Payload]] = []
        for buf, layout in zip(gathered, layouts):
            it = iter(_from_bytes(buf, layout))
            per_rank.append([tuple(next(it) for _ in p) for p, _ in compressed])
        means = []
        for i, ((_, ctx), t) in enumerate(zip(compressed, tensors)):
            # Summed straight into the caller's buffer where it has the sum's dtype (every
            # input was compressed above, so none is read again).
            mine = [payloads[i] for payloads in per_rank]
            if out is not None and _holds_sum(out[i], ctx) and _takes_out(type(c)):
                total = c.aggregate(mine, ctx, out[i])
            else:
                total = c.aggregate(mine, ctx)
            means.append(total.div_(self.world).to(t.dtype))
        stats.decompress_s += time.perf_counter() - t0
        return means

    def _compress(self, key: str, t: Tensor, memory: bool) -> tuple[Payload, Context]:
        if self.feedback is not None and memory:
            return self.feedback.compress(key, t)
        return self.current.compress(t, key)

    @staticmethod
    def _parse_header(words: list[int], count: int) -> list[torch.Size]:
        """The ``count`` part shapes a header holds: per part, its ndim, then its dims."""
        shapes, pos = [], 0
        for _ in range(count):
            ndim = words[pos]
            shapes.append(torch.Size(words[pos + 1 : pos + 1 + ndim]))
            pos += 1 + ndim
        return shapes


class ReduceScatterTransport(Transport):
    """Compressed reduce-scatter, then all-gather: per-rank traffic stays flat in the world size.

    Every tensor is cut into one piece per rank. Each rank compresses every piece (client error
    feedback per parameter, as elsewhere) and an all-to-all hands rank j everyone's codes for
    the pieces j. Rank j decodes and averages them, re-compresses the averages with its own
    server-side error feedback, and an all-gather gives every rank every averaged piece. Each
    rank sends about ``2(n-1)/n`` payloads where an all-gather sends ``n-1``, at the price of
    compressing twice. Pieces are cut per tensor, not per bucket, so results do not depend on
    how DDP buckets the parameters (which changes after its first step and on a restart).

    :meth:`scatter` is the first half alone: the all-to-all of every destination's compressed
    piece, decoded and summed in fp32 by its owner, with client error feedback only (the
    server's memory is not used).
    """

    name = "reducescatter"

    def __init__(
        self,
        compressor: Compressor[Any],
        feedback: ErrorFeedback | None = None,
        comm: Collectives | dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(compressor, feedback, comm)
        # The server's memory: what its re-compression of the averaged pieces dropped. Fused
        # or op by op as the clients' (the reference run checks both sides).
        self.server = (
            ErrorFeedback(type(compressor)(compressor.config), fused=feedback.fused)
            if feedback
            else None
        )

    @classmethod
    def check(cls, compressor: Compressor[Any]) -> None:
        caps = compressor.capabilities
        if not caps.static_size:
            raise ValueError(
                f"transport 'reducescatter': {compressor.config.name!r} payload sizes depend on "
                "the data, but the all-to-all needs equal-sized pieces; turn entropy coding off "
                "or use 'allgather'"
            )
        if caps.rounds > 1:
            raise ValueError(
                f"transport 'reducescatter': {compressor.config.name!r} needs "
                f"{caps.rounds} all-reduce rounds; use 'allreduce'"
            )

    scatters = True

    def _scatter(
        self, keys: Sequence[str], tensors: Sequence[Tensor], memory: bool, stats: TransportStats
    ) -> list[Tensor]:
        """The reduce-scatter: this rank's chunk of each mean, flat, in the tensors' dtypes."""
        if not tensors:
            return []
        means = self._reduce_chunks(keys, tensors, memory, stats)
        return [mean.to(t.dtype) for mean, t in zip(means, tensors)]

    def _reduce_chunks(
        self, keys: Sequence[str], tensors: Sequence[Tensor], memory: bool, stats: TransportStats
    ) -> list[Tensor]:
        """Each rank compresses every tensor's piece for every destination (client error
        feedback of the whole tensor) and one all-to-all hands rank j everyone's codes for
        pieces j; this rank's means of its pieces (summed in fp32)."""
        t0 = time.perf_counter()
        c, world = self.current, self.world
        ef = self.feedback if memory else None
        client = []  # per tensor, per destination rank: (payload, ctx)
        for k, t in zip(keys, tensors):
            x = ef.begin(k, t) if ef is not None else t
            rows = _pieces(x.reshape(-1).to(t.dtype), world)
            codes = [c.compress(rows[j], f"{k}/{j}") for j in range(world)]
            if ef is not None:
                ef.commit(k, torch.cat([c.decompress(p, cx) for p, cx in codes])[: t.numel()])
            client.append(codes)
        # Static sizes: piece j of a tensor has the same payload shapes for every j.
        send = torch.cat([_bytes_of([a for cd in client for a in cd[j][0]]) for j in range(world)])
        layout = [(a.dtype, a.shape) for cd in client for a in cd[self.rank][0]]
        stats.compress_s += time.perf_counter() - t0

        t0 = time.perf_counter()
        recv = self.comm.all_to_all(send)
        stats.comm_s += time.perf_counter() - t0
        stats.wire_bytes += send.numel()
        stats.link_bytes += (world - 1) / world * send.numel()
        stats.collectives += 1

        t0 = time.perf_counter()
        rows = [_split_payloads(_from_bytes(r, layout), client) for r in recv.view(world, -1)]
        means = [
            c.aggregate([r[i] for r in rows], codes[self.rank][1]).div_(world)
            for i, codes in enumerate(client)
        ]
        stats.decompress_s += time.perf_counter() - t0
        return means

    def _run(
        self,
        keys: Sequence[str],
        tensors: Sequence[Tensor],
        memory: bool,
        stats: TransportStats,
        ride: Tensor | None,
        proceed: Callable[[Tensor], bool] | None,
        out: Sequence[Tensor] | None,
    ) -> list[Tensor]:
        if not tensors:
            return []
        chunks = self._reduce_chunks(keys, tensors, memory, stats)
        t0 = time.perf_counter()
        server_c = self.server.compressor if self.server is not None else self.current
        mine = []
        for k, t, chunk in zip(keys, tensors, chunks):
            mean = chunk.to(t.dtype)
            skey = f"{k}/{self.rank}"
            if self.server is not None:
                mine.append(self.server.compress(skey, mean))
            else:
                mine.append(server_c.compress(mean, skey))
        stats.compress_s += time.perf_counter() - t0

        own = _bytes_of([a for p, _ in mine for a in p]).to(chunks[0].device)
        gathered = self._all_gather_equal(own, stats)
        t0 = time.perf_counter()
        slayout = [(a.dtype, a.shape) for p, _ in mine for a in p]
        pieces = [_split_payloads(_from_bytes(b, slayout), mine) for b in gathered]
        result = []
        for i, t in enumerate(tensors):
            ctx = mine[i][1]
            full = torch.cat([server_c.decompress(pieces[j][i], ctx) for j in range(self.world)])
            result.append(full[: t.numel()].view(t.shape).to(t.dtype))
        stats.decompress_s += time.perf_counter() - t0
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"server": self.server.state_dict() if self.server is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.server is not None and state.get("server") is not None:
            self.server.load_state_dict(state["server"])


def _pieces(flat: Tensor, world: int) -> Tensor:
    """``flat`` zero-padded and cut into ``world`` equal rows."""
    size = -(-flat.numel() // world)
    return torch.nn.functional.pad(flat, (0, size * world - flat.numel())).view(world, size)


def _split_payloads(parts: list[Tensor], like: Sequence[Any]) -> list[Payload]:
    """Regroup a flat list of payload tensors into one payload per tensor, shaped like the
    payloads in ``like`` (a list of ``(payload, ctx)`` or of such lists, indexed by rank)."""
    out, pos = [], 0
    for item in like:
        payload = item[0][0] if isinstance(item, list) else item[0]
        out.append(tuple(parts[pos : pos + len(payload)]))
        pos += len(payload)
    return out


TRANSPORTS: dict[str, type[Transport]] = {
    t.name: t for t in (AllReduceTransport, AllGatherTransport, ReduceScatterTransport)
}


def transport_class(compressor: Compressor[Any], transport: str = "auto") -> type[Transport]:
    """The transport class for ``compressor``: ``"auto"`` takes all-reduce for summable
    payloads and all-gather otherwise; ``"allreduce"``, ``"allgather"`` or ``"reducescatter"``
    force one, and a pairing that cannot work raises a ValueError saying why. Needs no
    process group, so configs are checked before one exists."""
    if transport == "auto":
        transport = "allreduce" if compressor.capabilities.summable else "allgather"
    cls = TRANSPORTS.get(transport)
    if cls is None:
        raise ValueError(
            f"transport={transport!r}: must be 'auto' or one of {', '.join(sorted(TRANSPORTS))}"
        )
    cls.check(compressor)
    return cls


def build_transport(
    compressor: Compressor[Any],
    transport: str = "auto",
    feedback: ErrorFeedback | None = None,
    comm: Collectives | dist.ProcessGroup | None = None,
) -> Transport:
    """The transport :func:`transport_class` picks, over ``comm``."""
    return transport_class(compressor, transport)(compressor, feedback, comm)
