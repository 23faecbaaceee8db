"""The wheel installs with --no-deps into a fresh venv beside an existing torch, and works from there.

The fresh venv is made from the base interpreter; a .pth file appends the site-packages of the environment
running the tests (torch and every other dependency, nothing downloaded). Paths listed in a .pth file are
added without processing the .pth files inside them, so the editable install of this checkout is not seen:
`hubtool` can only come from the wheel. About 40 s (two RTN runs of a tiny model, ~12 s each).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _version() -> str:
    """hubtool's version as written in hubtool/__about__.py."""
    return re.search(r'__version__ = "([^"]+)"', (REPO / "hubtool" / "__about__.py").read_text()).group(1)


def _env() -> dict[str, str]:
    """The environment of the commands: offline, and no PYTHONPATH that could reach the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PIP_NO_INDEX="1")
    return env


def _run(args, cwd: Path) -> subprocess.CompletedProcess:
    """Run a command; fail the test with its output if it fails."""
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"{args}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from this checkout (hatchling, no build isolation: nothing downloaded)."""
    out = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    _run([*pip, "-w", out, REPO], cwd=out)
    (whl,) = out.glob("hubtool-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (--no-deps) and the test environment's packages appended."""
    root = tmp_path_factory.mktemp("fresh")
    env = root / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", "--without-pip", env], cwd=root)
    python = env / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel], cwd=root)
    site = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).stdout.strip()
    )
    (site / "zz_reuse_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env


def test_wheel_ships_templates_kernel_sources_and_assets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    pkg = REPO / "hubtool"
    wanted = [
        *(pkg / "templates").rglob("*.j2"),
        *(pkg / "kernels" / "cpu").glob("*.cpp"),
        *(pkg / "kernels" / "cpu").glob("*.h"),
        *(p for p in (pkg / "assets").iterdir() if p.is_file() and p.suffix != ".pyc"),
    ]
    assert len([p for p in wanted if p.suffix == ".cpp"]) >= 3 and any(p.suffix == ".png" for p in wanted)
    missing = sorted(str(p.relative_to(REPO)) for p in wanted if str(p.relative_to(REPO)) not in names)
    assert missing == []
    assert "optimum/commands/register/register_hubtool.py" in names
    assert f"hubtool-{_version()}.dist-info/entry_points.txt" in names


def test_installed_wheel_is_what_runs(venv, tmp_path):
    code = "import hubtool, torch; print(hubtool.__file__); print(torch.__file__)"
    hub_file, torch_file = _run([venv / "bin" / "python", "-c", code], cwd=tmp_path).stdout.split()
    assert Path(hub_file).is_relative_to(venv) and not Path(hub_file).is_relative_to(REPO)
    assert Path(torch_file).is_relative_to(sysconfig.get_paths()["purelib"])  # torch reused, not installed
    out = _run([venv / "bin" / "hubtool", "--version"], cwd=tmp_path).stdout
    assert out.strip() == f"hubtool {_version()}"


def test_installed_wheel_quantizes_like_the_checkout(venv, tiny_models, tmp_path):
    src = tiny_models("llama")
    args = ["quantize", src, "--method", "rtn", "--formats", "hubtool", "-o"]
    _run([venv / "bin" / "hubtool", *args, tmp_path / "wheel_run"], cwd=tmp_path)
    _run([Path(sys.executable).with_name("hubtool"), *args, tmp_path / "checkout_run"], cwd=tmp_path)

    def files(run: Path) -> dict[str, bytes]:
        export = run / "formats" / "hubtool"
        return {str(p.relative_to(export)): p.read_bytes() for p in sorted(export.rglob("*")) if p.is_file()}

    got, want = files(tmp_path / "wheel_run"), files(tmp_path / "checkout_run")
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= set(got)
    assert any(name.endswith(".safetensors") for name in got)
    assert b'"quant_method": "hubtool"' in got["config.json"]
    assert sorted(got) == sorted(want) and got == want
