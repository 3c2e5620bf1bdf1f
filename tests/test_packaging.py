"""The distributions install and work on their own: ``python -m build`` makes an sdist
and a wheel; each installs into a fresh virtual environment (pcrfs's dependencies come
from this environment through a .pth file, so nothing is downloaded but the build
backend) and passes a smoke test: ``pcrfs --version``, ``mount.pcrfs --help`` and the
whole ``pcrfs demo`` tour (convert, mount, read, unmount) run from the installed copy.
The wheel carries the package only: no tests, results or tools."""
from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import pcrfs

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import build"], capture_output=True).returncode != 0,
    reason="the 'build' package is not installed (pip install -e '.[test]' brings it)")


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    return {"wheel": next(out.glob("*.whl")), "sdist": next(out.glob("*.tar.gz"))}


def test_the_wheel_carries_the_package_only(dists):
    names = zipfile.ZipFile(dists["wheel"]).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert top == {"pcrfs", f"pcrfs-{pcrfs.__version__}.dist-info"}, top
    assert "pcrfs/fuse/ops.py" in names and "pcrfs/store/read/reader.py" in names


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_each_distribution_installs_and_runs_the_demo(dists, kind, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # this environment's packages (numpy, pillow, mfusepy, scikit-image ...) without pcrfs itself
    ours = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if os.path.isdir(p)]
    Path(purelib, "zz-deps.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(dists[kind])],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-2000:]
    env = dict(os.environ, PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
    where = subprocess.run([str(py), "-c", "import pcrfs; print(pcrfs.__file__)"], cwd=tmp_path, env=env,
                           check=True, capture_output=True, text=True).stdout
    assert where.startswith(str(venv)), f"pcrfs imported from {where}, not from the fresh environment"
    version = subprocess.run([str(venv / "bin" / "pcrfs"), "--version"], cwd=tmp_path, env=env,
                             check=True, capture_output=True, text=True).stdout
    assert pcrfs.__version__ in version
    assert subprocess.run([str(venv / "bin" / "mount.pcrfs"), "--help"], env=env, capture_output=True,
                          timeout=60).returncode == 0
    demo = subprocess.run([str(venv / "bin" / "pcrfs"), "demo", str(tmp_path / "demo"), "--per-class", "3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "scan1" in demo.stdout and "full" in demo.stdout

