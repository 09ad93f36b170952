"""What every system is sent, read once from the model repository.

The comparison sends byte-identical requests to every system, so input shapes and
datatypes come from the repository's config.pbtxt files rather than from each server's
metadata endpoint (a peer may have none, or describe shapes its own way).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelpool.gpu.repository import ModelRepository
from modelpool.loadtests.client import ModelInfo, TensorSpec


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    #: Without the batch dimension, as config.pbtxt gives them.
    dims: tuple[int, ...]


@dataclass(frozen=True)
class Signature:
    name: str
    #: In forward()'s argument order (config.pbtxt's order, as Triton's libtorch backend).
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    max_batch_size: int
    artifact: Path
    artifact_bytes: int

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    def model_info(self) -> ModelInfo:
        """The generator's view: shapes with Triton's -1 batch dimension when batched."""
        lead = (-1,) if self.batched else ()
        return ModelInfo(
            self.name,
            tuple(TensorSpec(t.name, t.datatype, lead + t.dims) for t in self.inputs),
        )


def read_signatures(repo: Path) -> dict[str, Signature]:
    """Every servable model of ``repo`` (latest version); broken ones are an error here,
    since a comparison over a model only some systems can serve would be meaningless."""
    out: dict[str, Signature] = {}
    for spec in ModelRepository(repo).specs():
        if spec.error is not None:
            raise ValueError(f"model {spec.name} is not servable: {spec.error}")
        version = spec.latest
        out[spec.name] = Signature(
            name=spec.name,
            inputs=tuple(Tensor(t.name, t.datatype, t.dims) for t in spec.inputs),
            outputs=tuple(Tensor(t.name, t.datatype, t.dims) for t in spec.outputs),
            max_batch_size=spec.max_batch_size,
            artifact=spec.artifacts[version],
            artifact_bytes=spec.artifact_bytes(version),
        )
    if not out:
        raise ValueError(f"model repository {repo} holds no model")
    return out
