"""Transports: how compressed payloads cross a torch.distributed process group."""

from commhooks.comm.collectives import Collectives, TorchCollectives, as_collectives
from commhooks.comm.transport import (
    AllGatherTransport,
    AllReduceTransport,
    ReduceScatterTransport,
    Transport,
    TransportStats,
    build_transport,
)

__all__ = [
    "Collectives",
    "TorchCollectives",
    "as_collectives",
    "AllGatherTransport",
    "AllReduceTransport",
    "ReduceScatterTransport",
    "Transport",
    "TransportStats",
    "build_transport",
]
