"""Faults and bad input: every mistake ends as ONE line and the documented exit code, nothing hangs, no
non-finite checkpoint is written or accepted, and an interrupted run resumes at its exact step.

The table ``CASES`` is the contract of docs/errors.md: each case runs the entry point in-process (Hydra's
``main`` with ``sys.argv`` set) and asserts the exit code and the one line on stderr. Every test runs under
a timeout (pytest-timeout), so a regression to a hang fails instead of blocking CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BIN, TINY, Probe, compose_train, run_main
from omegaconf import open_dict
from records_helper import make_example, record_offsets, write_dataset, write_file

from data_modules import GQNDataError, SceneStream, dataset_info
from gqn.train import train

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(data_root, tmp_path_factory) -> dict:
    """Files the cases point at: a plain file, a garbage .ckpt, a tiny trained checkpoint and a NaN copy
    of it, a dataset with a damaged record, 32 px frames under a DeepMind name, broken dataset dirs, gqn-render
    context files with bad images, cameras and YAML."""
    tmp = tmp_path_factory.mktemp("faults")
    (tmp / "plain_file").write_text("not a directory\n")
    (tmp / "garbage.ckpt").write_bytes(b"\x00not a checkpoint" * 10)
    cfg = compose_train([f"paths.data_dir={data_root}", *TINY, "logger=none", "callbacks=none"], tmp / "trained")
    train(cfg)
    good = tmp / "trained" / "checkpoints" / "last.ckpt"
    state = torch.load(good, map_location="cpu", weights_only=False)
    key = next(k for k, v in state["state_dict"].items() if v.is_floating_point())
    state["state_dict"][key] = torch.full_like(state["state_dict"][key], float("nan"))
    torch.save(state, tmp / "nan.ckpt")
    # a copy of the data whose 2nd train record has a flipped data byte
    corrupt = tmp / "corrupt"
    shutil.copytree(data_root / "synthetic_rooms", corrupt / "synthetic_rooms")
    first = sorted((corrupt / "synthetic_rooms" / "train").glob("*.tfrecord"))[0]
    offset = record_offsets(first)[1][0]
    blob = bytearray(first.read_bytes())
    blob[offset + 12 + 40] ^= 0x40
    first.write_bytes(bytes(blob))
    # a test split with x.tfrecord beside x.tfrecords and one sidecar x.npz that does not say whose it is
    twins = tmp / "twins" / "synthetic_rooms"
    shutil.copytree(data_root / "synthetic_rooms", twins)
    twin = sorted((twins / "test").glob("*.tfrecord"))[0]
    shutil.copyfile(twin, twin.with_suffix(".tfrecords"))
    side = twins / "objects" / "test" / (twin.stem + ".npz")
    with np.load(side) as z:
        unnamed = {k: z[k] for k in z.files if k != "record"}
    np.savez_compressed(side, **unnamed)
    # a damaged sidecar (cut short); a sidecar of other records (the train split's, copied over the test split's)
    for name, damage in (("cutsidecar", "cut"), ("stalesidecar", "stale")):
        shutil.copytree(data_root / "synthetic_rooms", tmp / name / "synthetic_rooms")
        side = tmp / name / "synthetic_rooms" / "objects" / "test" / "001-of-001.npz"
        if damage == "cut":
            side.write_bytes(side.read_bytes()[:3000])
        else:
            shutil.copyfile(tmp / name / "synthetic_rooms" / "objects" / "train" / "001-of-003.npz", side)
    # 32 px frames under rooms_ring_camera (64 px in DeepMind's table)
    wrong = tmp / "wrong"
    shutil.copytree(data_root / "synthetic_rooms", wrong / "rooms_ring_camera", ignore=shutil.ignore_patterns("*.json"))
    # gqn-data verify: an empty train split; a dataset without test/
    write_dataset(tmp / "empty_train", "rooms_ring_camera", train=[], test=[[100, 101]])
    (tmp / "empty_train" / "rooms_ring_camera" / "train").mkdir(parents=True)
    write_dataset(tmp / "no_test", "rooms_ring_camera", train=[[0, 1]], test=[])
    # a generated dataset whose card was cut short (a full disk, an interrupted copy)
    shutil.copytree(data_root / "synthetic_rooms", tmp / "badcard" / "synthetic_rooms")
    (tmp / "badcard" / "synthetic_rooms" / "dataset.json").write_text('{"image_size": 32,')
    # another writer's dataset (no dataset.json) whose frames are not square: 48x32 PNGs
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 32)).save(buf, format="PNG")
    write_file(tmp / "other" / "other_rooms" / "train" / "1-of-1.tfrecord",
               [make_example([buf.getvalue()] * 10, [0.0] * 50)])
    # gqn-render context files: an image that is not one; a camera that is not finite
    (tmp / "not_an_image.png").write_text("not a png\n")
    (tmp / "ctx_bad_image.yaml").write_text("images: [not_an_image.png]\ncameras: [[0, 0, 0.5, 0, 0]]\n")
    (tmp / "ctx_nan_camera.yaml").write_text("images: [not_an_image.png]\ncameras: [[.nan, 0, 0.5, 0, 0]]\n")
    # ... an image of another size than the model's; a camera of three numbers; YAML cut short; a good file
    Image.new("RGB", (16, 16)).save(tmp / "small.png")
    Image.new("RGB", (32, 32)).save(tmp / "black.png")
    (tmp / "ctx_small_image.yaml").write_text("images: [small.png]\ncameras: [[1, 0, 0.5, 0, 0]]\n")
    (tmp / "ctx_short_camera.yaml").write_text("images: [black.png]\ncameras: [[1, 0, 0.5]]\n")
    (tmp / "ctx_cut.yaml").write_text("images: [black.png")
    (tmp / "ctx_good.yaml").write_text("images: [black.png]\ncameras: [[1.0, 0.0, 0.5, 3.14, -0.2]]\n")
    return {"tmp": tmp, "data": data_root, "file": tmp / "plain_file", "garbage": tmp / "garbage.ckpt",
            "ckpt": good, "nan_ckpt": tmp / "nan.ckpt", "corrupt": corrupt, "corrupt_file": first,
            "corrupt_offset": offset, "wrong": wrong, "twins": twins}


def error_line(prog: str, err: str) -> str:
    """The one line of a failed command: no traceback, exactly one ``prog...: error:`` line on stderr."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if re.match(rf"{prog}( \w+)?: error: ", ln)]
    assert len(lines) == 1, err
    others = [ln for ln in err.splitlines() if ln.strip() and ln not in lines and not ln.startswith("gqn-train: ckpt")]
    assert not others, err
    return lines[0]


# ---------------------------------------------------------------------------------------- the contract
def _train(w, *extra):
    return [f"paths.data_dir={w['data']}", *TINY, "logger=none", f"hydra.run.dir={w['tmp']}/run",
            f"paths.output_dir={w['tmp']}/out", *extra]


def _render(w, *extra):
    return [f"ckpt_path={w['ckpt']}", f"paths.data_dir={w['data']}", "data.image_size=32", "trajectory.frames=2",
            f"hydra.run.dir={w['tmp']}/re", *extra]


def _eval(w, *extra):
    return [f"paths.data_dir={w['data']}", "data.image_size=32", "num_workers=0", f"hydra.run.dir={w['tmp']}/ev",
            f"paths.output_dir={w['tmp']}/out", *extra]


# (id, program, argument builder, exit code, fragments of the one line); ids are the rows of docs/errors.md
CASES = [
    ("batch-size-0", "gqn-train", lambda w: _train(w, "data.batch_size=0"), 2,
     ["data.batch_size must be an integer >= 1, got 0"]),
    ("batch-size-negative", "gqn-train", lambda w: _train(w, "data.batch_size=-4"), 2,
     ["data.batch_size must be an integer >= 1, got -4"]),
    ("batch-size-float", "gqn-train", lambda w: _train(w, "data.batch_size=1.5"), 2,
     ["data.batch_size must be an int, got 1.5 (float)"]),
    ("eval-batch-size-0", "gqn-train", lambda w: _train(w, "data.eval_batch_size=0"), 2,
     ["data.eval_batch_size must be an integer >= 1, got 0"]),
    ("num-workers-negative", "gqn-train", lambda w: _train(w, "data.num_workers=-1"), 2,
     ["data.num_workers must be an integer >= 0, got -1"]),
    ("shuffle-buffer-0", "gqn-train", lambda w: _train(w, "data.shuffle_buffer=0"), 2,
     ["data.shuffle_buffer must be an integer >= 1, got 0"]),
    ("val-scenes-0", "gqn-train", lambda w: _train(w, "data.val_scenes=0"), 2,
     ["data.val_scenes must be an integer >= 1, got 0"]),
    ("num-steps-abc", "gqn-train", lambda w: _train(w, "model.num_steps=abc"), 2,
     ["model.num_steps must be an int, got 'abc' (str)"]),
    ("canvas-kernel-6", "gqn-train", lambda w: _train(w, "model.canvas_kernel=6"), 2,
     ["canvas_kernel must be 4 (the paper's 4x4 blocks) or 8 (overlapping 8x8 blocks), got 6"]),
    ("kernel-size-even", "gqn-train", lambda w: _train(w, "model.step_kernel_size=4"), 2,
     ["model.step_kernel_size must be odd (3, 5, ...), got 4"]),
    ("dilation-0", "gqn-train", lambda w: _train(w, "model.dilation=0"), 2,
     ["model.dilation must be an integer >= 1, got 0"]),
    ("lr-scales-unknown", "gqn-train", lambda w: _train(w, "+module.lr_scales={generator.cores:0.4}"), 2,
     ["module.lr_scales: 'generator.cores' names no parameter of the model; names start with encoder, generator"]),
    ("lr-scales-number", "gqn-train", lambda w: _train(w, "module.lr_scales=0.5"), 2,
     ["module.lr_scales must be {parameter-name prefix: factor}, e.g. 'module.lr_scales={generator.generation_cores:"
      "0.4}', got 0.5"]),
    ("lr-scales-0", "gqn-train", lambda w: _train(w, "+module.lr_scales={encoder:0}"), 2,
     ["module.lr_scales.encoder must be a number > 0 (a factor on the LR), got 0"]),
    ("lr-scales-one-cycle", "gqn-train", lambda w: _train(w, "~module.lr_scheduler", "+module.lr_scheduler={_target_:"
     "torch.optim.lr_scheduler.OneCycleLR,_partial_:true,max_lr:0.001,total_steps:100}"), 2,
     ["module.lr_scheduler (OneCycleLR) reset the parameter groups' LRs and dropped module.lr_scales "
      "{'generator.generation_cores': 0.4, 'geometry': 3}: use one that multiplies the LR (LambdaLR; the default "
      "gqn.schedules.linear_lr) or set module.lr_scales=null"]),
    ("encoder-channels-abc", "gqn-train", lambda w: _train(w, "model.encoder.channels=wide"), 2,
     ["model.encoder.channels must be an int, got 'wide' (str)"]),
    ("max-steps-text", "gqn-train", lambda w: _train(w, "trainer.max_steps=ten"), 2,
     ["trainer.max_steps must be an int, got 'ten' (str)"]),
    ("kl-weight-text", "gqn-train", lambda w: _train(w, "module.kl_weight=heavy"), 2,
     ["module.kl_weight must be a number, got 'heavy' (str)"]),
    ("skip-corrupt-text", "gqn-train", lambda w: _train(w, "data.skip_corrupt=maybe"), 2,
     ["data.skip_corrupt must be true or false, got 'maybe' (str)"]),
    ("precision-31", "gqn-train", lambda w: _train(w, "trainer.precision=31"), 2,
     ["trainer.precision must be one of", "got 31 (int)"]),
    ("context-size-0", "gqn-train", lambda w: _train(w, "data.context_size=0"), 2,
     ["context_size must be >= 1"]),
    ("context-size-10", "gqn-train", lambda w: _train(w, "data.context_size=10"), 2,
     ["needs 11 views per scene but synthetic_rooms has 10; use at most 9"]),
    ("unknown-dataset", "gqn-train", lambda w: _train(w, "data.dataset=rooms_ring"), 2,
     ["unknown dataset 'rooms_ring'", "rooms_ring_camera", "synthetic_rooms, synthetic_shepard_metzler"]),
    ("other-writer-frames-not-square", "gqn-train",
     lambda w: _train(w, f"paths.data_dir={w['tmp']}/other", "data.dataset=other_rooms"), 2,
     ["other_rooms/train/1-of-1.tfrecord: frames are 48x32; the GQN reads square frames", "crop or pad them"]),
    ("data-dir-is-a-file", "gqn-train", lambda w: _train(w, f"paths.data_dir={w['file']}"), 2,
     ["plain_file is a file, not a directory: paths.data_dir (GQN_DATA_DIR) must be the directory"]),
    ("data-dir-missing", "gqn-train", lambda w: _train(w, f"paths.data_dir={w['tmp']}/nowhere"), 2,
     ["dataset 'synthetic_rooms' not found: no directory", "nowhere/synthetic_rooms",
      "gqn-data synth --family rooms --out"]),
    ("run-dir-under-a-file", "gqn-train", lambda w: _train(w, f"hydra.run.dir={w['file']}/run"), 2,
     ["cannot write the run directory", "plain_file is a file", "set hydra.run.dir=<a writable directory>"]),
    ("run-dir-unwritable", "gqn-train", lambda w: _train(w, "hydra.run.dir=/proc/gqn-run"), 2,
     ["cannot write the run directory /proc/gqn-run"]),
    ("ckpt-missing", "gqn-train", lambda w: _train(w, f"ckpt_path={w['tmp']}/none.ckpt"), 2,
     ["checkpoint not found", "none.ckpt"]),
    ("ckpt-is-a-directory", "gqn-train", lambda w: _train(w, f"ckpt_path={w['tmp']}"), 2,
     ["is a directory; give the checkpoint file"]),
    ("ckpt-garbage", "gqn-train", lambda w: _train(w, f"ckpt_path={w['garbage']}"), 2,
     ["cannot load checkpoint", "garbage.ckpt"]),
    ("resume-other-model", "gqn-train",
     lambda w: _train(w, f"ckpt_path={w['ckpt']}", "model.num_steps=3", "model.hidden_channels=16"), 2,
     ["its model differs from this command's", "model.hidden_channels=8 in the checkpoint but 16 here",
      "model.num_steps=2 in the checkpoint but 3 here", "(model.hidden_channels=8 model.num_steps=2)"]),
    ("max-skipped-steps-negative", "gqn-train",
     lambda w: _train(w, "callbacks.nonfinite_guard.max_skipped_steps=-1"), 2,
     ["callbacks.nonfinite_guard.max_skipped_steps must be an int >= 0, got -1"]),
    ("optimizer-without-fused", "gqn-train",
     lambda w: _train(w, "module.optimizer._target_=torch.optim.RMSprop", "~module.optimizer.betas"), 2,
     ["module.optimizer:", "unexpected keyword argument 'fused'", "~module.optimizer.fused"]),
    ("ema-decay-1", "gqn-train", lambda w: _train(w, "callbacks=ema", "callbacks.ema.decay=1.0"), 2,
     ["callbacks.ema.decay must be a number between 0 and 1 (e.g. 0.99), got 1.0"]),
    ("wrong-frame-size-with-workers", "gqn-train",
     lambda w: _train(w, f"paths.data_dir={w['wrong']}", "data=rooms_ring_camera", "data.num_workers=2"), 2,
     ["rooms_ring_camera/train/", "at byte", "is 32x32 but this dataset has 64x64 frames",
      "fix: these files do not hold the dataset named by data=", "data.image_size only sets"]),
    ("corrupt-record-with-workers", "gqn-train",
     lambda w: _train(w, f"paths.data_dir={w['corrupt']}", "data.num_workers=2"), 2,
     ["data CRC mismatch", "at byte", "fix: set data.skip_corrupt=true"]),
    ("too-few-scenes-per-worker", "gqn-train", lambda w: _train(w, "data.num_workers=4", "data.batch_size=36"), 2,
     ["each of its 4 readers", "fewer than one batch (data.batch_size=36)", "lower data.num_workers"]),
    ("eval-nan-checkpoint", "gqn-eval", lambda w: _eval(w, f"ckpt_path={w['nan_ckpt']}"), 2,
     ["holds non-finite weights", "diverged run"]),
    ("eval-context-size-12", "gqn-eval", lambda w: _eval(w, f"ckpt_path={w['ckpt']}", "context_size=12"), 2,
     ["context_size must be an int in [1, 9]", "got 12"]),
    ("eval-context-size-0", "gqn-eval", lambda w: _eval(w, f"ckpt_path={w['ckpt']}", "context_size=0"), 2,
     ["context_size must be an int in [1, 9]", "got 0"]),
    ("eval-ckpt-missing", "gqn-eval", lambda w: _eval(w, f"ckpt_path={w['tmp']}/none.ckpt"), 2,
     ["checkpoint not found"]),
    ("eval-baseline-missing", "gqn-eval",
     lambda w: _eval(w, f"ckpt_path={w['ckpt']}", f"baseline_ckpt_path={w['tmp']}/none.ckpt"), 2,
     ["checkpoint not found", "(give baseline_ckpt_path=<run>/checkpoints/last.ckpt)"]),
    ("eval-ckpt-garbage", "gqn-eval", lambda w: _eval(w, f"ckpt_path={w['garbage']}"), 2,
     ["cannot load checkpoint"]),
    ("eval-batch-size-text", "gqn-eval", lambda w: _eval(w, f"ckpt_path={w['ckpt']}", "data.batch_size=many"), 2,
     ["data.batch_size must be an int, got 'many' (str)"]),
    ("eval-run-dir-under-a-file", "gqn-eval", lambda w: _eval(w, f"ckpt_path={w['ckpt']}",
                                                           f"hydra.run.dir={w['file']}/ev"), 2,
     ["cannot write the run directory"]),
    ("render-nan-checkpoint", "gqn-render", lambda w: [f"ckpt_path={w['nan_ckpt']}", f"paths.data_dir={w['data']}",
                                                         "data.image_size=32", f"hydra.run.dir={w['tmp']}/re"], 2,
     ["holds non-finite weights"]),
    ("render-fps-0", "gqn-render", lambda w: _render(w, "fps=0"), 2, ["fps must be a number >= 0.1, got 0"]),
    ("render-mean-maybe", "gqn-render", lambda w: _render(w, "mean=maybe"), 2,
     ["mean must be true or false, got 'maybe'"]),
    ("render-batch-size-0", "gqn-render", lambda w: _render(w, "batch_size=0"), 2,
     ["batch_size must be an integer >= 1, got 0"]),
    ("render-frames-0", "gqn-render", lambda w: _render(w, "trajectory.frames=0"), 2,
     ["trajectory.frames must be an integer >= 1, got 0"]),
    ("render-split-val", "gqn-render", lambda w: _render(w, "split=val"), 2,
     ["split must be train or test", "got 'val'"]),
    ("render-no-ckpt", "gqn-render", lambda w: _render(w)[1:], 2, ["give the checkpoint: ckpt_path="]),
    ("render-out-dir-under-a-file", "gqn-render", lambda w: _render(w, f"out_dir={w['file']}/fly"), 2,
     ["cannot write the output directory", "is a file", "set out_dir="]),
    ("render-context-not-an-image", "gqn-render",
     lambda w: _render(w, f"context_file={w['tmp']}/ctx_bad_image.yaml"), 2, ["cannot read image"]),
    ("render-context-camera-nan", "gqn-render",
     lambda w: _render(w, f"context_file={w['tmp']}/ctx_nan_camera.yaml"), 2,
     ["camera 0 must be 5 finite numbers"]),
    ("render-ckpt-missing", "gqn-render",
     lambda w: [*_render(w, f"context_file={w['tmp']}/ctx_good.yaml")[1:], f"ckpt_path={w['tmp']}/none.ckpt"], 2,
     ["checkpoint not found:", "none.ckpt (give ckpt_path=<run>/checkpoints/last.ckpt)"]),
    ("render-context-image-size", "gqn-render",
     lambda w: _render(w, f"context_file={w['tmp']}/ctx_small_image.yaml"), 2,
     ["small.png is 16x16 but the model takes 32x32"]),
    ("render-context-camera-short", "gqn-render",
     lambda w: _render(w, f"context_file={w['tmp']}/ctx_short_camera.yaml"), 2,
     ["ctx_short_camera.yaml: camera 0 must be 5 finite numbers [x, y, z, yaw, pitch], got [1, 0, 0.5]"]),
    ("render-context-not-yaml", "gqn-render", lambda w: _render(w, f"context_file={w['tmp']}/ctx_cut.yaml"), 2,
     ["context_file", "ctx_cut.yaml is not valid YAML/JSON: while parsing a flow sequence"]),
    ("render-trajectory-unknown", "gqn-render",
     lambda w: _render(w, f"context_file={w['tmp']}/ctx_good.yaml", "trajectory.kind=spiral"), 2,
     ["trajectory.kind must be 'orbit' or 'poses', got 'spiral'"]),
    ("eval-no-ckpt", "gqn-eval", lambda w: _eval(w), 2, ["give the checkpoint: ckpt_path="]),
    ("eval-sidecar-damaged", "gqn-eval",
     lambda w: _eval(w, f"ckpt_path={w['ckpt']}", f"paths.data_dir={w['tmp']}/cutsidecar"), 2,
     ["object sidecar", "cutsidecar/synthetic_rooms/objects/test/001-of-001.npz cannot be read: BadZipFile",
      "write it again (gqn-data synth writes sidecars beside the records it writes) or delete it"]),
    ("eval-sidecar-of-other-records", "gqn-eval",
     lambda w: _eval(w, f"ckpt_path={w['ckpt']}", f"paths.data_dir={w['tmp']}/stalesidecar"), 2,
     ["the object sidecar of", "stalesidecar/synthetic_rooms/test/001-of-001.tfrecord has no masks for the record "
      "at byte", "it was written for other records", "gqn-data verify <dataset dir> checks every sidecar"]),
    ("eval-sidecar-of-twins", "gqn-eval",
     lambda w: _eval(w, f"ckpt_path={w['ckpt']}", f"paths.data_dir={w['twins'].parent}"), 2,
     ["object sidecar", "objects/test/001-of-001.npz could belong to 001-of-001.tfrecord or to 001-of-001.tfrecords",
      "rename it 001-of-001.tfrecord.npz or 001-of-001.tfrecords.npz, whichever file it was written for"]),
    ("eval-limit-batches-text", "gqn-eval", lambda w: _eval(w, f"ckpt_path={w['ckpt']}", "limit_batches=abc"), 2,
     ["limit_batches must be an integer >= 1 or null, got 'abc'"]),
    ("eval-split-unknown", "gqn-eval", lambda w: _eval(w, f"ckpt_path={w['ckpt']}", "split=train"), 2,
     ["split must be one of test, val (val: the validation split carved from the training files), got 'train'"]),
    ("eval-weights-unknown", "gqn-eval", lambda w: _eval(w, f"ckpt_path={w['ckpt']}", "weights=best"), 2,
     ["weights must be one of average, trained (average: the checkpoint's state_dict, a moving average where the "
      "run kept one; trained: the weights as trained), got 'best'"]),
    ("eval-data-context-size", "gqn-eval", lambda w: _eval(w, f"ckpt_path={w['ckpt']}", "data.eval_context_size=3"), 2,
     ["gqn-eval sets the context views per scene with context_size=N", "not data.eval_context_size",
      "use context_size=3"]),
    ("eval-data-training-context-size", "gqn-eval",
     lambda w: _eval(w, f"ckpt_path={w['ckpt']}", "data.context_size=[2,4]"), 2,
     ["gqn-eval sets the context views per scene with context_size=N", "not data.context_size",
      "use context_size=N, one number for every scene"]),
    ("eval-draws-0", "gqn-eval", lambda w: _eval(w, f"ckpt_path={w['ckpt']}", "draws=0"), 2,
     ["draws must be an integer >= 1, got 0"]),
    ("eval-seed-text", "gqn-eval", lambda w: _eval(w, f"ckpt_path={w['ckpt']}", "seed=abc"), 2,
     ["seed must be an integer or null, got 'abc'"]),
    ("override-typo", "gqn-train", lambda w: _train(w, "data.batchsize=4"), 2,
     ["Could not override 'data.batchsize'", "To append to your config use +data.batchsize=4"]),
    ("group-option-unknown", "gqn-train", lambda w: _train(w, "model/encoder=towr"), 2,
     ["Could not find 'model/encoder/towr'", "Available options in 'model/encoder': attention, pool, pyramid, tower"]),
    ("sweep-without-multirun", "gqn-train", lambda w: _train(w, "model.num_steps=4,8"), 2,
     ["Ambiguous value for argument 'model.num_steps=4,8'", "add --multirun"]),
    ("multirun-sweep-option-unknown", "gqn-train",
     lambda w: ["-m", *_train(w, "model/encoder=tower,towr", f"hydra.sweep.dir={w['tmp']}/sweep")], 2,
     ["Could not find 'model/encoder/towr'", "Available options in 'model/encoder': attention, pool, pyramid, tower"]),
    ("multirun-key-typo", "gqn-train", lambda w: ["--multirun", *_train(w, "seed=1,2", "data.batchsize=4")], 2,
     ["Could not override 'data.batchsize'"]),
    ("multirun-interval-without-search", "gqn-train",
     lambda w: ["-m", *_train(w, "schedule.lr_init=interval(1e-4,1e-3)")], 2,
     ["'schedule.lr_init=interval(1e-4,1e-3)': the basic sweeper runs listed values", "add hparams_search=optuna"]),
    ("override-unparsable", "gqn-eval", lambda w: _eval(w, f"ckpt_path={w['ckpt']}", "limit_batches=[1"), 2,
     ["'limit_batches=[1': no viable alternative"]),
    ("hidden-channels-0", "gqn-train", lambda w: _train(w, "model.hidden_channels=0"), 2,
     ["model.hidden_channels must be an integer >= 1, got 0"]),
    ("encoder-channels-1", "gqn-train", lambda w: _train(w, "model.encoder.channels=1"), 2,
     ["model.encoder.channels must be an integer >= 2, got 1"]),
    ("lr-init-0", "gqn-train", lambda w: _train(w, "schedule.lr_init=0"), 2,
     ["schedule.lr_init must be a number > 0, got 0"]),
    ("sigma-final-negative", "gqn-train", lambda w: _train(w, "schedule.sigma_final=-0.1"), 2,
     ["schedule.sigma_final must be a number > 0, got -0.1"]),
    ("kl-weight-negative", "gqn-train", lambda w: _train(w, "module.kl_weight=-1"), 2,
     ["module.kl_weight must be a number >= 0, got -1"]),
    ("read-weight-without-read", "gqn-train", lambda w: _train(w, "~model/geometry", "module.read_weight=1"), 2,
     ["module.read_weight=1 trains the geometric read, but the model has none",
      "add model/geometry=plane_sweep or set module.read_weight=0"]),
    ("schedule-read-weight-without-read", "gqn-train",
     lambda w: _train(w, "~model/geometry", "+schedule.read_weight=0.5"), 2,
     ["schedule.read_weight=0.5 trains the geometric read, but the model has none",
      "add model/geometry=plane_sweep or set schedule.read_weight=0"]),
    ("depth-weight-without-read", "gqn-train", lambda w: _train(w, "~model/geometry", "module.depth_weight=1"), 2,
     ["module.depth_weight=1 trains the read's depth search, but the model has none",
      "add model/geometry=plane_sweep or set module.depth_weight=0"]),
    ("drawn-weight-without-read", "gqn-train", lambda w: _train(w, "~model/geometry", "module.drawn_weight=1"), 2,
     ["module.drawn_weight=1 trains the colour the canvas draws beside the read's copies, but the model has none",
      "add model/geometry=plane_sweep or set module.drawn_weight=0"]),
    ("mixture-weight-without-read", "gqn-train", lambda w: _train(w, "~model/geometry", "module.mixture_weight=1"), 2,
     ["module.mixture_weight=1 trains the blend of the read's copies, but the model has none",
      "add model/geometry=plane_sweep or set module.mixture_weight=0"]),
    ("mixture-sigma-not-positive", "gqn-train", lambda w: _train(w, "module.mixture_sigma=0"), 2,
     ["module.mixture_sigma must be a number > 0 (a standard deviation in pixel values, e.g. 0.1), got 0"]),
    ("mixture-gate-negative", "gqn-train", lambda w: _train(w, "module.mixture_gate=-0.1"), 2,
     ["module.mixture_gate must be a number >= 0 (a colour distance in pixel values, e.g. 0.1; 0: every pixel), "
      "got -0.1"]),
    ("channels-last-not-bool", "gqn-train", lambda w: _train(w, "module.channels_last=yes"), 2,
     ["module.channels_last must be true or false, got 'yes' (str)"]),
    ("mixture-gate-without-loss", "gqn-train", lambda w: _train(w, "module.mixture_gate=0.1"), 2,
     ["module.mixture_gate=0.1 gates the mixture loss, but it is off: set module.mixture_weight (e.g. 0.1) or "
      "module.mixture_gate=0"]),
    ("floor-weight-without-floor-map", "gqn-train", lambda w: _train(w, "module.floor_weight=1"), 2,
     ["module.floor_weight=1 trains the floor map, but the model has none",
      "set model.geometry.floor_grid (e.g. 16) or module.floor_weight=0"]),
    ("coarse-steps-negative", "gqn-train", lambda w: _train(w, "schedule.coarse_steps=-5"), 2,
     ["schedule.coarse_steps must be a whole number >= 0, got -5"]),
    ("coarse-factor-off-grid", "gqn-train", lambda w: _train(w, "schedule.coarse_steps=100",
                                                             "schedule.coarse_factor=3"), 2,
     ["schedule.coarse_factor=3 cannot downsample 32px images: 32/3 must be a whole multiple of 4",
      "e.g. schedule.coarse_factor=2"]),
    ("coarse-with-pyramid", "gqn-train", lambda w: _train(w, "model/encoder=pyramid",
                                                          "schedule.coarse_steps=100"), 2,
     ["schedule.coarse_steps needs a size-agnostic encoder: model/encoder=pyramid ends in a convolution",
      "use tower, pool or attention, or schedule.coarse_steps=0"]),
    ("coarse-steps-not-whole", "gqn-train", lambda w: _train(w, "schedule.coarse_steps=1.5"), 2,
     ["schedule.coarse_steps must be a whole number >= 0, got 1.5"]),
    ("coarse-with-checkpoint-steps", "gqn-train", lambda w: _train(w, "schedule.coarse_steps=100",
                                                                   "model.checkpoint_steps=true"), 2,
     ["schedule.coarse_steps with model.checkpoint_steps=true", "turn one of them off"]),
    ("unknown-data-option", "gqn-train", lambda w: _train(w, "+data.batchsize=4"), 2,
     ["unexpected keyword argument 'batchsize'", "fix: check the key's spelling"]),
    ("max-steps-negative", "gqn-train", lambda w: _train(w, "trainer.max_steps=-5"), 2,
     ["trainer.max_steps must be >= 1 (or -1: no limit", "got -5"]),
    ("max-steps-0", "gqn-train", lambda w: _train(w, "trainer.max_steps=0"), 2,
     ["trainer.max_steps must be >= 1", "got 0"]),
    ("max-steps-unlimited-lr-line", "gqn-train",
     lambda w: _train(w, "trainer.max_steps=-1", "trainer.max_time=00:00:00:30"), 2,
     ["schedule.lr_steps must be a number >= 1", "got -1",
      "with trainer.max_steps=-1 (no limit) set schedule.lr_steps=N"]),
    ("val-check-interval-0", "gqn-train", lambda w: _train(w, "trainer.val_check_interval=0"), 2,
     ["trainer.val_check_interval must be a whole number >= 1 (validate every N training steps) or a fraction in "
      "(0, 1] of an epoch, got 0"]),
    ("lr-warmup-negative", "gqn-train", lambda w: _train(w, "schedule.lr_warmup_steps=-5"), 2,
     ["schedule.lr_warmup_steps must be a number >= 0 (the steps the LR warms up over; 0: none), got -5"]),
    ("sigma-warmup-negative", "gqn-train", lambda w: _train(w, "module.sigma_warmup_steps=-5"), 2,
     ["module.sigma_warmup_steps must be a number of steps >= 0, got -5"]),
    ("geometry-sweep-size-0", "gqn-train", lambda w: _train(w, "model.geometry.sweep_size=0"), 2,
     ["geometry.sweep_size must be a whole number >= 1 (a resolution; null: the image size), got 0"]),
    ("geometry-visibility-size-0", "gqn-train", lambda w: _train(w, "model.geometry.visibility_size=0"), 2,
     ["geometry.visibility_size must be a whole number >= 1 (a resolution; null: sweep_size), got 0"]),
    ("trainer-gpu-without-one", "gqn-train", lambda w: _train(w, "trainer=gpu"), 2,
     ["fix: torch sees no usable GPU here", "use trainer=cpu"]),
    ("trainer-unknown-option", "gqn-train", lambda w: _train(w, "+trainer.max_step=5"), 2,
     ["unexpected keyword argument 'max_step'"]),
    ("card-damaged", "gqn-train", lambda w: _train(w, f"paths.data_dir={w['tmp']}/badcard"), 2,
     ["dataset.json is not valid JSON", "and write it again with gqn-data synth --out"]),
    ("synth-out-holds-other-data", "gqn-data",
     lambda w: ["synth", "--out", f"{w['wrong']}/rooms_ring_camera", "--image-size", "8", "--train-scenes", "2"], 2,
     ["already holds a dataset that gqn-data synth did not write", "refusing to replace it"]),
    ("preview-no-such-split", "gqn-data", lambda w: ["preview", f"{w['data']}/synthetic_rooms", "--split", "val"], 2,
     ["has no val/ split", "give --split train or --split test"]),
    ("bench-out-is-a-file", "gqn-bench", lambda w: ["synth", "--out", str(w["file"])], 2,
     ["cannot write the results directory", "is a file", "give --out"]),
    ("bench-steps-0", "gqn-bench", lambda w: ["train", "--configs", "tiny", "--steps", "0"], 2,
     ["--steps, --batch, --context and --rounds must be at least 1"]),
    ("synth-image-size-0", "gqn-data", lambda w: ["synth", "--out", f"{w['tmp']}/s", "--image-size", "0"], 2,
     ["argument --image-size: must be an integer >= 8 and a multiple of 4, got 0"]),
    ("synth-image-size-30", "gqn-data", lambda w: ["synth", "--out", f"{w['tmp']}/s", "--image-size", "30"], 2,
     ["must be an integer >= 8 and a multiple of 4, got 30"]),
    ("synth-image-size-text", "gqn-data", lambda w: ["synth", "--out", f"{w['tmp']}/s", "--image-size", "big"], 2,
     ["argument --image-size: expected an integer, got 'big'"]),
    ("synth-fov-200", "gqn-data", lambda w: ["synth", "--out", f"{w['tmp']}/s", "--fov", "200"], 2,
     ["argument --fov: must be in (0, 180) degrees, got 200"]),
    ("synth-camera-radius-2", "gqn-data", lambda w: ["synth", "--out", f"{w['tmp']}/s", "--camera-radius", "2"], 2,
     ["argument --camera-radius: must be in (0, 1.5), inside the walls, got 2"]),
    ("synth-camera-orbit", "gqn-data", lambda w: ["synth", "--out", f"{w['tmp']}/s", "--camera", "orbit"], 2,
     ["argument --camera: invalid choice: 'orbit' (choose from 'ring', 'free')"]),
    ("geometry-near-above-far", "gqn-train", lambda w: _train(w, "model.geometry.near=5", "model.geometry.far=1"), 2,
     ["geometry needs 0 < near < far, got near=5, far=1"]),
    ("geometry-plane-views-negative", "gqn-train", lambda w: _train(w, "model.geometry.plane_views=-1"), 2,
     ["geometry.plane_views must be >= 0 (0: off), got -1"]),
    ("geometry-plane-agreement-without-plane-views", "gqn-train",
     lambda w: _train(w, "model.geometry.plane_views=0", "model.geometry.plane_agreement=true"), 2,
     ["geometry.plane_agreement compares the nearest view's plane samples with the other views': it needs "
      "geometry.plane_views >= 1"]),
    ("model-mix-widths-empty", "gqn-train", lambda w: _train(w, "model.geometry_mix_widths=[]"), 2,
     ["model.geometry_mix_widths must be a non-empty list of integers >= 1 (the blending network's hidden layers), "
      "got []"]),
    ("geometry-plane-resample-without-plane-views", "gqn-train",
     lambda w: _train(w, "model.geometry.plane_views=0", "model.geometry.plane_resample=true"), 2,
     ["geometry.plane_resample samples the nearest view between its depth planes: it needs geometry.plane_views >= 1 "
      "and geometry.nearest_view=true"]),
    ("geometry-visibility-margin-0", "gqn-train",
     lambda w: _train(w, "model.geometry.visibility=true", "model.geometry.visibility_margin=0"), 2,
     ["geometry.visibility_margin must be > 0, got 0"]),
    ("geometry-occluder-without-visibility", "gqn-train",
     lambda w: _train(w, "model.geometry.visibility=false", "model.geometry.occluder_colour=true"), 2,
     ["geometry.occluder_colour needs geometry.visibility=true"]),
    ("synth-views-1", "gqn-data", lambda w: ["synth", "--out", f"{w['tmp']}/s", "--views", "1"], 2,
     ["argument --views: must be an integer >= 2, got 1"]),
    ("synth-train-scenes-0", "gqn-data", lambda w: ["synth", "--out", f"{w['tmp']}/s", "--train-scenes", "0"], 2,
     ["argument --train-scenes: must be an integer >= 1, got 0"]),
    ("synth-out-is-a-file", "gqn-data", lambda w: ["synth", "--out", str(w["file"])], 2,
     ["plain_file is a file, not a directory; give a directory for the dataset"]),
    ("synth-out-under-a-file", "gqn-data", lambda w: ["synth", "--out", f"{w['file']}/rooms"], 2,
     ["plain_file is a file, not a directory"]),
    ("verify-a-file", "gqn-data", lambda w: ["verify", str(w["file"])], 2,
     ["plain_file is a file, not a dataset directory"]),
    ("info-missing-dir", "gqn-data", lambda w: ["info", f"{w['tmp']}/nowhere"], 2,
     ["no dataset directory", "gqn-data synth --out"]),
    ("unknown-command", "gqn-data", lambda w: ["frobnicate"], 2, ["invalid choice: 'frobnicate'"]),
]

# gqn-data verify/info report problems on stdout, one line each, and exit 1
PROBLEMS = [
    ("verify-empty-train", ["verify", "{tmp}/empty_train/rooms_ring_camera"],
     "holds no *.tfrecord or *.tfrecords files (empty train split)"),
    ("verify-no-test-split", ["verify", "{tmp}/no_test/rooms_ring_camera"], "has no test/ directory"),
    ("verify-damaged-card", ["verify", "{tmp}/badcard/synthetic_rooms"], "dataset.json is not valid JSON"),
    ("verify-sidecar-damaged", ["verify", "{tmp}/cutsidecar/synthetic_rooms"],
     "objects/test/001-of-001.npz cannot be read: BadZipFile"),
    ("verify-sidecar-of-other-records", ["verify", "{tmp}/stalesidecar/synthetic_rooms"],
     "001-of-001.tfrecord has no masks for 7 of its 8 readable records and masks for 7 record(s) it does not hold"),
    ("verify-sidecar-of-twins", ["verify", "{tmp}/twins/synthetic_rooms"],
     "objects/test/001-of-001.npz could belong to 001-of-001.tfrecord or to 001-of-001.tfrecords"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case, world, capsys):
    case_id, prog, build, code, fragments = case
    if case_id == "trainer-gpu-without-one" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    got, out, err = run_main(prog, build(world), capsys)
    assert got == code, (got, out, err)
    line = error_line(prog, err)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    if not any("eval_context_size" in fragment for fragment in fragments):  # unless the user typed that name
        assert "eval_context_size" not in line  # the data module's name for what gqn-eval calls context_size


@pytest.mark.parametrize("case", PROBLEMS, ids=[c[0] for c in PROBLEMS])
def test_verify_problems_fail(case, world, capsys):
    _, args, fragment = case
    code, out, err = run_main("gqn-data", [a.format(tmp=world["tmp"]) for a in args], capsys)
    assert code == 1 and not err
    problems = [ln for ln in out.splitlines() if ln.startswith("problem:")]
    assert len(problems) == 1 and fragment in problems[0], out


def test_synth_never_replaces_records_it_did_not_write(world, capsys):
    """--out naming a downloaded dataset (no card of gqn-data synth) is refused and its files stay as they were;
    a dataset gqn-data synth wrote is rewritten as before."""
    target = world["wrong"] / "rooms_ring_camera"
    before = {p.name: p.stat().st_size for p in target.rglob("*.tfrecord")}
    code, _, err = run_main("gqn-data", ["synth", "--out", str(target), "--image-size", "8", "--train-scenes", "2",
                                         "--test-scenes", "1", "--workers", "1"], capsys)
    assert code == 2 and "refusing to replace it" in error_line("gqn-data", err)
    assert {p.name: p.stat().st_size for p in target.rglob("*.tfrecord")} == before and len(before) > 1
    ours = world["tmp"] / "ours"
    for _ in range(2):  # the second run replaces the first one's records
        code, out, err = run_main("gqn-data", ["synth", "--out", str(ours), "--image-size", "8", "--train-scenes", "2",
                                               "--test-scenes", "1", "--workers", "1"], capsys)
        assert code == 0, err
    assert len(list((ours / "train").glob("*.tfrecord"))) == 1


def test_a_run_that_fails_before_a_checkpoint_leaves_latest_at_the_last_good_run(data_root, tmp_path):
    """outputs/latest (what make train, gqn-eval and gqn-render read) moves only to a run with a checkpoint."""
    import lightning as L

    class Crash(L.Callback):
        def on_train_batch_start(self, *args):
            raise RuntimeError("crash at step 0")

    base = [f"paths.data_dir={data_root}", *TINY, "logger=none", "callbacks=none", "trainer.max_steps=1"]
    latest = tmp_path / "outputs" / "latest"
    for name, extra in (("good", []), ("bad", [Crash()])):
        cfg = compose_train(base, tmp_path / name)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "outputs")
        if extra:
            with pytest.raises(RuntimeError, match="crash at step 0"):
                train(cfg, extra_callbacks=extra)
        else:
            train(cfg)
        assert latest.resolve() == (tmp_path / "good").resolve(), name


def test_a_multirun_is_checked_before_its_first_job(world, tmp_path, capsys):
    """A typo in a sweep's second option stops the sweep before any job (it failed after job 0 trained); a
    sweep whose options all exist passes the check and runs."""
    sweep = tmp_path / "sweep"
    args = ["-m", *_train(world, f"hydra.sweep.dir={sweep}", "callbacks=none", "trainer.max_steps=1")]
    code, out, err = run_main("gqn-train", [*args, "model/encoder=pool,tower,towr"], capsys)
    assert code == 2 and "Could not find 'model/encoder/towr'" in err and not sweep.exists()
    code, out, err = run_main("gqn-train", [*args, "model/encoder=pool,tower"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]


def test_the_docs_table_is_the_contract():
    """docs/errors.md has a row per case, with its exit code and the fragments its line must hold."""
    text = DOCS.read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z0-9-]+)` \|.*$", text, re.M)}
    for case_id, *_, code, fragments in CASES:
        assert case_id in rows, case_id
        row = rows[case_id].replace("\\|", "|")
        assert f"| {code} |" in row, case_id
        for fragment in fragments:
            assert fragment in row, (case_id, fragment)
    for case_id, _, fragment in PROBLEMS:
        assert case_id in rows and fragment in rows[case_id], case_id
    assert len(CASES) + len(PROBLEMS) >= 40


# ---------------------------------------------------------------------------------------- the data stream
def _stream(files, **kw) -> SceneStream:
    opts = dict(info=dataset_info("unused", "rooms_ring_camera"), batch_size=2, context_size=3, repeat=True,
                drop_last=True, shuffle=False)
    opts.update(kw)
    return SceneStream(files, **opts)


@pytest.mark.parametrize("size", [0, -1])
def test_a_stream_refuses_a_batch_size_below_one(size):
    with pytest.raises(GQNDataError, match=f"batch size must be an integer >= 1, got {size}"):
        _stream(["x.tfrecord"], batch_size=size)


def test_skip_warning_repeats_every_pass_with_a_count(tmp_path):
    paths = write_dataset(tmp_path, "rooms_ring_camera", train=[[0, 1, 2, 3]], test=[])
    path = paths["train"][0]
    blob = bytearray(path.read_bytes())
    blob[record_offsets(path)[2][0] + 12 + 40] ^= 0x40  # damage the 3rd scene
    path.write_bytes(bytes(blob))
    stream = _stream([path], skip_corrupt=True, batch_size=3)  # 3 good scenes per pass: one batch each
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's default: an identical warning is shown once
        batches = iter(stream)
        for _ in range(3):
            next(batches)
    texts = [str(w.message) for w in caught if "skipping" in str(w.message)]
    assert len(texts) == 3, texts  # the same record, met on each of three passes
    assert [re.search(r"pass (\d+), (\d+) skipped so far", t).groups() for t in texts] == [
        ("0", "1"), ("1", "2"), ("2", "3")]
    assert all(f"{path} at byte {record_offsets(path)[2][0]}" in t for t in texts)


def test_an_endless_stream_of_corrupt_scenes_stops_with_one_error(tmp_path):
    paths = write_dataset(tmp_path, "rooms_ring_camera", train=[[0, 1, 2, 3]], test=[])
    blob = bytearray(paths["train"][0].read_bytes())
    for offset, _ in record_offsets(paths["train"][0]):
        blob[offset + 12 + 40] ^= 0x40
    paths["train"][0].write_bytes(bytes(blob))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(GQNDataError, match="no readable scene|fewer than one batch|skipped as corrupt"):
            next(iter(_stream(paths["train"], skip_corrupt=True)))


def test_every_scene_skipped_stops_instead_of_spinning(tmp_path):
    not_jpeg = write_dataset(tmp_path, "rooms_ring_camera", train=[[0, 1]], test=[])["train"][0]
    from records_helper import make_example

    write_file(not_jpeg, [make_example([b"not a jpeg"] * 10, [0.0] * 50)] * 4)  # CRCs fine, frames not JPEGs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(GQNDataError, match="every scene .* was skipped as corrupt"):
            next(iter(_stream([not_jpeg], skip_corrupt=True)))


def test_a_worker_error_arrives_as_itself_however_many_workers(world):
    from data_modules import CorruptRecordError, GQNDataModule

    for workers in (1, 3):
        dm = GQNDataModule(str(world["corrupt"]), "synthetic_rooms", batch_size=2, context_size=3,
                           num_workers=workers, image_size=32)
        with pytest.raises(CorruptRecordError) as err:
            for _ in dm.train_dataloader():
                pass
        assert err.value.path == str(world["corrupt_file"]) and err.value.offset == world["corrupt_offset"]
        assert "Traceback" not in str(err.value) and "skip_corrupt" in err.value.fix


# ---------------------------------------------------------------------------------------- resume: ckpt_path=auto
def test_auto_says_it_found_nothing_and_starts_at_step_0(data_root, tmp_path, capsys):
    cfg = compose_train([f"paths.data_dir={data_root}", *TINY, "logger=none", "callbacks=none", "ckpt_path=auto",
                         "trainer.max_steps=1"], tmp_path / "runs" / "first")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "outputs")
        cfg.paths.multirun_dir = str(tmp_path / "multirun")
    probe = Probe()
    train(cfg, extra_callbacks=[probe])
    assert probe.rows[0][0] == 0
    err = capsys.readouterr().err
    assert re.search(r"gqn-train: ckpt_path=auto: no checkpoints/last.ckpt under .*outputs.*; starting from step 0",
                     err), err


def test_auto_finds_a_run_outside_output_dir_and_says_which(data_root, tmp_path, capsys):
    """A run placed with hydra.run.dir outside paths.output_dir is found (by its latest link, or by scanning
    the run directories), and the newest of several wins."""
    base = [f"paths.data_dir={data_root}", *TINY, "logger=none", "callbacks=none"]
    for name, steps in (("older", 1), ("newer", 3)):
        cfg = compose_train([*base, f"trainer.max_steps={steps}"], tmp_path / "elsewhere" / name)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "outputs")  # not a parent of the runs
        train(cfg)
        time.sleep(0.05)
    shutil.rmtree(tmp_path / "outputs")  # no latest link either: only the scan can find them
    again = compose_train([*base, "ckpt_path=auto", "trainer.max_steps=4"], tmp_path / "elsewhere" / "again")
    with open_dict(again):
        again.paths.output_dir = str(tmp_path / "outputs")
    capsys.readouterr()
    probe = Probe()
    train(again, extra_callbacks=[probe])
    assert probe.rows[0][0] == 3  # continued the newer run
    expected = tmp_path / "elsewhere" / "newer" / "checkpoints" / "last.ckpt"
    assert f"gqn-train: ckpt_path=auto: resuming {expected.resolve()}" in capsys.readouterr().err
    assert (tmp_path / "outputs" / "latest").resolve() == (tmp_path / "elsewhere" / "again").resolve()


# ---------------------------------------------------------------------------------------- NaN / inf
class Poison:
    """A test callback: NaN query pixels at the given steps (a non-finite loss, nothing else changed), or
    NaN weights right after the given step (before that step's checkpoint is written)."""

    def __new__(cls, loss_steps=(), weight_steps=()):
        import lightning as L

        class _Poison(L.Callback):
            def __init__(self):
                self.params = {}

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                self.params[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]
                if trainer.global_step in loss_steps:
                    batch["query_images"].fill_(float("nan"))

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step in weight_steps:
                    with torch.no_grad():
                        next(pl_module.parameters()).fill_(float("inf"))

        return _Poison()


def _nan_cfg(train_cfg, *extra):
    return train_cfg("logger=none", "callbacks=none", "trainer.max_steps=6", "trainer.val_check_interval=100",
                     "callbacks.last_checkpoint.every_n_train_steps=2", *extra)


def _ckpt_state(cfg) -> dict:
    return torch.load(Path(cfg.hydra.runtime.output_dir) / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)


def _finite(state) -> bool:
    return all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(train_cfg):
    from callbacks.guards import NonFiniteLossError

    cfg = _nan_cfg(train_cfg)
    poison = Poison(loss_steps={3})
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg, extra_callbacks=[poison])
    msg = str(err.value)
    assert "the training loss is nan at step 3" in msg and "(step 2)" in msg and "last.ckpt" in msg
    assert "schedule.lr_init" in err.value.fix and "max_skipped_steps" in err.value.fix
    state = _ckpt_state(cfg)
    assert state["global_step"] == 2 and _finite(state)


def test_up_to_max_skipped_steps_are_skipped_without_touching_the_weights(train_cfg, capsys):
    cfg = _nan_cfg(train_cfg, "callbacks.nonfinite_guard.max_skipped_steps=1")
    poison = Poison(loss_steps={3})
    train(cfg, extra_callbacks=[poison])
    before, after = poison.params[3], poison.params[4]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # step 3 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(poison.params[4], poison.params[5]))  # step 4 trained
    state = _ckpt_state(cfg)
    assert state["global_step"] == 6 and _finite(state)
    assert "the training loss is nan at step 3; update skipped (1 of at most 1)" in capsys.readouterr().err
    poison2 = Poison(loss_steps={2, 4})
    with pytest.raises(Exception, match="at step 4 after skipping 1 such step"):
        train(_nan_cfg(train_cfg, "callbacks.nonfinite_guard.max_skipped_steps=1"), extra_callbacks=[poison2])


def test_non_finite_weights_are_never_written(train_cfg):
    from callbacks.guards import NonFiniteLossError

    cfg = _nan_cfg(train_cfg)
    with pytest.raises(NonFiniteLossError, match=r"the weights are not finite .* at step 4.*\(step 2\)"):
        train(cfg, extra_callbacks=[Poison(weight_steps={4})])
    state = _ckpt_state(cfg)
    assert state["global_step"] == 2 and _finite(state)


def test_metrics_json_is_strict_json_when_a_metric_is_not_finite(world, capsys, monkeypatch):
    from gqn import metrics

    real = metrics.psnr
    monkeypatch.setattr(metrics, "psnr", lambda a, b: real(a, b) + float("inf"))  # e.g. identical images
    run_dir = world["tmp"] / "strict"
    code, out, err = run_main("gqn-eval", _eval(world, f"ckpt_path={world['ckpt']}", "limit_batches=1",
                                                f"hydra.run.dir={run_dir}"), capsys)
    assert code == 0, err

    def refuse(name):
        raise AssertionError(f"not strict JSON: {name}")

    report = json.loads((run_dir / "metrics.json").read_text(), parse_constant=refuse)
    assert report["metrics"]["psnr_model"] is None and report["metrics"]["ssim_model"] is not None
    assert "metrics.psnr_model" in report["non_finite"]


# ---------------------------------------------------------------------------------------- progress bar
def test_the_progress_bar_counts_steps_after_a_resume(train_cfg, tmp_path):
    from callbacks import StepProgressBar

    class Recording(StepProgressBar):
        seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            task = next(t for t in self.progress.tasks if t.id == self.train_progress_bar_id)
            self.seen.append((task.completed, task.total, task.description.strip()))

    first = train_cfg("logger=none", "callbacks=none", "trainer.max_steps=3")
    train(first)
    second = compose_train([*first.hydra.overrides.task, f"ckpt_path={_last(first)}", "trainer.max_steps=5"],
                           tmp_path / "run2")
    train(second, extra_callbacks=[Recording()])
    assert Recording.seen == [(4, 5, "Step"), (5, 5, "Step")], Recording.seen


def _last(cfg) -> Path:
    return Path(cfg.hydra.runtime.output_dir) / "checkpoints" / "last.ckpt"


# ---------------------------------------------------------------------------------------- signals
def _popen(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:  # the child keeps its own copy of the handle
        return subprocess.Popen([str(BIN / "gqn-train"), *args], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _signal_after_step(proc: subprocess.Popen, log: Path, step: int, signum: int, deadline: float = 240) -> int:
    """Wait until the run logged ``step`` (LineProgress lines), signal its process group (as a terminal's
    Ctrl-C or SLURM does: workers included), and return its exit code."""
    end, reached = time.time() + deadline, False
    while time.time() < end and proc.poll() is None and not reached:
        steps = [int(m) for m in re.findall(r"^step (\d+)/", log.read_text(), re.M)]
        reached = bool(steps) and max(steps) >= step
        time.sleep(0.2)
    if not reached or proc.poll() is not None:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the run did not reach step {step} in {deadline} s:\n{log.read_text()}")
    os.killpg(proc.pid, signum)
    try:
        return proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"no exit within 120 s of the signal:\n{log.read_text()}") from None


def test_sigterm_to_the_process_group_saves_a_checkpoint_that_resumes_at_the_exact_step(data_root, tmp_path):
    """SLURM preemption: SIGTERM to every process of the job, the loader worker included."""
    signum, code = signal.SIGTERM, 143
    run = tmp_path / "run"
    args = [f"paths.data_dir={data_root}", *TINY, "logger=none", f"hydra.run.dir={run}",
            f"paths.output_dir={tmp_path / 'outputs'}", "data.num_workers=1", "trainer.max_steps=100000",
            "trainer.val_check_interval=100000", "callbacks.last_checkpoint.every_n_train_steps=100000",
            "callbacks.progress_lines.every_n_steps=1", "schedule=paper", "schedule.lr_steps=1000",
            "schedule.sigma_steps=1000"]
    log = tmp_path / "log.txt"
    got = _signal_after_step(_popen(args, tmp_path, log), log, 3, signum)
    text = log.read_text()
    assert got == code, text
    assert "Traceback" not in text, text
    match = re.search(rf"gqn-train: stopped by {signal.Signals(signum).name} at step (\d+); saved (\S+); resume "
                      rf"with gqn-train ckpt_path=auto", text)
    assert match, text
    step, path = int(match.group(1)), Path(match.group(2))
    assert path == run / "checkpoints" / "last.ckpt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    assert state["global_step"] == step >= 3
    resumed = compose_train([a for a in args if not a.startswith(("hydra.run.dir", "data.num_workers"))]
                            + ["ckpt_path=auto", f"trainer.max_steps={step + 1}"], tmp_path / "resumed")
    with open_dict(resumed):
        resumed.paths.output_dir = str(tmp_path / "outputs")
    probe = Probe()
    train(resumed, extra_callbacks=[probe])
    assert probe.rows[0][0] == step  # exactly where the signal stopped it
    assert probe.rows[0][1] == pytest.approx(5e-4 + (5e-5 - 5e-4) * step / 1000, rel=1e-9)


def test_ctrl_c_stops_at_the_end_of_the_step_saves_and_exits_130(train_cfg, tmp_path, capsys):
    import lightning as L

    class CtrlC(L.Callback):  # the user presses Ctrl-C in the middle of step 3
        def on_before_backward(self, trainer, pl_module, loss):
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    cfg = train_cfg("logger=none", "callbacks=none", "trainer.max_steps=100", "trainer.val_check_interval=1000",
                    "schedule=paper", "schedule.lr_steps=1000")
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exc:
        train(cfg, extra_callbacks=[CtrlC()])
    assert exc.value.code == 130
    assert signal.getsignal(signal.SIGINT) == previous  # the handler is gone after the run
    ckpt = _last(cfg)
    err = capsys.readouterr().err
    assert "SIGINT received: stopping at the end of this step" in err
    assert f"gqn-train: stopped by SIGINT at step 4; saved {ckpt}; resume with gqn-train ckpt_path=auto" in err
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 4  # step 3 completed
    resumed = compose_train([*cfg.hydra.overrides.task, "ckpt_path=auto", "trainer.max_steps=5"], tmp_path / "again")
    with open_dict(resumed):
        resumed.paths.output_dir = cfg.paths.output_dir
    probe = Probe()
    train(resumed, extra_callbacks=[probe])
    assert [row[0] for row in probe.rows] == [4]
    assert probe.rows[0][1] == pytest.approx(5e-4 + (5e-5 - 5e-4) * 4 / 1000, rel=1e-9)


def test_ctrl_c_outside_training_exits_130(capsys):
    from gqn.cli import one_line_errors

    @one_line_errors("gqn-x")
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exc:
        interrupted()
    assert exc.value.code == 130 and capsys.readouterr().err.strip() == "gqn-x: interrupted"
