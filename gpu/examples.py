"""A deterministic example model repository, in Triton's layout, to serve and load-test.

    <out>/<model>/config.pbtxt   (ModelConfig text, platform pytorch_libtorch)
    <out>/<model>/1/model.pt     (TorchScript)

Models cycle through four kinds, and through sizes from a few MB to tens of MB, so a
pool sees both many small and a few heavy models::

    index  name            inputs                      outputs
    0      mlp_00_2mb      input FP32 [64]             output FP32 [16]
    1      embed_01_4mb    token_ids INT64 [16]        embedding FP32 [32]
    2      pair_02_8mb     x FP32 [32], y FP32 [32]    sum FP32 [32], score FP32 [4]
    3      conv_03_16mb    image FP32 [3, 16, 16]      logits FP32 [10]
    4..7   the same kinds at 32, 24, 12 and 6 MB; then the cycle repeats

The default eight total about 104 MB; each further eight add as much. ``large`` turns
the two biggest of the first eight (or of fewer, if fewer are written) into 384 MB and
192 MB models.

Without ``large``, model ``i`` depends only on ``(seed, i)``, never on ``count``, so a
bigger set extends a smaller one byte for byte. ``pair``'s ``sum`` is exactly
``x + y``, which lets an end-to-end test check a served answer without loading the model.

    python -m gpu.examples --out /tmp/models --count 8
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from google.protobuf import text_format
from torch import nn
from tritonclient.grpc import model_config_pb2 as mc

KINDS = ("mlp", "embed", "pair", "conv")
#: Megabytes of weights per index within each cycle of eight.
SIZES_MB = (2, 4, 8, 16, 32, 24, 12, 6)
#: With ``large``, the biggest slot of the first cycle becomes the first of these, the
#: next biggest the second.
LARGE_MB = (384, 192)
MAX_BATCH = {"mlp": 32, "embed": 16, "pair": 8, "conv": 8}

# Fixed shapes per kind; only the hidden width grows with the size.
MLP_IN, MLP_OUT = 64, 16
EMBED_LEN, EMBED_DIM, EMBED_OUT = 16, 128, 32
PAIR_K, PAIR_OUT = 32, 4
CONV_CHANNELS, CONV_SIDE, CONV_CLASSES = 16, 16, 10
_CONV_FLAT = CONV_CHANNELS * (CONV_SIDE // 2) ** 2


_CONFIG_HEADER = (
    "# Example model written by gpu.examples: random weights, for serving and load tests.\n"
)


@dataclass(frozen=True)
class Example:
    index: int
    kind: str
    size_mb: int

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.index:02d}_{self.size_mb}mb"


def plan(count: int, large: bool = False) -> list[Example]:
    """The models ``write_examples`` writes for ``count``, without touching disk."""
    sizes = [SIZES_MB[i % len(SIZES_MB)] for i in range(count)]
    if large:
        first = range(min(count, len(SIZES_MB)))
        biggest = sorted(first, key=lambda i: (-sizes[i], i))[: len(LARGE_MB)]
        for i, mb in zip(biggest, LARGE_MB, strict=False):
            sizes[i] = mb
    return [Example(i, KINDS[i % len(KINDS)], sizes[i]) for i in range(count)]


# TorchScript modules hold bare Parameters and call functional ops: nn.Linear and
# friends declare ``__constants__``, which TorchScript emits in set order, so their
# saved code would change with PYTHONHASHSEED.


def _clip(x: torch.Tensor) -> torch.Tensor:
    # Learned paths see clipped inputs, so any finite input gives finite outputs.
    return x.clamp(-1e4, 1e4)


def _uniform(g: torch.Generator, shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    # uniform_ is plain scalar arithmetic on the generator's bits, so the weights are
    # the same on every CPU; randn's vectorised Box-Muller may differ by an ulp.
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound, generator=g), False)


class _Head(nn.Module):
    """in -> hidden -> hidden -> out, tanh between, so hidden values stay in [-1, 1]."""

    def __init__(self, g: torch.Generator, n_in: int, hidden: int, n_out: int) -> None:
        super().__init__()
        self.w1 = _uniform(g, (hidden, n_in), n_in)
        self.b1 = _uniform(g, (hidden,), n_in)
        self.w2 = _uniform(g, (hidden, hidden), hidden)
        self.b2 = _uniform(g, (hidden,), hidden)
        self.w3 = _uniform(g, (n_out, hidden), hidden)
        self.b3 = _uniform(g, (n_out,), hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(F.linear(x, self.w1, self.b1))
        h = torch.tanh(F.linear(h, self.w2, self.b2))
        return F.linear(h, self.w3, self.b3)

    @staticmethod
    def hidden_for(n_in: int, n_out: int, params: int) -> int:
        # Solves hidden^2 + hidden * (n_in + n_out + 2) + n_out = params.
        b = n_in + n_out + 2
        return max(8, round((-b + math.sqrt(b * b + 4 * max(params - n_out, 0))) / 2))


class Mlp(nn.Module):
    def __init__(self, g: torch.Generator, params: int) -> None:
        super().__init__()
        self.head = _Head(g, MLP_IN, _Head.hidden_for(MLP_IN, MLP_OUT, params), MLP_OUT)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.head(_clip(input))


class Embed(nn.Module):
    def __init__(self, g: torch.Generator, params: int) -> None:
        super().__init__()
        vocab = max(16, (params - EMBED_OUT * (EMBED_DIM + 1)) // EMBED_DIM)
        self.table = nn.Parameter(torch.empty(vocab, EMBED_DIM).uniform_(-1, 1, generator=g), False)
        self.w = _uniform(g, (EMBED_OUT, EMBED_DIM), EMBED_DIM)
        self.b = _uniform(g, (EMBED_OUT,), EMBED_DIM)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        # remainder takes the divisor's sign, so every int64, negative ones too, is a row.
        ids = token_ids.remainder(self.table.size(0))
        pooled = F.embedding(ids, self.table).mean(dim=1)
        return torch.tanh(F.linear(pooled, self.w, self.b))


class Pair(nn.Module):
    def __init__(self, g: torch.Generator, params: int) -> None:
        super().__init__()
        self.head = _Head(g, PAIR_K, _Head.hidden_for(PAIR_K, PAIR_OUT, params), PAIR_OUT)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        product = _clip(x) * _clip(y)
        return x + y, self.head(product)


class Conv(nn.Module):
    def __init__(self, g: torch.Generator, params: int) -> None:
        super().__init__()
        fan_in = 3 * 3 * 3
        self.cw = _uniform(g, (CONV_CHANNELS, 3, 3, 3), fan_in)
        self.cb = _uniform(g, (CONV_CHANNELS,), fan_in)
        hidden = max(8, (params - CONV_CLASSES) // (_CONV_FLAT + 1 + CONV_CLASSES))
        self.w1 = _uniform(g, (hidden, _CONV_FLAT), _CONV_FLAT)
        self.b1 = _uniform(g, (hidden,), _CONV_FLAT)
        self.w2 = _uniform(g, (CONV_CLASSES, hidden), hidden)
        self.b2 = _uniform(g, (CONV_CLASSES,), hidden)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.conv2d(_clip(image), self.cw, self.cb, padding=1))
        h = F.avg_pool2d(h, 2).flatten(1)
        h = torch.tanh(F.linear(h, self.w1, self.b1))
        return F.linear(h, self.w2, self.b2)


_BUILDERS: dict[str, Callable[[torch.Generator, int], nn.Module]] = {
    "mlp": Mlp,
    "embed": Embed,
    "pair": Pair,
    "conv": Conv,
}

# (name, wire datatype, dims without the batch dimension), in forward()'s order.
_Signature = tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]
_SIGNATURES: dict[str, _Signature] = {
    "mlp": ([("input", "FP32", [MLP_IN])], [("output", "FP32", [MLP_OUT])]),
    "embed": ([("token_ids", "INT64", [EMBED_LEN])], [("embedding", "FP32", [EMBED_OUT])]),
    "pair": (
        [("x", "FP32", [PAIR_K]), ("y", "FP32", [PAIR_K])],
        [("sum", "FP32", [PAIR_K]), ("score", "FP32", [PAIR_OUT])],
    ),
    "conv": (
        [("image", "FP32", [3, CONV_SIDE, CONV_SIDE])],
        [("logits", "FP32", [CONV_CLASSES])],
    ),
}


def model_seed(seed: int, index: int) -> int:
    """The generator seed of model ``index``: a stable hash, so no model shares a stream."""
    digest = hashlib.sha256(f"modelpool-examples:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def config_text(ex: Example) -> str:
    inputs, outputs = _SIGNATURES[ex.kind]
    cfg = mc.ModelConfig(
        name=ex.name, platform="pytorch_libtorch", max_batch_size=MAX_BATCH[ex.kind]
    )
    for name, dt, dims in inputs:
        cfg.input.add(name=name, data_type=mc.DataType.Value(f"TYPE_{dt}"), dims=dims)
    for name, dt, dims in outputs:
        cfg.output.add(name=name, data_type=mc.DataType.Value(f"TYPE_{dt}"), dims=dims)
    return _CONFIG_HEADER + text_format.MessageToString(cfg)


def _save_stable(module: torch.jit.ScriptModule, path: Path) -> None:
    """Save TorchScript without its ``*.debug_pkl`` records, atomically.

    Those records hold the absolute path and lines of this file, so the same model
    saved from two checkouts would differ. The rest of torch.jit.save's archive is
    already a function of the module (zip times are fixed, the serialization id is
    a hash of the records), so copying it through torch's own writer, which keeps the
    64-byte data alignment loaders rely on, gives the same bytes everywhere.
    """
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    buf.seek(0)
    reader = torch._C.PyTorchFileReader(buf)
    records = reader.get_all_records()
    version_record = ".data/version" if ".data/version" in records else "version"
    written_by_writer = {"version", ".data/version", ".data/serialization_id"}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            # A buffer, not a file name: the writer names the archive's top folder after
            # a file name, and the temporary name must not leak into the model.
            writer = torch._C.PyTorchFileWriter(f)
            writer.set_min_version(int(reader.get_record(version_record).strip()))
            for name in records:
                if name.endswith(".debug_pkl") or name in written_by_writer:
                    continue
                data = reader.get_record(name)
                writer.write_record(name, data, len(data))
            writer.write_end_of_file()
            del writer  # it holds f; let it go before f closes
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_model(out: Path, ex: Example, seed: int) -> Path:
    """Write one example model; returns its model.pt."""
    g = torch.Generator().manual_seed(model_seed(seed, ex.index))
    module = _BUILDERS[ex.kind](g, ex.size_mb * 1_000_000 // 4).eval()
    model_dir = out / ex.name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    artifact = model_dir / "1" / "model.pt"
    with warnings.catch_warnings():
        # TorchScript is deprecated in torch but is what pytorch_libtorch loads.
        warnings.filterwarnings("ignore", r"`torch\.jit\.", DeprecationWarning)
        _save_stable(torch.jit.script(module), artifact)
    (model_dir / "config.pbtxt").write_text(config_text(ex))
    return artifact


def write_examples(
    out: Path,
    count: int = 8,
    seed: int = 0,
    large: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[str]:
    """Write `count` models into out; returns their names. progress(i, total, name) after each.

    ``i`` counts from 1. Models already in ``out`` under other names are left alone.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, not {count}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    examples = plan(count, large)
    for ex in examples:
        write_model(out, ex, seed)
        names.append(ex.name)
        if progress is not None:
            progress(ex.index + 1, len(examples), ex.name)
    return names


def _non_negative(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {n}")
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpu.examples",
        description="Write a deterministic example model repository (Triton layout, TorchScript).",
    )
    parser.add_argument("--out", type=Path, required=True, help="repository directory")
    parser.add_argument("--count", type=_non_negative, default=8, help="models (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument(
        "--large", action="store_true", help="make two models a few hundred MB each"
    )
    args = parser.parse_args(argv)
    out: Path = args.out
    total_bytes = 0

    def report(i: int, total: int, name: str) -> None:
        nonlocal total_bytes
        size = (out / name / "1" / "model.pt").stat().st_size
        total_bytes += size
        print(f"[{i}/{total}] wrote {name} ({size / 1e6:.1f} MB)", file=sys.stderr, flush=True)

    names = write_examples(out, args.count, args.seed, args.large, report)
    print(f"wrote {len(names)} models ({total_bytes / 1e6:.1f} MB) to {out}")
    return 0


if __name__ == "__main__":
    # Run through the package's module: classes defined in __main__ would be saved as
    # __torch__.___main__.*, so the CLI's files would differ from write_examples'.
    from modelpool.gpu.examples import main as _main

    sys.exit(_main())
