"""Small TorchScript models with exact sizes and behaviours, for tests that need to
control footprints (eviction order) or timing (requests in flight)."""

from __future__ import annotations

from pathlib import Path

import torch

CONFIG = """name: "{name}"
platform: "pytorch_libtorch"
max_batch_size: 8
input {{ name: "x" data_type: TYPE_FP32 dims: [ 4 ] }}
{extra_input}output {{ name: "y" data_type: TYPE_FP32 dims: [ 4 ] }}
"""


class Sized(torch.nn.Module):
    """y = 2x + w[0]; holds ``nbytes`` of weights so its footprint is known."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.register_buffer("w", torch.zeros(max(1, nbytes // 4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0 + self.w[0]


class Slow(torch.nn.Module):
    """y = 2x after ``iters`` rounds of a 256x256 matmul: a request that stays in flight
    as long as the test needs, without sleeping (TorchScript cannot)."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.register_buffer("w", torch.zeros(max(1, nbytes // 4)))
        self.register_buffer("m", torch.eye(256) * 0.5)

    def forward(self, x: torch.Tensor, iters: torch.Tensor) -> torch.Tensor:
        acc = self.m
        for _ in range(int(iters.reshape(-1)[0].item())):
            acc = torch.mm(acc, self.m) + self.m
        return x * 2.0 + self.w[0] + acc[0, 0] * 0.0


class Crashy(torch.nn.Module):
    """Raises inside forward when any input is negative: a model's own error."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise RuntimeError("negative input is not allowed")
        return x * 2.0


def write_model(repo: Path, name: str, module: torch.nn.Module, extra_input: str = "") -> Path:
    d = repo / name
    (d / "1").mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(module), str(d / "1" / "model.pt"))
    (d / "config.pbtxt").write_text(CONFIG.format(name=name, extra_input=extra_input))
    return d


def write_sized(repo: Path, name: str, nbytes: int) -> Path:
    return write_model(repo, name, Sized(nbytes))


def write_slow(repo: Path, name: str, nbytes: int = 1 << 20) -> Path:
    return write_model(
        repo,
        name,
        Slow(nbytes),
        extra_input='input { name: "iters" data_type: TYPE_INT64 dims: [ 1 ] }\n',
    )
