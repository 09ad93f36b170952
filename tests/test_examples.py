"""gpu.examples writes a repository that gpu.repository reads and TorchScript runs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modelpool.gpu.examples import main, plan, write_examples
from modelpool.gpu.repository import ModelSpec, read_model

pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.load` is deprecated:DeprecationWarning"
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TORCH_DTYPES = {"FP32": torch.float32, "INT64": torch.int64}


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def random_inputs(spec: ModelSpec, batch: int, g: torch.Generator) -> list[torch.Tensor]:
    tensors = []
    for t in spec.inputs:
        shape = (batch, *t.dims)
        if t.datatype == "INT64":
            # The whole int64 range, extremes included: the model must fold any id.
            ids = torch.randint(-(2**63), 2**63 - 1, shape, generator=g, dtype=torch.int64)
            ids.view(-1)[:2] = torch.tensor([-(2**63), 2**63 - 1])
            tensors.append(ids)
        else:
            tensors.append(torch.randn(shape, generator=g, dtype=TORCH_DTYPES[t.datatype]))
    return tensors


def as_tuple(result: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


@pytest.fixture(scope="module")
def repo20(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("examples20")
    seen: list[tuple[int, int, str]] = []
    names = write_examples(out, count=20, seed=0, progress=lambda *a: seen.append(a))
    assert seen == [(i + 1, 20, n) for i, n in enumerate(names)]
    return out, names


@pytest.fixture(scope="module")
def specs(repo20: tuple[Path, list[str]]) -> list[ModelSpec]:
    out, names = repo20
    return [read_model(out / n) for n in names]


def test_twenty_models_have_unique_names_and_every_kind(
    repo20: tuple[Path, list[str]], specs: list[ModelSpec]
) -> None:
    out, names = repo20
    assert len(names) == 20 == len(set(names))
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    shapes = {(len(s.inputs), len(s.outputs)) for s in specs}
    assert (2, 2) in shapes
    assert any(t.datatype == "INT64" for s in specs for t in s.inputs)


def test_default_eight_include_mlp_embedding_and_two_in_two_out() -> None:
    first8 = plan(8)
    kinds = {e.kind for e in first8}
    assert {"mlp", "embed", "pair"} <= kinds
    sizes = [e.size_mb for e in first8]
    assert min(sizes) <= 4 and max(sizes) >= 16 and sum(sizes) < 150


def test_large_scales_two_models_to_hundreds_of_mb() -> None:
    big = [e for e in plan(8, large=True) if e.size_mb >= 100]
    assert len(big) == 2
    assert plan(1, large=True)[0].size_mb >= 100


def test_names_stay_unique_past_a_hundred() -> None:
    names = [e.name for e in plan(130)]
    assert len(set(names)) == 130


def test_every_model_parses(specs: list[ModelSpec]) -> None:
    for spec in specs:
        assert spec.error is None, spec.error
        assert spec.platform == "pytorch_libtorch"
        assert spec.max_batch_size > 0
        assert spec.versions == (1,)
        assert all(-1 not in t.dims for t in (*spec.inputs, *spec.outputs))


@pytest.mark.parametrize("batch", [1, 3, "max"])
def test_forward_matches_config(specs: list[ModelSpec], batch: int | str) -> None:
    g = torch.Generator().manual_seed(1)
    for spec in specs:
        b = spec.max_batch_size if batch == "max" else int(batch)
        model = torch.jit.load(str(spec.artifacts[1]))
        with torch.no_grad():
            outputs = as_tuple(model(*random_inputs(spec, b, g)))
        assert len(outputs) == len(spec.outputs), spec.name
        for got, want in zip(outputs, spec.outputs, strict=True):
            assert got.dtype == TORCH_DTYPES[want.datatype], (spec.name, want.name)
            assert tuple(got.shape) == (b, *want.dims), (spec.name, want.name)
            assert torch.isfinite(got).all(), (spec.name, want.name)


def test_huge_finite_inputs_give_finite_outputs(specs: list[ModelSpec]) -> None:
    for spec in specs[:4]:
        model = torch.jit.load(str(spec.artifacts[1]))
        for value in (1e30, -1e30):
            inputs = [
                torch.full((2, *t.dims), value, dtype=TORCH_DTYPES[t.datatype])
                if t.datatype == "FP32"
                else torch.full((2, *t.dims), -(2**63), dtype=torch.int64)
                for t in spec.inputs
            ]
            with torch.no_grad():
                for out in as_tuple(model(*inputs)):
                    assert torch.isfinite(out).all(), spec.name


def test_pair_sum_is_exact(specs: list[ModelSpec]) -> None:
    spec = next(s for s in specs if len(s.inputs) == 2)
    assert spec.outputs[0].name == "sum"
    model = torch.jit.load(str(spec.artifacts[1]))
    x, y = random_inputs(spec, 3, torch.Generator().manual_seed(2))
    total, _ = model(x, y)
    assert torch.equal(total, x + y)


def test_same_seed_is_byte_identical_across_processes_and_counts(
    tmp_path: Path, repo20: tuple[Path, list[str]]
) -> None:
    out20, names20 = repo20
    in_process = tmp_path / "in_process"
    names = write_examples(in_process, count=4, seed=0)
    assert names == names20[:4]
    # Another process, another hash seed, through the CLI: TorchScript emits some
    # sets, and `python -m` would otherwise save the classes under __main__.
    cli = tmp_path / "cli"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    run = subprocess.run(
        [sys.executable, "-m", "modelpool.gpu.examples", "--out", str(cli), "--count", "4"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "[4/4] wrote" in run.stderr and "wrote 4 models" in run.stdout
    expected = {k: v for k, v in digests(out20).items() if k.split("/")[0] in names}
    assert len(expected) == 8
    assert digests(in_process) == expected
    assert digests(cli) == expected


def test_other_seed_changes_every_weight_file(tmp_path: Path) -> None:
    write_examples(tmp_path / "a", count=3, seed=0)
    write_examples(tmp_path / "b", count=3, seed=1)
    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("model.pt"):
            assert a[key] != b[key], key
        else:
            assert a[key] == b[key], key  # the config is the contract, not the weights


def test_main_reports_progress_and_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--out", str(tmp_path), "--count", "2", "--seed", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "[1/2] wrote mlp_00_2mb (2.0 MB)",
        "[2/2] wrote embed_01_4mb (4.0 MB)",
    ]
    assert f"wrote 2 models (6.0 MB) to {tmp_path}" in captured.out
    assert not list(tmp_path.rglob(".*.tmp"))


def test_negative_count_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_examples(tmp_path, count=-1)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--count", "-1"])
