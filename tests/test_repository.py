"""Model repository parsing with Triton's ModelConfig protobuf."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelpool.gpu.repository import ModelRepository, check_model_name, clip, read_model
from modelpool.placement.errors import InvalidInput, ModelNotFound, ModelNotReady

BASE = """name: "{name}"
platform: "pytorch_libtorch"
max_batch_size: 4
input [ {{ name: "a" data_type: TYPE_FP32 dims: [ 2, -1 ] }}, {{ name: "b" data_type: TYPE_INT64 dims: [ 1 ] }} ]
output [ {{ name: "o" data_type: TYPE_FP16 dims: [ 3 ] }} ]
{extra}
"""


def _model(
    repo: Path, name: str, versions=(1,), extra: str = "", filename: str = "model.pt"
) -> Path:
    d = repo / name
    d.mkdir(parents=True)
    (d / "config.pbtxt").write_text(BASE.format(name=name, extra=extra))
    for v in versions:
        (d / str(v)).mkdir()
        (d / str(v) / filename).write_bytes(b"x" * 10)
    return d


def test_parses_inputs_outputs_in_config_order(tmp_path: Path) -> None:
    spec = read_model(_model(tmp_path, "m"))
    assert spec.error is None
    assert [(t.name, t.datatype, t.dims) for t in spec.inputs] == [
        ("a", "FP32", (2, -1)),
        ("b", "INT64", (1,)),
    ]
    assert [(t.name, t.datatype) for t in spec.outputs] == [("o", "FP16")]
    assert spec.max_batch_size == 4 and spec.versions == (1,)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("", (3,)),
        ("version_policy: { latest: { num_versions: 2 } }", (2, 3)),
        ("version_policy: { all: {} }", (1, 2, 3)),
        ("version_policy: { specific: { versions: [1, 3, 9] } }", (1, 3)),
    ],
)
def test_version_policy(tmp_path: Path, policy: str, expected: tuple[int, ...]) -> None:
    spec = read_model(_model(tmp_path, "m", versions=(1, 2, 3), extra=policy))
    assert spec.versions == expected
    assert spec.resolve_version("") == expected[-1]
    with pytest.raises(ModelNotFound, match="no version 7"):
        spec.resolve_version("7")
    with pytest.raises(InvalidInput, match="not a version number"):
        spec.resolve_version("x")


def test_default_model_filename(tmp_path: Path) -> None:
    spec = read_model(
        _model(tmp_path, "m", extra='default_model_filename: "net.pt"', filename="net.pt")
    )
    assert spec.error is None and spec.artifacts[1].name == "net.pt"


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ('name: "m" platform: "pytorch_libtorch" input {', "config.pbtxt"),
        ('name: "other" platform: "pytorch_libtorch"', "does not match directory"),
        ('name: "m" platform: "tensorflow_savedmodel"', "not supported"),
        (
            'name: "m" platform: "pytorch_libtorch" output { name: "o" data_type: TYPE_FP32 dims: 1 }',
            "at least one input",
        ),
        (
            'name: "m" platform: "pytorch_libtorch" input { name: "a" dims: 1 } output { name: "o" data_type: TYPE_FP32 dims: 1 }',
            "no data_type",
        ),
    ],
)
def test_bad_configs_are_unavailable_with_a_reason(
    tmp_path: Path, config: str, reason: str
) -> None:
    d = _model(tmp_path, "m")
    (d / "config.pbtxt").write_text(config)
    spec = read_model(d)
    assert spec.error is not None and reason in spec.error
    with pytest.raises(ModelNotReady, match="'m'"):
        spec.resolve_version("")


def test_missing_artifact_and_config(tmp_path: Path) -> None:
    (tmp_path / "noconfig" / "1").mkdir(parents=True)
    assert "config.pbtxt is missing" in (read_model(tmp_path / "noconfig").error or "")
    d = _model(tmp_path, "noartifact", versions=())
    assert "no version directory holds model.pt" in (read_model(d).error or "")


def test_repository_lists_all_finds_new_models_and_rejects_escapes(tmp_path: Path) -> None:
    _model(tmp_path, "a")
    _model(tmp_path, "broken").joinpath("config.pbtxt").write_text("garbage {")
    repo = ModelRepository(tmp_path)
    assert repo.names() == ["a", "broken"]
    assert repo.get("broken").error
    _model(tmp_path, "late")
    assert repo.get("late").error is None  # dropped in after start: found on first use
    for bad in ("..", "../etc", "a/b", "", "a..b"):
        with pytest.raises(InvalidInput):
            check_model_name(bad)
    with pytest.raises(ModelNotFound):
        repo.get("absent")


def test_modelpool_parameters_pin_and_declared_size(tmp_path: Path) -> None:
    extra = (
        'parameters { key: "modelpool.pinned" value { string_value: "true" } }\n'
        'parameters { key: "modelpool.estimated_bytes" value { string_value: "64MB" } }'
    )
    spec = read_model(_model(tmp_path, "m", extra=extra))
    assert spec.error is None and spec.pinned and spec.estimated_bytes(1) == 64_000_000
    d = _model(
        tmp_path,
        "bad",
        extra='parameters { key: "modelpool.pinned" value { string_value: "maybe" } }',
    )
    assert "modelpool.pinned" in (read_model(d).error or "")


def test_artifact_sizes_are_recorded_and_a_deleted_file_never_raises(tmp_path: Path) -> None:
    """Placement asks every resident model's size on every plan: from the scan, never
    from the disk, so a file deleted since cannot make a plan fail."""
    d = _model(tmp_path, "m", versions=(1, 2), extra="version_policy: { all: {} }")
    (d / "2" / "model.pt").write_bytes(b"x" * (3 << 20))
    spec = read_model(d)
    assert spec.artifact_sizes == {1: 10, 2: 3 << 20}
    assert spec.artifact_bytes(2) == 3 << 20
    assert spec.estimated_bytes(1) == 1 << 20  # the floor
    assert spec.estimated_bytes(2) == int((3 << 20) * 1.25)
    for v in (1, 2):
        (d / str(v) / "model.pt").unlink()
    assert spec.artifact_bytes(2) == 3 << 20 and spec.estimated_bytes(2) == int((3 << 20) * 1.25)
    assert spec.artifact_bytes(7) == 0  # no such version: nothing to reserve


@pytest.mark.parametrize(
    "bad",
    [
        "a" * 256,
        "a" * 100_000,
        "m\n",
        "m\0",
        "é",
        "mlp\u200b",
        ".",
        ".hidden",
        "a/../b",
        "..%2F",
        " m",
    ],
)
def test_names_that_cannot_be_directories_are_invalid_input(tmp_path: Path, bad: str) -> None:
    repo = ModelRepository(tmp_path)
    with pytest.raises(InvalidInput, match="not allowed") as err:
        repo.get(bad)
    assert len(err.value.message) < 200  # a long name is clipped in the message
    with pytest.raises(InvalidInput):
        repo.refresh(bad)


def test_longest_name_is_well_formed_and_not_found(tmp_path: Path) -> None:
    # 255 characters is NAME_MAX: asking the file system about it must answer "absent"
    # (a longer name once raised OSError: File name too long, a 500).
    with pytest.raises(ModelNotFound):
        ModelRepository(tmp_path).get("a" * 255)


@pytest.mark.parametrize(
    ("version", "error"),
    [
        ("+1", InvalidInput),
        (" 1", InvalidInput),
        ("1_0", InvalidInput),
        ("\u0661", InvalidInput),  # ARABIC-INDIC DIGIT ONE: int() would take it
        ("-1", InvalidInput),
        ("9" * 20, ModelNotFound),
        ("9" * 5000, ModelNotFound),  # int() refuses past 4300 digits
        ("0", ModelNotFound),
    ],
)
def test_version_strings(tmp_path: Path, version: str, error: type[Exception]) -> None:
    spec = read_model(_model(tmp_path, "m"))
    with pytest.raises(error) as err:
        spec.resolve_version(version)
    assert len(str(err.value)) < 300
    assert spec.resolve_version("1") == 1 and spec.resolve_version(1) == 1


def test_clip_bounds_client_strings() -> None:
    assert clip("short") == "short"
    assert clip("x" * 1000) == "x" * 64 + "...(1000 chars)"
    assert clip(12345, limit=3) == "123...(5 chars)"
