"""Pipelines: sparsify, then quantize (or cast) the kept values; indices keep their own code.

Built from a spec such as ``"topk:ratio=0.01|uniform:bits=4"``. The only composition that makes
sense is a sparsifier followed by one value codec, so that is all a pipeline accepts: quantizing
twice, sparsifying twice or sparsifying PowerSGD factors is refused when it is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from commhooks.compressors._sparse import Sparsifier
from commhooks.compressors.base import (
    Capabilities,
    Compressor,
    CompressorConfig,
    Context,
    Kind,
    Payload,
)
from commhooks.registry import compressor, register, register_pipeline

__all__ = ["Pipeline", "PipelineConfig"]

_VALUE_KINDS = (Kind.QUANTIZER, Kind.CAST)


@register_pipeline
@dataclass(frozen=True)
class PipelineConfig(CompressorConfig):
    """A sparsifier followed by a codec for its values.

    Args:
        stages: two configs: a sparsifier (``topk``, ``randomk``, ``threshold``, ``dgc``) and a
            quantizer or cast applied to the kept values.

    Tuning: quantizing top-k values to 8 bits (``"topk:ratio=0.01|uniform:bits=8"``) costs
    little accuracy and takes the values from 4 to ~1 byte, so the index code dominates; pick
    ``index_coding=delta`` on the sparsifier to shrink that too.
    """

    name: ClassVar[str] = "pipeline"
    stages: tuple[CompressorConfig, ...] = ()

    def __post_init__(self) -> None:
        if len(self.stages) != 2:
            raise ValueError(
                f"stages: a pipeline is a sparsifier then one value codec (2 stages), "
                f"got {len(self.stages)}"
            )
        for i, s in enumerate(self.stages):
            if not isinstance(s, CompressorConfig):
                raise ValueError(
                    f"stages[{i}]: expected a compressor config, got {type(s).__name__}"
                )
        first, second = (compressor(s) for s in self.stages)
        if not isinstance(first, Sparsifier):
            raise ValueError(
                f"stages[0]: {self.stages[0].name!r} is a {first.capabilities.kind.value}, "
                "but a pipeline must start with a sparsifier"
            )
        caps = second.capabilities
        if caps.kind not in _VALUE_KINDS or caps.rounds != 1:
            raise ValueError(
                f"stages[1]: {self.stages[1].name!r} ({caps.kind.value}) cannot code the kept "
                "values; use a single-round quantizer or a cast"
            )

    def spec(self) -> str:
        return "|".join(s.spec() for s in self.stages)


@register(PipelineConfig, listed=False)
class Pipeline(Compressor[PipelineConfig]):
    """Sparsifier + value codec; see :class:`PipelineConfig`.

    Payload: the value codec's payload, then the sparsifier's index part.
    """

    def __init__(self, config: PipelineConfig) -> None:
        super().__init__(config)
        sparse = compressor(config.stages[0])
        assert isinstance(sparse, Sparsifier)  # checked by the config
        self.sparse: Sparsifier[Any] = sparse
        self.values = compressor(config.stages[1])

    @property
    def capabilities(self) -> Capabilities:
        a, b = self.sparse.capabilities, self.values.capabilities
        return Capabilities(
            kind=Kind.PIPELINE,
            summable=a.summable and b.summable,
            static_size=a.static_size and b.static_size,
            unbiased=a.unbiased and b.unbiased,
            stateful=a.stateful or b.stateful,
        )

    def _compress(self, tensor: Tensor, key: str | None) -> tuple[Payload, Any]:
        sparse_payload, sparse_ctx = self.sparse.compress(tensor, key)
        values_key = None if key is None else f"{key}/values"
        value_payload, _ = self.values.compress(sparse_payload[0], values_key)
        return value_payload + sparse_payload[1:], sparse_ctx

    def _decompress(self, payload: Payload, ctx: Context) -> Tensor:
        sparse_ctx: Context = ctx.extra
        arity = self.sparse.index_arity
        value_payload, index_payload = (
            payload[: len(payload) - arity],
            payload[len(payload) - arity :],
        )
        idx = self.sparse.indices(index_payload, sparse_ctx)
        value_ctx = Context(torch.Size([idx.numel()]), ctx.dtype, ctx.device)
        return self.sparse.scatter(
            self.values.decompress(value_payload, value_ctx), idx, sparse_ctx
        )

    def state_dict(self) -> dict[str, Any]:
        return {"sparse": self.sparse.state_dict(), "values": self.values.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sparse.load_state_dict(state["sparse"])
        self.values.load_state_dict(state["values"])

    def set_seed(self, seed: int) -> None:
        self.sparse.set_seed(seed)
        self.values.set_seed(seed + 1)
