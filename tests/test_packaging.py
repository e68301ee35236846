"""A non-editable install (a wheel in a fresh venv) has the configs: gqn-train/eval/render work from it."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def _run(*cmd, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="0")
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _source_copy(dest: Path) -> Path:
    """The project's tracked files (what a fresh clone has), so that nothing of this checkout leaks in."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        names = [n for n in files.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but the usual clutter
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()
                 and not {".venv", ".git", "outputs", "data", "build"} & set(p.relative_to(ROOT).parts)]
    for name in names:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_trains_evaluates_and_renders(tmp_path, data_root):
    src = _source_copy(tmp_path / "src")
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    _run(sys.executable, "-m", "pip", "wheel", src, "--no-deps", *isolation, "-w", tmp_path / "dist", cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("gqn-*.whl")
    # a fresh venv; its dependencies (torch, lightning, ...) come from this venv's site-packages through a .pth
    # file appended after the new venv's own site-packages, so the wheel's gqn is the one imported
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    py = venv / "bin" / "python"
    purelib = Path(_run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path)
                   .stdout.strip())
    (purelib / "_gqn_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    where = _run(py, "-c", "import gqn, callbacks, data_modules; print(gqn.CONF_DIR, callbacks.__file__, "
                 "data_modules.__file__)", cwd=tmp_path).stdout.split()
    assert all(Path(p).is_relative_to(purelib) for p in where), where  # nothing from the source tree
    assert where[0] == str(purelib / "gqn" / "conf")

    bin_dir, work = venv / "bin", tmp_path / "work"
    work.mkdir()
    help_text = _run(bin_dir / "gqn-train", "--help", cwd=work).stdout
    assert "experiment:" in help_text and "default" in help_text
    for option in ("rooms_ring_camera", "shared_inference_generation", "tensorboard"):
        assert option in help_text, option
    run = work / "run"
    _run(bin_dir / "gqn-train", f"paths.data_dir={data_root}", f"hydra.run.dir={run}", f"paths.output_dir={work}",
         *TINY, "logger=csv", cwd=work)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    _run(bin_dir / "gqn-eval", f"ckpt_path={ckpt}", f"paths.data_dir={data_root}", "data.image_size=32",
         f"hydra.run.dir={work / 'eval'}", "num_workers=0", "limit_batches=1", cwd=work)
    assert (work / "eval" / "metrics.json").is_file()
    _run(bin_dir / "gqn-render", f"ckpt_path={ckpt}", f"paths.data_dir={data_root}", "data.image_size=32",
         f"hydra.run.dir={work / 'render'}", "trajectory.frames=3", "scale=1", cwd=work)
    assert (work / "render" / "flythrough.gif").is_file()
