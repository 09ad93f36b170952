"""Random inputs for a model, built from its config, and torch's answer for them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from modelpool.gpu.repository import ModelSpec, read_model
from modelpool.gpu.tensors import NUMPY_DTYPES


def inputs_for(spec: ModelSpec, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for t in spec.inputs:
        shape = ([batch] if spec.max_batch_size > 0 else []) + [d if d > 0 else 3 for d in t.dims]
        dtype = NUMPY_DTYPES[t.datatype]
        if dtype.kind == "f":
            out[t.name] = rng.standard_normal(shape).astype(dtype)
        else:
            out[t.name] = rng.integers(0, 1000, size=shape).astype(dtype)
    return out


def torch_reference(repo: Path, name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the model's own model.pt with torch, inputs in config order (Triton's rule)."""
    spec = read_model(repo / name)
    module = torch.jit.load(str(spec.artifacts[spec.latest]))
    with torch.inference_mode():
        result = module(*[torch.from_numpy(inputs[t.name].copy()) for t in spec.inputs])
    tensors = list(result) if isinstance(result, (tuple, list)) else [result]
    return {o.name: t.numpy() for o, t in zip(spec.outputs, tensors, strict=True)}
