"""Shared fixtures: a tiny generated dataset and composition of the real Hydra configs."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest.mock import patch

# the bf16 speed-up that the tests' runs measure (under the other tests' load, at their thread count) stays out of
# the user's ~/.cache/gqn/precision.json, which later runs at that thread count would trust
if "GQN_CACHE_DIR" not in os.environ:
    os.environ["GQN_CACHE_DIR"] = tempfile.mkdtemp(prefix="gqn-test-cache-")
    atexit.register(shutil.rmtree, os.environ["GQN_CACHE_DIR"], True)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # under pytest-xdist (make test): each worker process takes its share of the cores for torch here and for the
    # console scripts it starts (inherited); two workers each on both cores of a 2-core CPU spin on each other's
    # threads (make test measured 8 min 27 s so, 4 min 0 s with one thread each, against 7 min 55 s in one process)
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cores // _workers))

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from gqn import CONF_DIR

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
BIN = Path(sys.executable).parent

#: Overrides that shrink any training config to seconds on a CPU.
TINY = [
    "data.image_size=32", "data.batch_size=4", "data.num_workers=0", "data.val_scenes=4",
    "data.eval_batch_size=4", "model.hidden_channels=8", "model.canvas_channels=8", "model.num_steps=2",
    "model.encoder.channels=8", "trainer.max_steps=2", "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1", "trainer.enable_model_summary=false", "++callbacks.progress=null",
    "++callbacks.flythrough.frames=4",
    # experiment=default trains its first steps at half the size; the tiny runs check the full-size step
    # (tests/test_coarse.py checks the coarse one)
    "schedule.coarse_steps=0",
]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """``{root}/synthetic_rooms``: 32 px procedural rooms, 24 train / 8 test scenes, 10 views."""
    from gqn.synthetic import synthesize

    root = tmp_path_factory.mktemp("data")
    synthesize(root / "synthetic_rooms", "rooms", train_scenes=24, test_scenes=8, seed=0, image_size=32,
               views=10, scenes_per_file=8, workers=1, log=lambda *_: None)
    return root


def compose_train(overrides: list[str], out_dir: Path):
    """Compose ``conf/train.yaml`` like ``gqn-train`` would, with a run directory ``out_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
        cfg.hydra.job.num = 0
        cfg.paths.output_dir = str(out_dir.parent)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def train_cfg(data_root, tmp_path):
    """Factory: a tiny, real training config (extra overrides last)."""

    def make(*overrides: str):
        return compose_train([f"paths.data_dir={data_root}", *TINY, *overrides], tmp_path / "run")

    return make


def run_cli(prog: str, *args: str, cwd: Path, check: bool = True, timeout: int = 300):
    """Run a console script in a subprocess; returns the CompletedProcess."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    exe = shutil.which(prog, path=str(BIN)) or prog
    proc = subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{prog} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


class Probe(L.Callback):
    """A test callback recording (global_step, lr, sigma) at every training batch."""

    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.rows.append((trainer.global_step, lr, pl_module.sigma()))


def module_with_batch(cfg):
    """A GQNModule built from a train config with no trainer attached, a validation batch of its data, and the dict
    its ``self.log`` calls fill (name -> value)."""
    from hydra.utils import instantiate

    module = instantiate(cfg.module, _recursive_=False)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    logged = {}
    module.log = lambda name, value, **k: logged.__setitem__(name, value)
    return module, next(iter(dm.val_dataloader())), logged


#: Hydra overrides of in-process runs (run_main): no log files, no .hydra/ directory
QUIET = ["hydra/job_logging=none", "hydra/hydra_logging=none", "hydra.output_subdir=null"]


def run_main(prog: str, args: list[str], capsys, check: bool = False) -> tuple[int, str, str]:
    """Run a console script in-process; returns (exit code, stdout, stderr). Hydra's programs run with their
    logging and .hydra/ output off (QUIET). In-process saves the ~5 s of imports a subprocess pays (run_cli);
    use run_cli where the process itself is under test (its exit, signals, environment). Hydra's argparse takes
    the overrides as one run of positionals, so in ``args`` flags (``-m``, ``--cfg``) come before the overrides.
    It runs in the caller's working directory: pass absolute paths (or chdir to a temporary one). ``check``: a
    non-zero exit fails the test with its stderr (as run_cli's)."""
    capsys.readouterr()
    if prog in ("gqn-bench", "gqn-data"):  # argparse programs: main(argv) returns the code or exits
        from gqn import bench, data_cli

        with patch.object(sys, "argv", [prog, *args]):
            try:
                code = (bench.main if prog == "gqn-bench" else data_cli.main)(args)
            except SystemExit as exc:
                code = exc.code
    else:
        import gqn.eval
        import gqn.render
        import gqn.train

        main = {"gqn-train": gqn.train.main, "gqn-eval": gqn.eval.main, "gqn-render": gqn.render.main}[prog]
        GlobalHydra.instance().clear()
        with patch.object(sys, "argv", [prog, *args, *QUIET]):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code
        GlobalHydra.instance().clear()
    out, code = capsys.readouterr(), 0 if code is None else code
    if check and code != 0:
        raise AssertionError(f"{prog} {' '.join(args)} failed ({code}):\n{out.out}\n{out.err}")
    return code, out.out, out.err
