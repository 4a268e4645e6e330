"""Installed, not only cloned: a non-editable install into a fresh virtual environment (offline, from this tree)
runs the user's path from a folder outside the repository."""

import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_installed_package_runs_from_an_empty_folder(tmp_path, shakespeare_text):
    venv = tmp_path / "venv"
    # this interpreter's site-packages (torch, the other dependencies, the build backend; no download), through a
    # .pth file: `--system-site-packages` would give the *base* interpreter's when this one is itself a virtualenv's,
    # which lacks them (and has an older setuptools). Without pip in the venv: its bundled setuptools would shadow them
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python, nanokimi = venv / "bin" / "python", venv / "bin" / "nanokimi"
    inner = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    (Path(inner) / "outer.pth").write_text("".join(f"{p}\n" for p in sorted(outer)))
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            f"--python={python}",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    user = tmp_path / "user"
    user.mkdir()
    (tmp_path / "tiny.txt").write_text(shakespeare_text[:200_000])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args):
        result = subprocess.run([str(a) for a in args], cwd=user, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (args, result.stderr[-2000:])
        return result.stdout

    location = run(python, "-c", "import nanokimi, pathlib; print(pathlib.Path(nanokimi.__file__).resolve())")
    assert location.startswith(str(venv.resolve())), location  # the installed copy, not this checkout
    run(nanokimi, "prepare", "shakespeare_char", f"--input={tmp_path / 'tiny.txt'}")
    assert "shakespeare-char-cpu" in run(
        nanokimi, "train", "shakespeare-char-cpu", "--max_iters=20", "--eval_interval=10", "--eval_iters=2"
    )
    assert len(run(nanokimi, "sample", "out/shakespeare-char-cpu", "--max_new_tokens=40")) > 20
    assert '"loss"' in run(nanokimi, "eval", "out/shakespeare-char-cpu", "--data=data/shakespeare_char", "--batches=5")
    assert "experts.png" in run(nanokimi, "plot", "out/shakespeare-char-cpu")
    run(nanokimi, "bench", "compare", "--quick")
    assert "shakespeare-char-cpu" in (user / "BENCHMARKS.md").read_text()
    assert sorted(p.name for p in user.iterdir()) == ["BENCHMARKS.md", "assets", "data", "out"]
