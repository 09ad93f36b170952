"""The built wheel, installed in a clean venv, serves from a directory full of decoys.

The checkout's folders (gateway/, gpu/, ...) install as ``modelpool.gateway``,
``modelpool.gpu``, ... through setuptools' package-dir. These tests build the real
wheel, check its layout, install it with ``pip install --no-deps`` into a fresh venv and
run its ``modelpool`` console script from a working directory whose gateway/, gpu/,
cache/, placement/, loadtests/ and modelpool/ folders are decoy packages: importing one
leaves a marker file and raises ImportError. Neither the gateway nor its workers (started
with ``python -P -m modelpool.gateway.cli worker``) may import them.

Dependencies are not installed in the clean venv (no network; torch is big): the main
venv's site-packages directory goes on PYTHONPATH. PYTHONPATH does not process .pth
files, so the checkout's editable install there stays invisible, which the tests verify.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelpool.gateway.server import READY_RE
from modelpool.loadtests.servers import wait_for_line

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: Source folder -> installed package, e.g. "gateway" -> "modelpool.gateway".
PACKAGE_DIRS = {src: pkg for pkg, src in PYPROJECT["tool"]["setuptools"]["package-dir"].items()}
#: Top-level names that must not be installed, and that the decoys take.
SOURCE_TOPS = ("gateway", "gpu", "cache", "placement", "loadtests")
DECOYS = (*SOURCE_TOPS, "modelpool")
#: What the build reads besides the package folders.
BUILD_FILES = ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "setup.cfg", "setup.py")


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip wheel`` builds from the checkout's sources.

    It builds from a copy of the sources rather than the checkout itself: setuptools
    writes build/lib and *.egg-info next to pyproject.toml, and a stale build/lib (a
    module since deleted or moved) would end up in the wheel and hide a packaging bug.
    """
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in BUILD_FILES:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    for folder in PACKAGE_DIRS:
        shutil.copytree(
            ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    out = base / "dist"
    cmd = [
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
        "--no-index", "--disable-pip-version-check", "-w", str(out), str(src),
    ]  # fmt: skip
    _run(cmd)
    wheels = list(out.glob("modelpool-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_layout(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        dist_info = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        assert len(dist_info) == 1, dist_info
        entry_points = z.read(f"{dist_info.pop()}/entry_points.txt").decode()

    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"modelpool"}, f"top-level entries besides modelpool/: {tops - {'modelpool'}}"
    assert "modelpool/gateway/cli.py" in names
    assert "modelpool = modelpool.gateway.cli:main" in entry_points

    scenarios = sorted(p.name for p in (ROOT / "loadtests" / "scenarios").glob("*.json"))
    assert scenarios
    missing = [s for s in scenarios if f"modelpool/loadtests/scenarios/{s}" not in names]
    assert not missing, f"scenarios missing from the wheel: {missing}"

    # Every module of every mapped folder (subpackages such as loadtests/peers included)
    # is in the wheel under its modelpool.* name.
    missing = []
    for folder, pkg in PACKAGE_DIRS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).as_posix()
            wanted = f"{pkg.replace('.', '/')}/{rel}"
            if "__pycache__" not in rel and wanted not in names:
                missing.append(wanted)
    assert not missing, f"modules missing from the wheel: {missing}"


def _site_dirs() -> list[str]:
    """The main venv's site-packages, for the clean venv's PYTHONPATH."""
    dirs = [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    return list(dict.fromkeys(d for d in dirs if d))


@pytest.fixture(scope="module")
def clean_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv without system site packages, holding only the wheel (no dependencies)."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    # The main venv's pip installs into the clean one (--python), sparing an ensurepip.
    cmd = [
        sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
        "--disable-pip-version-check", "install", "--no-deps", "--no-index", str(wheel),
    ]  # fmt: skip
    _run(cmd)
    assert (venv / "bin" / "modelpool").is_file()
    return venv


def _clean_env(venv: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "PYTHONSTARTUP", "VIRTUAL_ENV")
    }
    # No empty entry: an empty PYTHONPATH element would put the cwd on sys.path.
    env["PYTHONPATH"] = os.pathsep.join(_site_dirs())
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["MODELPOOL_FORCE_CPU"] = "1"
    env["VIRTUAL_ENV"] = str(venv)
    # Warm-restart state beside the venv, not in the user's home.
    env["XDG_STATE_HOME"] = str(venv.parent / "state")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


def _write_decoys(where: Path, markers: Path) -> None:
    for name in DECOYS:
        (where / name).mkdir(parents=True)
        (where / name / "__init__.py").write_text(
            "import os, pathlib, sys\n"
            f"pathlib.Path({str(markers)!r}, f'{{__name__}}-{{os.getpid()}}')"
            ".write_text(' '.join(sys.argv))\n"
            "raise ImportError('shadowed')\n"
        )


def _marker_report(markers: Path) -> list[str]:
    return [f"{p.name}: {p.read_text()}" for p in sorted(markers.iterdir())]


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _procs_of(venv: Path) -> dict[int, list[str]]:
    """Live processes running the clean venv's interpreter or scripts (zombies have no
    cmdline and do not count)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            argv = _cmdline(int(entry.name))
            if any(a.startswith(str(venv)) for a in argv[:2]):
                found[int(entry.name)] = argv
    return found


@pytest.fixture
def decoy_dir(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    cwd, markers = tmp_path / "cwd", tmp_path / "markers"
    markers.mkdir()
    _write_decoys(cwd, markers)
    yield cwd, markers


def test_installed_wheel_is_what_imports(clean_venv: Path, tmp_path: Path) -> None:
    """Outside any decoy directory: modelpool comes from the clean venv, and the old
    top-level names do not exist at all (not installed, editable install not visible)."""
    neutral = tmp_path / "neutral"
    neutral.mkdir()
    probe = (
        "import importlib.util, modelpool.gateway, modelpool.gpu, torch, tritonclient\n"
        "print(modelpool.gateway.__file__)\n"
        f"print([n for n in {SOURCE_TOPS!r} if importlib.util.find_spec(n)])\n"
    )
    r = _run(
        [str(clean_venv / "bin" / "python"), "-c", probe], cwd=neutral, env=_clean_env(clean_venv)
    )
    file, tops = r.stdout.splitlines()[-2:]
    assert Path(file).resolve().is_relative_to(clean_venv.resolve()), file
    assert tops == "[]", f"top-level packages importable from the clean venv: {tops}"


def test_serve_from_a_directory_of_decoys(
    clean_venv: Path, decoy_dir: tuple[Path, Path], tmp_path: Path
) -> None:
    import tritonclient.http as httpclient

    cwd, markers = decoy_dir
    env = _clean_env(clean_venv)
    python, modelpool = str(clean_venv / "bin" / "python"), str(clean_venv / "bin" / "modelpool")

    # The decoys bite: `python -m` puts the cwd first on sys.path.
    r = subprocess.run(
        [python, "-m", "modelpool.gateway.cli", "--help"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode != 0 and "shadowed" in r.stderr, r.stderr
    assert any(p.name.startswith("modelpool-") for p in markers.iterdir())
    for p in markers.iterdir():
        p.unlink()

    models = tmp_path / "models"
    _run([modelpool, "examples", "--out", str(models), "--count", "2"], cwd=cwd, env=env)
    assert sorted(p.name for p in models.iterdir()) == ["embed_01_4mb", "mlp_00_2mb"]
    assert not list(markers.iterdir()), _marker_report(markers)

    log_path = tmp_path / "serve.log"
    cmd = [
        modelpool, "serve", "--model-repository", str(models), "--host", "127.0.0.1",
        "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--threads", "1",
        "--device-memory-budget", "512MiB",
    ]  # fmt: skip
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=cwd, env=env
        )
    workers: dict[int, list[str]] = {}
    try:
        m = wait_for_line(proc, READY_RE, 60)
        assert m is not None, f"modelpool serve did not start:\n{log_path.read_text()}"
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        workers = {int(p): _cmdline(int(p)) for p in children}
        workers = {p: a for p, a in workers.items() if "worker" in a}
        assert workers, f"no worker process under the gateway ({proc.pid}): {children}"
        for argv in workers.values():
            assert argv[:4] == [python, "-P", "-m", "modelpool.gateway.cli"], argv
            assert argv[4] == "worker", argv

        client = httpclient.InferenceServerClient(f"127.0.0.1:{m[1]}")
        x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
        inp = httpclient.InferInput("input", [1, 64], "FP32")
        inp.set_data_from_numpy(x)
        try:
            out = client.infer("mlp_00_2mb", [inp]).as_numpy("output")
        except Exception as e:
            pytest.fail(f"inference failed: {e}\n{log_path.read_text(errors='replace')}")
        finally:
            client.close()
        assert out is not None and out.shape == (1, 16) and np.isfinite(out).all(), out
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Workers may take a moment to notice; anything still running is left behind.
        deadline = time.monotonic() + 10
        while _procs_of(clean_venv) and time.monotonic() < deadline:
            time.sleep(0.1)
        leftover = _procs_of(clean_venv)
        for pid in leftover:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    log_text = log_path.read_text(errors="replace")
    assert proc.returncode == 0, f"serve exited {proc.returncode}:\n{log_text}"
    assert not leftover, f"processes left behind after SIGINT: {leftover}"
    assert not list(markers.iterdir()), f"decoys imported: {_marker_report(markers)}\n{log_text}"
    assert "shadowed" not in log_text, log_text
