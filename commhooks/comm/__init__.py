"""Transports: how compressed payloads cross a torch.distributed process group."""

from commhooks.comm.transport import (
    AllGatherTransport,
    AllReduceTransport,
    ReduceScatterTransport,
    Transport,
    TransportStats,
    build_transport,
)

__all__ = [
    "AllGatherTransport",
    "AllReduceTransport",
    "ReduceScatterTransport",
    "Transport",
    "TransportStats",
    "build_transport",
]
