"""In-process stand-ins for collectives, for tests and for checking a transport against.

:func:`simulate_allreduce` drives one :class:`~commhooks.compressors.base.Exchange` per
simulated rank in lockstep, reducing their messages exactly as an all-reduce would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from commhooks.compressors.base import Exchange, Message, ReduceOp

__all__ = ["simulate_allreduce"]


def _reduce(parts: Sequence[Tensor], op: ReduceOp) -> Tensor:
    stacked = torch.stack(list(parts))
    if op == ReduceOp.MAX:
        return stacked.amax(0)
    return stacked.sum(0, dtype=stacked.dtype)


def simulate_allreduce(exchanges: Sequence[Exchange], max_rounds: int = 16) -> list[Message]:
    """Run every rank's exchange to completion; returns rank 0's message of each round.

    Sums are taken in the wire dtype, so an integer sum wraps around as a real backend's does.

    Raises RuntimeError if the ranks disagree on a round's op, tensor count, shape or dtype,
    which on a real backend would be a hang or a crash.
    """
    log: list[Message] = []
    for rounds in range(max_rounds + 1):
        messages = [ex.message() for ex in exchanges]
        if all(m is None for m in messages):
            return log
        if any(m is None for m in messages):
            raise RuntimeError(f"round {rounds}: some ranks finished while others did not")
        first = messages[0]
        assert first is not None
        for r, m in enumerate(messages):
            assert m is not None
            if m.op != first.op or [(t.shape, t.dtype) for t in m.tensors] != [
                (t.shape, t.dtype) for t in first.tensors
            ]:
                raise RuntimeError(f"round {rounds}: rank {r}'s message does not match rank 0's")
        log.append(first)
        reduced = [
            _reduce([m.tensors[i] for m in messages if m is not None], first.op)
            for i in range(len(first.tensors))
        ]
        for ex in exchanges:
            ex.receive([t.clone() for t in reduced])
    raise RuntimeError(f"exchange did not finish within {max_rounds} rounds")
