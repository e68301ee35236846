"""Console scripts end to end, in subprocesses (run_cli): gqn-train/eval/render, multirun, resume after SIGKILL, DDP;
`--help` and `--cfg`, which only print, in-process (run_main)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import BIN, TINY, run_cli, run_main
from PIL import Image


def tiny(data_root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"paths.data_dir={data_root}", f"hydra.run.dir={run_dir}", f"paths.output_dir={run_dir.parent}",
            *TINY, "logger=csv", *extra]


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory) -> Path:
    """A tiny checkpoint from the acceptance command `gqn-train trainer.max_steps=5 model.num_steps=4`."""
    run = tmp_path_factory.mktemp("cli") / "run"
    proc = run_cli("gqn-train", *tiny(data_root, run, "trainer.max_steps=5", "model.num_steps=4",
                                      "trainer.val_check_interval=5"), cwd=run.parent)
    # the precision ${gqn_precision:cpu} chose is said in one line (with the bf16 probe's ratio where it ran)
    assert any(line.startswith("gqn-train: precision 32-true") or line.startswith("gqn-train: precision bf16-mixed")
               for line in proc.stdout.splitlines()), proc.stdout[-2000:]
    return run


def test_train_help_lists_config_groups(capsys):
    out = run_main("gqn-train", ["--help"], capsys, check=True)[1]  # in-process: Hydra prints the help and exits 0
    for group in ("data:", "model:", "model/encoder:", "model/core:", "schedule:", "trainer:", "logger:",
                  "callbacks:", "experiment:", "debug:"):
        assert group in out, group
    for option in ("tower", "pool", "pyramid", "unshared", "shared_inference_generation", "rooms_ring_camera"):
        assert option in out, option


def test_help_and_cfg_do_not_import_torch_or_lightning():
    """`--help` and `--cfg job` of gqn-train/eval/render, and `--help` of gqn-data/bench, only print: they answer
    without importing torch or Lightning (~1 s on 2 cores instead of 7-10 s; gqn-bench's took 2.5 s). One fresh
    interpreter, as a console script starts."""
    code = """
import sys
from gqn import bench, data_cli, eval, render, train
runs = [(p, m.main, f) for p, m in (("gqn-train", train), ("gqn-eval", eval), ("gqn-render", render))
        for f in (["--help"], ["--cfg", "job"])]
for prog, main, flag in runs + [("gqn-data", data_cli.main, ["--help"]), ("gqn-bench", bench.main, ["--help"])]:
    sys.argv = [prog, *flag]
    try:
        main()
    except SystemExit as exit:
        assert exit.code in (0, None), (prog, flag, exit.code)
print("LOADED", sorted(m for m in ("torch", "lightning", "tfrecord", "gcsfs") if m in sys.modules))
"""
    proc = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("== Configuration groups ==") == 3 and "ckpt_path:" in proc.stdout, proc.stdout[-2000:]
    assert "usage: gqn-data" in proc.stdout and "usage: gqn-bench" in proc.stdout, proc.stdout[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "LOADED []", proc.stdout[-500:]


def test_train_leaves_checkpoint_logs_and_latest_link(trained):
    ckpt = trained / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 5
    assert state["hyper_parameters"]["model"]["num_steps"] == 4
    assert (trained.parent / "latest").resolve() == trained.resolve()
    assert list((trained / "media").glob("images_reconstructions_*.png"))
    metrics = (trained / "csv").rglob("metrics.csv")
    assert any("val/elbo" in p.read_text() for p in metrics)


def test_eval_writes_metrics_json(trained, data_root, tmp_path):
    run_cli("gqn-eval", f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}", f"paths.data_dir={data_root}",
            "data.image_size=32", f"hydra.run.dir={tmp_path}", "num_workers=0", cwd=tmp_path)
    report = json.loads((tmp_path / "metrics.json").read_text())
    m = report["metrics"]
    for key in ("psnr_model", "psnr_nearest_view", "psnr_mean_view", "ssim_model", "elbo", "nll", "kl",
                "bits_per_pixel"):
        assert np.isfinite(m[key]), key
    assert m["elbo"] == pytest.approx(m["nll"] + m["kl"], rel=1e-4)
    assert report["global_step"] == 5 and report["context_size"] == 5
    # the PSNRs again, by hand in numpy over every test scene (same fixed views: seed 0, 5 context views)
    from data_modules import GQNDataModule
    from gqn.eval import load_module

    module = load_module(str(trained / "checkpoints" / "last.ckpt"))
    dm = GQNDataModule(data_root, "synthetic_rooms", batch_size=3, context_size=5, image_size=32, num_workers=0,
                       seed=0)
    psnrs = {"model": [], "nearest_view": [], "mean_view": []}
    for batch in dm.test_dataloader():
        ctx, poses = batch["context_images"].numpy().astype(np.float64), batch["context_poses"].numpy()
        target, query = batch["query_images"].numpy().astype(np.float64), batch["query_poses"].numpy()
        render = module.sample(batch, mean=True).numpy().astype(np.float64)
        for i in range(len(target)):
            nearest = int(np.argmin([((p - query[i]) ** 2).sum() for p in poses[i]]))
            for name, img in (("model", render[i]), ("nearest_view", ctx[i, nearest]), ("mean_view", ctx[i].mean(0))):
                psnrs[name].append(-10 * np.log10(max(((img - target[i]) ** 2).mean(), 1e-4)))
    assert len(psnrs["model"]) == 8  # every test scene
    for name, values in psnrs.items():
        assert m[f"psnr_{name}"] == pytest.approx(np.mean(values), abs=2e-3), name
    gain = np.mean(psnrs["model"]) - np.mean(psnrs["nearest_view"])
    assert m["psnr_gain_over_nearest_view_db"] == pytest.approx(gain, abs=4e-3)


def test_render_writes_gif_mp4_and_sheet(trained, data_root, tmp_path):
    run_cli("gqn-render", f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}", f"paths.data_dir={data_root}",
            "data.image_size=32", f"hydra.run.dir={tmp_path}", "trajectory.frames=7", "scale=1",
            "num_context=2", cwd=tmp_path)
    gif = iio.imread(tmp_path / "flythrough.gif")
    assert gif.shape[0] == 7 and gif.shape[1:3] == (32, 32)
    mp4 = iio.imread(tmp_path / "flythrough.mp4", plugin="pyav") if _has_pyav() else None
    if mp4 is not None:
        assert mp4.shape[0] == 7
    assert (tmp_path / "flythrough.mp4").stat().st_size > 0
    info = json.loads((tmp_path / "render.json").read_text())
    poses = np.array(info["poses"])
    radius = np.hypot(poses[:, 0], poses[:, 1])
    assert np.allclose(radius, radius[0], atol=1e-5)  # a ring
    assert np.allclose(poses[:, 2], poses[0, 2])  # at one height
    yaw = np.arctan2(poses[:, 3], poses[:, 4])
    inward = np.arctan2(-poses[:, 1], -poses[:, 0])
    assert np.allclose(np.cos(yaw - inward), 1, atol=1e-5)  # looking at the centre
    assert Image.open(tmp_path / "contact_sheet.png").size[0] >= 32 * 7


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def test_render_from_own_images(trained, tmp_path):
    """A fly-through from a context file of the user's own images and cameras; a missing checkpoint is one line and
    exit 2 (the other bad inputs: rows of tests/test_faults.py's CASES, render-context-* and more)."""
    ckpt = f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    good = tmp_path / "ctx.yaml"
    good.write_text("images: [a.png]\ncameras: [[1.0, 0.0, 0.5, 3.14, -0.2]]\n")
    run_cli("gqn-render", ckpt, f"context_file={good}", f"hydra.run.dir={tmp_path / 'out'}",
            "trajectory.frames=3", cwd=tmp_path)
    assert iio.imread(tmp_path / "out" / "flythrough.gif").shape[0] == 3
    # a bad input, through the console script (the other bad inputs are test_faults.py's in-process CASES): one
    # line on stderr, no traceback, exit 2
    proc = run_cli("gqn-render", "ckpt_path=/nope/last.ckpt", f"context_file={good}",
                   f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["gqn-render: error: checkpoint not found: /nope/last.ckpt (give "
                                                "ckpt_path=<run>/checkpoints/last.ckpt)"], proc.stderr


def test_missing_data_is_one_clear_line(tmp_path):
    proc = run_cli("gqn-train", f"paths.data_dir={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'r'}",
                   "logger=none", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "gqn-data synth" in proc.stderr and "nowhere" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_multirun_two_jobs(data_root, tmp_path):
    args = [a for a in tiny(data_root, tmp_path / "unused") if not a.startswith("hydra.run.dir")]
    run_cli("gqn-train", "-m", "seed=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}", *args, "logger=wandb",
            cwd=tmp_path)
    jobs = sorted((tmp_path / "sweep").glob("[0-9]"))
    assert [j.name for j in jobs] == ["0", "1"]
    run_ids = set()
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
        (offline,) = (job / "wandb").glob("offline-run-*")
        run_ids.add(offline.name.rsplit("-", 1)[-1])
    assert len(run_ids) == 2  # wandb.finish() between jobs: one run per job


def test_resume_after_sigkill(data_root, tmp_path):
    """Kill a run with SIGKILL, resume from its last.ckpt: same step, LR and sigma as the schedule says."""
    run = tmp_path / "run"
    args = tiny(data_root, run, "trainer.max_steps=100000", "callbacks.last_checkpoint.every_n_train_steps=3",
                "trainer.val_check_interval=1000", "schedule=paper", "schedule.lr_steps=1000",
                "schedule.sigma_steps=1000")
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen([str(BIN / "gqn-train"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    step = 0
    while time.time() < deadline:
        time.sleep(1)
        if ckpt.exists():
            try:
                step = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
            except Exception:  # caught mid-write
                continue
            if step >= 6:
                break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert step >= 6, "no checkpoint before the deadline"
    step = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    resumed = tmp_path / "resumed"
    run_cli("gqn-train", *tiny(data_root, resumed, f"ckpt_path={ckpt}", f"trainer.max_steps={step + 2}",
                               "trainer.val_check_interval=1000", "schedule=paper", "schedule.lr_steps=1000",
                               "schedule.sigma_steps=1000", "trainer.log_every_n_steps=1"), cwd=tmp_path)
    state = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == step + 2
    lr = state["optimizer_states"][0]["param_groups"][0]["lr"]
    assert lr == pytest.approx(5e-4 + (5e-5 - 5e-4) * (step + 2) / 1000, rel=1e-9)
    import csv

    (metrics,) = (resumed / "csv").rglob("metrics.csv")
    rows = [r for r in csv.DictReader(metrics.read_text().splitlines()) if r.get("train/sigma")]
    first = rows[0]
    assert int(first["step"]) == step  # continues where the killed run stopped
    assert float(first["train/sigma"]) == pytest.approx(2.0 + (0.7 - 2.0) * step / 1000, rel=1e-6)


def test_ddp_two_cpu_processes(data_root, tmp_path):
    run = tmp_path / "ddp"
    # 125 steps: from the pace of steps 0-100 the LR line's horizon is broadcast from rank 0 at step 100
    # (schedule.lr_fit_max_time under the default experiment's time cap; 15 min 30 s do not bend the line); a
    # collective that one rank skipped would hang
    proc = run_cli("gqn-train", *tiny(data_root, run, "trainer=ddp", "trainer.max_steps=125",
                                      "trainer.val_check_interval=125",
                                      "callbacks.last_checkpoint.every_n_train_steps=25"), cwd=tmp_path, timeout=400)
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr  # two processes joined the gloo group
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 125
    metrics = (run / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/lr_steps" in metrics.splitlines()[0]  # rank 0 logged the horizon after the broadcast
    assert state["lr_schedulers"][0]["lr_lambdas"][0]["horizon"] == 125  # the cap is far: the line kept
    # model.geometry.depth_from_cameras (the default): the first step measured the cameras' spread under DDP (its
    # all_gather ran on both processes, or the run would hang; the mean itself: tests/test_train.py)
    assert float(state["state_dict"]["model.geometry.cameras_measured"]) == 1.0


def test_optuna_sweep_runs_two_trials(data_root, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    args = [a for a in tiny(data_root, tmp_path / "unused") if not a.startswith("hydra.run.dir")]
    run_cli("gqn-train", "hparams_search=optuna", "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", *args, cwd=tmp_path)
    result = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    assert "best_params" in result and "schedule.lr_init" in result
    assert len(list((tmp_path / "sweep").glob("[0-9]/checkpoints/last.ckpt"))) == 2


def test_slurm_launcher_config_composes(capsys):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    # the overrides last: run_main appends its own, and Hydra's argparse takes them as one run of positionals
    out = run_main("gqn-train", ["--cfg", "hydra", "--package", "hydra.launcher", "hydra/launcher=slurm"], capsys,
                   check=True)[1]
    assert "SlurmLauncher" in out and "gpus_per_node: 1" in out


def test_resume_defaults_fill_only_options_a_checkpoint_lacks_where_the_code_before_them_differs():
    """A checkpoint from before an option resumes with the class default of that option (how the code behaved
    before it existed) where this command's config differs; a YAML list equal to a tuple default is no difference."""
    from gqn.cli import resume_defaults

    cfg = {"_target_": "gqn.model.GQN", "geometry_mix_widths": [32], "geometry_match": 0.0,
           "geometry": {"_target_": "gqn.model.geometry.PlaneSweep", "visibility": True, "depths": 8}}
    old = {"hyper_parameters": {"model": {"_target_": "gqn.model.GQN",
                                          "geometry": {"_target_": "gqn.model.geometry.PlaneSweep", "depths": 8}}}}
    assert resume_defaults(old, cfg) == {"model.geometry.visibility": False}  # PlaneSweep's default, not the YAML's
    cfg["geometry_mix_widths"] = [64, 64]
    assert resume_defaults(old, cfg)["model.geometry_mix_widths"] == [32]
    saved = {"hyper_parameters": {"model": {**old["hyper_parameters"]["model"], "geometry_mix_widths": [64, 64]}}}
    assert "model.geometry_mix_widths" not in resume_defaults(saved, cfg)
