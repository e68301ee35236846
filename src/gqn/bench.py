"""gqn-bench: performance numbers as JSON (never timed tests).

    gqn-bench train   # seconds/step, FLOPs, GFLOP/s, peak memory: reference vs optimised DRAW loop
    gqn-bench train --configs paper-tower --batch 36 --paths fast --checkpoint-steps
                      # peak memory of the paper's batch with activation checkpointing per DRAW step
    gqn-bench data    # scenes/s into ready batches with 0, 1, 2 DataLoader workers: local disk, then the
                      # same files from a Cloud Storage emulator on 127.0.0.1 (gcsfs)
    gqn-bench synth   # procedural scenes/s written
    gqn-bench         # all of them (what `make bench` runs)

Each training configuration runs in its own subprocess, so peak memory (max RSS) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: name -> (model preset, overrides of the GQN constructor)
TRAIN_CONFIGS = {
    "paper-tower": ("paper", {}),
    "paper-pool": ("paper", {"encoder": "pool"}),
    "paper-tower-shared": ("paper", {"core_sharing": "shared"}),
    "tf_gqn": ("tf_gqn", {}),
    "small": ("small", {}),
}


def build_model(preset: str, image_size: int = 64, **overrides):
    """Build a GQN from a model preset of conf/model (the same YAML users select)."""
    import hydra
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from gqn import CONF_DIR

    GlobalHydra.instance().clear()
    args = [f"model={preset}", f"data.image_size={image_size}"]
    if "encoder" in overrides:
        args.append(f"model/encoder={overrides.pop('encoder')}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=args + [f"model.{k}={v}" for k, v in overrides.items()])
    return hydra.utils.instantiate(cfg.model)


def conv_peak_gflops(repeats: int = 5) -> float:
    """This machine's fp32 throughput on a GQN-core-sized convolution (batch 8, 16x16, 5x5, 391 -> 512)."""
    import torch
    import torch.nn.functional as F

    x, w = torch.randn(8, 391, 16, 16), torch.randn(512, 391, 5, 5)
    flops = 2 * 8 * 512 * 391 * 25 * 16 * 16
    F.conv2d(x, w, padding=2)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        F.conv2d(x, w, padding=2)
        times.append(time.perf_counter() - t)
    return flops / min(times) / 1e9


def _train_child(name: str, fast: bool, batch: int, context: int, steps: int, checkpoint: bool) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    preset, overrides = TRAIN_CONFIGS[name]
    torch.manual_seed(0)
    model = build_model(preset, fast=fast, checkpoint_steps=checkpoint, **overrides)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    size = model.image_size
    data = (torch.rand(batch, context, 3, size, size), torch.randn(batch, context, 7), torch.rand(batch, 3, size, size),
            torch.randn(batch, 7))

    def step():
        loss = model(*data, sigma=0.7)["elbo"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    counter = FlopCounterMode(display=False)
    with counter:  # the counted step doubles as warm-up
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    flops = counter.get_total_flops()
    median = statistics.median(times)
    return {
        "config": name, "path": "fast" if fast else "reference", "batch": batch, "context": context,
        "checkpoint_steps": checkpoint, "params": sum(p.numel() for p in model.parameters()),
        "gflop_per_step": flops / 1e9, "seconds_per_step": median, "step_times": times,
        "gflops_per_s": flops / median / 1e9, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def bench_train(configs, steps: int, batch: int, context: int, paths=("reference", "fast"),
                checkpoint: bool = False) -> dict:
    rows = []
    peak = conv_peak_gflops()
    print(f"conv peak on this machine: {peak:.0f} GFLOP/s (fp32, {os.cpu_count()} cores)")
    print(f"{'config':20s} {'path':9s} {'params':>8s} {'GFLOP':>8s} {'s/step':>7s} {'GFLOP/s':>8s} {'%peak':>6s} "
          f"{'RSS GB':>7s}")
    for name in configs:
        for path in paths:
            cmd = [sys.executable, "-m", "gqn.bench", "_train_child", name, path, str(batch), str(context), str(steps),
                   str(int(checkpoint))]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"benchmark of {name}/{path} failed:\n{out.stderr[-2000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["percent_of_conv_peak"] = 100 * row["gflops_per_s"] / peak
            rows.append(row)
            print(f"{name:20s} {path:9s} {row['params'] / 1e6:7.1f}M {row['gflop_per_step']:8.0f} "
                  f"{row['seconds_per_step']:7.2f} {row['gflops_per_s']:8.0f} {row['percent_of_conv_peak']:5.0f}% "
                  f"{row['peak_rss_gb']:7.2f}", flush=True)
        by = {r["path"]: r for r in rows if r["config"] == name}
        if len(by) == 2:
            print(f"{'':20s} speed-up {by['reference']['seconds_per_step'] / by['fast']['seconds_per_step']:.2f}x, "
                  f"FLOPs {by['reference']['gflop_per_step'] / by['fast']['gflop_per_step']:.2f}x fewer")
    return {"conv_peak_gflops": peak, "batch": batch, "context": context, "steps": steps, "results": rows}


def bench_data(scenes: int = 2000, batch: int = 36, context: int = 5, workers=(0, 1, 2),
               root: str | None = None, image_size: int = 64, emulator: bool = True) -> dict:
    """Scenes/s into float batches from local disk and, in the same run, from a Cloud Storage emulator on
    127.0.0.1 serving the same files (gcsfs through ``STORAGE_EMULATOR_HOST``; dev extra)."""
    from data_modules import GQNDataModule
    from gqn.synthetic import synthesize

    tmp = None
    if root is None:
        tmp = tempfile.TemporaryDirectory()
        root = tmp.name
        synthesize(Path(root) / "bench_rooms", "rooms", train_scenes=scenes, test_scenes=batch, seed=0,
                   image_size=image_size, views=10, scenes_per_file=250, log=lambda *_: None)
    sources, server, saved = [("local", str(root))], None, os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        try:
            from data_modules.emulator import Emulator

            server = Emulator(bucket="gqn-bench").start()
            server.upload(Path(root) / "bench_rooms", "bench_rooms")
            os.environ["STORAGE_EMULATOR_HOST"] = server.host  # inherited by the loader's workers
            sources.append(("emulator", server.url))
        except ImportError as err:
            print(f"data: no emulator rows ({err})")
    rows = []
    try:
        for source, data_dir in sources:
            for w in workers:
                dm = GQNDataModule(data_dir, "bench_rooms", batch_size=batch, context_size=context, num_workers=w,
                                   shuffle_buffer=256)
                # the whole train split, shuffled as in training (no validation carve-out: a reading benchmark)
                loader = dm._loader(dm.stream("train", batch_size=batch, context_size=context, shuffle=True,
                                              shuffle_buffer=256, drop_last=True, scene_filter=None,
                                              files=dm.files("train")))
                it = iter(loader)
                next(it)  # start-up (worker spawn, first requests) excluded
                start, count = time.perf_counter(), 0
                for b in it:
                    count += b["query_images"].shape[0]
                    assert b["context_images"].dtype.is_floating_point
                rate = count / (time.perf_counter() - start)
                rows.append({"source": source, "workers": w, "scenes_per_s": rate, "scenes": count})
                print(f"data: {source:8s} {w} workers: {rate:7.0f} scenes/s into float batches (batch {batch}, "
                      f"{context} context views, {image_size}x{image_size}, 10 frames/scene)", flush=True)
    finally:
        if server is not None:
            server.stop()
            if saved is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = saved
        if tmp:
            tmp.cleanup()
    return {"batch": batch, "context": context, "results": rows}


def bench_synth(scenes: int = 400, workers: int = 2, image_size: int = 64) -> dict:
    from gqn.synthetic import synthesize

    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        synthesize(Path(root) / "s", "rooms", train_scenes=scenes, test_scenes=0, seed=0, image_size=image_size,
                   views=10, scenes_per_file=50, workers=workers, log=lambda *_: None)
        rate = scenes / (time.perf_counter() - start)
    print(f"synth: {rate:.0f} rooms scenes/s ({image_size}x{image_size}, 10 views, {workers} processes)")
    return {"scenes": scenes, "workers": workers, "image_size": image_size, "scenes_per_s": rate}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_train_child"]:
        name, path, batch, context, steps, ckpt = argv[1:7]
        print(json.dumps(_train_child(name, path == "fast", int(batch), int(context), int(steps), bool(int(ckpt)))))
        return 0
    p = argparse.ArgumentParser(prog="gqn-bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=["all", "train", "data", "synth"])
    p.add_argument("--configs", nargs="+", default=list(TRAIN_CONFIGS), choices=list(TRAIN_CONFIGS))
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up (FLOP-counted) step")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=5)
    p.add_argument("--paths", nargs="+", default=["reference", "fast"], choices=["reference", "fast"])
    p.add_argument("--checkpoint-steps", action="store_true",
                   help="train with activation checkpointing per DRAW step (model.checkpoint_steps; fast path only)")
    p.add_argument("--out", default="bench", help="directory for the JSON results")
    args = p.parse_args(argv)
    if args.checkpoint_steps and "reference" in args.paths:
        p.error("--checkpoint-steps needs --paths fast (the reference path has no activation checkpointing)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.what in ("all", "synth"):
        results["synth"] = bench_synth()
    if args.what in ("all", "data"):
        results["data"] = bench_data()
    if args.what in ("all", "train"):
        results["train"] = bench_train(args.configs, args.steps, args.batch, args.context, tuple(args.paths),
                                       checkpoint=args.checkpoint_steps)
    for key, value in results.items():
        (out / f"{key}.json").write_text(json.dumps(value, indent=2) + "\n")
    print(f"wrote {', '.join(str(out / f'{k}.json') for k in results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
