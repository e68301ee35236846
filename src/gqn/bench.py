"""gqn-bench: performance numbers as JSON (never timed tests).

    gqn-bench train   # seconds/step, FLOPs, GFLOP/s, peak memory: reference vs optimised DRAW loop
    gqn-bench train --configs small paper-tower --paths fast --precision 32 bf16-mixed --compile both
                      # fp32 / bf16-mixed / compiled / both in one run, with compile time and %-of-peak
    gqn-bench train --device cuda   # on a GPU (records its name; peak memory is the GPU's)
    gqn-bench train --configs paper-tower --batch 36 --paths fast --checkpoint-steps
                      # peak memory of the paper's batch with activation checkpointing per DRAW step
    gqn-bench data    # scenes/s into ready batches with 0, 1, 2 DataLoader workers: local disk, then the
                      # same files from a Cloud Storage emulator on 127.0.0.1 (gcsfs)
    gqn-bench synth   # procedural scenes/s written
    gqn-bench         # all of them (what `make bench` runs)

Each training configuration runs in its own subprocess, so peak memory (max RSS) is its own. train.json
records the machine (CPU model, whether it has bf16 units: the avx512_bf16 / amx_bf16 flags, threads, GPU
name): never compare numbers across machines. %-of-peak is against a conv of the model's size measured in
the row's own precision. Compiled rows start from an empty inductor cache (compile_seconds: a first run).
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

#: name -> (model preset, overrides of the GQN constructor); 64 px images unless "image_size" is given
TRAIN_CONFIGS = {
    "paper-tower": ("paper", {}),
    "paper-pool": ("paper", {"encoder": "pool"}),
    "paper-tower-shared": ("paper", {"core_sharing": "shared"}),
    "tf_gqn": ("tf_gqn", {}),
    "small": ("small", {}),
    "small-32": ("small", {"image_size": 32}),  # the default experiment's GQN on its 32 px data, without the read
    # the default experiment's model, its weights channels-last as it trains them (module.channels_last)
    "default": ("small", {"image_size": 32, "geometry": "plane_sweep", "channels_last": "true"}),
    # a few-second model for smoke tests of the bench itself (not a meaningful speed)
    "tiny": ("small", {"hidden_channels": 8, "canvas_channels": 8, "num_steps": 2, "encoder.channels": 8}),
}


def build_model(preset: str, image_size: int = 64, **overrides):
    """Build a GQN from a model preset of conf/model (the same YAML users select); without a geometric read
    unless ``geometry`` names a conf/model/geometry option (experiment=default adds one). ``channels_last``
    ("true"/"false", as module.channels_last of gqn-train): the 4-D weights NHWC."""
    import hydra
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from gqn import CONF_DIR

    GlobalHydra.instance().clear()
    image_size = overrides.pop("image_size", image_size)
    args = [f"model={preset}", f"data.image_size={image_size}"]
    if "encoder" in overrides:
        args.append(f"model/encoder={overrides.pop('encoder')}")
    geometry = overrides.pop("geometry", None)
    args.append(f"model/geometry={geometry}" if geometry else "~model/geometry")
    channels_last = str(overrides.pop("channels_last", "false")).lower() == "true"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=args + [f"model.{k}={v}" for k, v in overrides.items()])
    model = hydra.utils.instantiate(cfg.model)
    return model.to(memory_format=torch.channels_last) if channels_last else model


#: --precision names (Lightning's) -> autocast dtype (None: plain fp32)
PRECISIONS = {"32-true": None, "bf16-mixed": "bfloat16"}
PRECISION_ALIASES = {"32": "32-true", "bf16": "bf16-mixed"}
COMPILE = {"off": (False,), "on": (True,), "both": (False, True)}


def _autocast(device: str, precision: str):
    import contextlib

    import torch

    dtype = PRECISIONS[precision]
    return torch.autocast(device, dtype=getattr(torch, dtype)) if dtype else contextlib.nullcontext()


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def conv_peak_gflops(repeats: int = 5, precision: str = "32-true", device: str = "cpu",
                     budget_s: float = 1.0) -> float:
    """This machine's throughput on a GQN-core-sized convolution (batch 8, 16x16, 5x5, 391 -> 512, the paper's
    inference core) in ``precision`` (bf16-mixed: under autocast, as training runs it): the fastest of a warm-up
    call and ``repeats`` timed calls. Calls stop once ``budget_s`` is spent: a CPU that emulates bf16 (no bf16
    units) takes ~5-20 s per call, where a few ms of one-time setup in the first call are noise, so one call
    is the measurement instead of six (2 minutes on one thread of a 2-core EPYC). Before them a call on one
    scene of the batch: where it alone takes an eighth of the budget, its rate is the measurement (that EPYC,
    one thread, bf16: 3.6-4.0 s at 0.6-0.7 GFLOP/s against 30 s at 0.7 for the batch; fp32 0.06 s, so the
    batch is timed)."""
    import torch
    import torch.nn.functional as F

    x, w = torch.randn(8, 391, 16, 16, device=device), torch.randn(512, 391, 5, 5, device=device)
    flops = 2 * 8 * 512 * 391 * 25 * 16 * 16

    def timed(images) -> float:
        _sync(device)
        t = time.perf_counter()
        F.conv2d(images, w, padding=2)
        _sync(device)
        return time.perf_counter() - t

    times = []
    with _autocast(device, precision):
        one = timed(x[:1])
        if one * 8 >= budget_s:
            return flops / 8 / one / 1e9
        for _ in range(repeats + 1):
            times.append(timed(x))
            if sum(times) >= budget_s:
                break
    # the warm-up call counts only when it was all there was time for
    return flops / min(times[1:] or times) / 1e9


def machine_info(device: str = "cpu") -> dict:
    """What the numbers were measured on (never compare them across machines): CPU model, its bf16 units
    (the avx512_bf16 / amx_bf16 flags of /proc/cpuinfo), cores, torch threads, and the GPU if one is used."""
    import platform

    import torch

    from gqn.precision import cpu_fields

    cpu, flags = cpu_fields()
    cpu = cpu or platform.processor() or platform.machine()
    bf16_flags = sorted(f for f in flags if "bf16" in f)  # avx512_bf16, amx_bf16, ...
    info = {
        "cpu": cpu, "cpu_bf16_flags": bf16_flags, "cpu_has_bf16_units": bool(bf16_flags),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": device, "device_name": cpu,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=torch.cuda.get_device_name(0), gpu_memory_gb=props.total_memory / 2**30,
                    cuda=torch.version.cuda, gpu_bf16_supported=torch.cuda.is_bf16_supported())
    return info


def parse_variant(words: list[str]) -> tuple[str, dict]:
    """``--variant NAME BASE KEY=VALUE ...`` -> ``(NAME, {"base", "preset", "overrides"})``: the config BASE of
    :data:`TRAIN_CONFIGS` with model settings changed (keys as after ``model.`` in gqn-train; the prefix may be
    given). A ValueError (one line) for a malformed one."""
    if len(words) < 3:
        raise ValueError(f"--variant needs NAME BASE KEY=VALUE..., got {' '.join(words)!r}")
    name, base, *settings = words
    if name in TRAIN_CONFIGS:
        raise ValueError(f"--variant {name}: the name is one of the built-in configs; choose another")
    if base not in TRAIN_CONFIGS:
        raise ValueError(f"--variant {name}: unknown base config {base!r}; one of {', '.join(TRAIN_CONFIGS)}")
    preset, overrides = TRAIN_CONFIGS[base]
    overrides = dict(overrides)
    for setting in settings:
        key, eq, value = setting.partition("=")
        key = key.removeprefix("model.")
        if not eq or not key:
            raise ValueError(f"--variant {name}: {setting!r} is not KEY=VALUE (e.g. geometry.sweep_size=8)")
        if key == "channels_last" and value.lower() not in ("true", "false"):
            raise ValueError(f"--variant {name}: channels_last is true or false (the weights channels-last, as "
                             f"module.channels_last), got {value!r}")
        if key in ("fast", "checkpoint_steps"):
            raise ValueError(f"--variant {name}: {key} is set for every row by "
                             f"{'--paths' if key == 'fast' else '--checkpoint-steps'}, not per variant")
        overrides[key] = value
    return name, {"base": base, "preset": preset, "overrides": overrides}


def _train_child(name: str, fast: bool, batch: int, context: int, steps: int, checkpoint: bool,
                 precision: str = "32-true", compiled: bool = False, device: str = "cpu",
                 backend: str = "inductor", spec: list | tuple | None = None) -> dict:
    """One configuration in its own process: a FLOP-counted eager step (also the warm-up), then (compiled
    rows) the first compiled step, which pays the compile time, then ``steps`` timed steps. ``spec``: the
    ``(preset, overrides)`` of a ``--variant`` (else ``TRAIN_CONFIGS[name]``).

    A step is what ``gqn-train`` does per batch: the forward under ``precision`` (bf16-mixed: autocast, as
    Lightning's bf16-mixed), backward and an Adam step."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from gqn.model.gqn import compile_model

    preset, overrides = spec or TRAIN_CONFIGS[name]
    torch.manual_seed(0)
    # channels_last (module.channels_last of gqn-train): the weights NHWC, the images as the loader gives them
    model = build_model(preset, fast=fast, checkpoint_steps=checkpoint, **overrides).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)  # as gqn-train (module.optimizer.fused)
    size = model.image_size
    images = [torch.rand(*shape, size, size, 3).movedim(-1, -3) for shape in ((batch, context), (batch,))]
    data = [t.to(device) for t in (images[0], torch.randn(batch, context, 7), images[1], torch.randn(batch, 7))]

    def step():
        with _autocast(device, precision):
            loss = model(*data, sigma=0.7)["elbo"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def timed():
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        return time.perf_counter() - t

    counter = FlopCounterMode(display=False)
    with counter:  # eager: the counted step doubles as warm-up (compiling does not change the FLOPs)
        step()
    compile_seconds = None
    if compiled:
        compile_model(model, backend)
        compile_seconds = timed()  # the first compiled step: tracing and code generation (cold cache)
    times = [timed() for _ in range(steps)]
    flops = counter.get_total_flops()
    median = statistics.median(times)
    if compile_seconds is not None:
        compile_seconds = max(compile_seconds - median, 0.0)
    return {
        "config": name, "path": "fast" if fast else "reference", "precision": precision, "compiled": compiled,
        "device": device, "batch": batch, "context": context,
        "checkpoint_steps": checkpoint, "params": sum(p.numel() for p in model.parameters()),
        "gflop_per_step": flops / 1e9, "seconds_per_step": median, "step_times": times,
        "gflops_per_s": flops / median / 1e9, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "compile_seconds": compile_seconds, "compile_backend": backend if compiled else None,
        # after the timed steps: whether the weights are (still) channels-last, not only what was asked
        "channels_last": any(p.dim() == 4 and p.shape[-2:] != (1, 1) and not p.is_contiguous()
                             and p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters()),
    }


def bench_train(configs, steps: int, batch: int, context: int, paths=("reference", "fast"),
                checkpoint: bool = False, precisions=("32-true",), compile_modes=(False,), device: str = "cpu",
                backend: str = "inductor", variants: dict | None = None, rounds: int = 1) -> dict:
    """Every config x path x precision x compiled in its own subprocess (own peak memory; compiled rows get
    an empty inductor cache, so ``compile_seconds`` is what a first run pays). ``variants``: name -> what
    :func:`parse_variant` gives, timed after ``configs``. ``rounds`` > 1 runs every row's process that many
    times, the rows in turn (round robin), so that a machine whose speed drifts (a shared VM) slows every row
    alike; a row's ``seconds_per_step`` is then the median over all its rounds' steps and
    ``round_seconds_per_step`` holds each round's median."""
    variants = dict(variants or {})
    machine = machine_info(device)
    peaks = {p: conv_peak_gflops(precision=p, device=device) for p in precisions}
    print(f"{machine['device_name']} ({device}; CPU {machine['cpu']}, {machine['cores']} cores, "
          f"{machine['torch_threads']} threads; bf16 units: {', '.join(machine['cpu_bf16_flags']) or 'none'})")
    print("conv peak: " + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in peaks.items()))
    if rounds > 1:
        print(f"{rounds} rounds, the rows in turn; s/step: the median over every round's steps")
    print(f"{'config':20s} {'path':9s} {'precision':10s} {'comp':4s} {'params':>8s} {'GFLOP':>8s} {'s/step':>7s} "
          f"{'GFLOP/s':>8s} {'%peak':>6s} {'mem GB':>7s} {'compile s':>9s}")
    specs = [(name, path, precision, compiled) for name in [*configs, *variants] for path in paths
             for precision in precisions for compiled in compile_modes]
    runs: dict[tuple, list[dict]] = {spec: [] for spec in specs}
    rows = []
    for r in range(rounds):
        for spec in specs:
            name, path, precision, compiled = spec
            cmd = [sys.executable, "-m", "gqn.bench", "_train_child", name, path, str(batch), str(context),
                   str(steps), str(int(checkpoint)), precision, str(int(compiled)), device, backend,
                   json.dumps([variants[name]["preset"], variants[name]["overrides"]] if name in variants else None)]
            with tempfile.TemporaryDirectory(prefix="gqn-bench-inductor-") as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                what = f"{name}/{path}/{precision}/{'compiled' if compiled else 'eager'}"
                raise RuntimeError(f"benchmark of {what} failed:\n{out.stderr[-2000:]}")
            runs[spec].append(json.loads(out.stdout.strip().splitlines()[-1]))
            if r == rounds - 1:
                rows.append(_merge_rounds(runs[spec], peak=peaks[precision], variant=variants.get(name)))
                _print_row(rows[-1], device)
        if r < rounds - 1:
            print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n}/{pa}/{pr}{'/compiled' if c else ''} "
                                                         f"{runs[(n, pa, pr, c)][-1]['seconds_per_step']:.3f}"
                                                         for n, pa, pr, c in specs) + " s/step", flush=True)
    for name in [*configs, *variants]:
        _print_speedups([r for r in rows if r["config"] == name])
    _print_variant_speedups(rows)
    return {"conv_peak_gflops": peaks.get("32-true"), "conv_peak_gflops_by_precision": peaks, "machine": machine,
            "batch": batch, "context": context, "steps": steps, "rounds": rounds, "results": rows}


def _merge_rounds(runs: list[dict], peak: float, variant: dict | None) -> dict:
    """One row from the rounds of a config: the median over all their steps, each round's median, the largest
    peak memory, the median compile time."""
    row = dict(runs[-1])
    times = [t for run in runs for t in run["step_times"]]
    row["step_times"] = times
    row["seconds_per_step"] = statistics.median(times)
    row["round_seconds_per_step"] = [run["seconds_per_step"] for run in runs]
    row["gflops_per_s"] = row["gflop_per_step"] / row["seconds_per_step"]
    row["percent_of_conv_peak"] = 100 * row["gflops_per_s"] / peak
    for key in ("peak_rss_gb", "peak_gpu_memory_gb"):
        if row.get(key) is not None:
            row[key] = max(run[key] for run in runs)
    if row.get("compile_seconds") is not None:
        row["compile_seconds"] = statistics.median(run["compile_seconds"] for run in runs)
    if variant is not None:
        row["variant_of"] = variant
    return row


def _print_row(row: dict, device: str) -> None:
    mem = row["peak_gpu_memory_gb"] if device == "cuda" else row["peak_rss_gb"]
    comp = f"{row['compile_seconds']:9.1f}" if row["compiled"] else f"{'-':>9s}"
    print(f"{row['config']:20s} {row['path']:9s} {row['precision']:10s} {'on' if row['compiled'] else 'off':4s} "
          f"{row['params'] / 1e6:7.1f}M {row['gflop_per_step']:8.0f} {row['seconds_per_step']:7.2f} "
          f"{row['gflops_per_s']:8.0f} {row['percent_of_conv_peak']:5.0f}% {mem:7.2f} {comp}", flush=True)
    spread = row.get("round_seconds_per_step") or []
    if len(spread) > 1:
        print(f"{'':20s} rounds: {', '.join(f'{t:.3f}' for t in spread)} s/step")


def _print_variant_speedups(rows: list[dict]) -> None:
    """Each variant's steps/s against its base config's row of the same path, precision and compile mode."""
    same = lambda r: (r["path"], r["precision"], r["compiled"])  # noqa: E731
    bases = {(r["config"], *same(r)): r for r in rows if "variant_of" not in r}
    for r in rows:
        base = bases.get((r["variant_of"]["base"], *same(r))) if "variant_of" in r else None
        if base is not None:
            print(f"{'':20s} {r['config']} {r['path']} {r['precision']} {'compiled' if r['compiled'] else 'eager'}: "
                  f"{base['seconds_per_step'] / r['seconds_per_step']:.2f}x the steps/s of {base['config']}")


def _print_speedups(rows: list[dict]) -> None:
    """Per config: each row against the fp32 eager row of its path, and the fast path against the reference."""
    base = {r["path"]: r for r in rows if r["precision"] == "32-true" and not r["compiled"]}
    for r in rows:
        b = base.get(r["path"])
        if b is not None and r is not b:
            print(f"{'':20s} {r['path']} {r['precision']} {'compiled' if r['compiled'] else 'eager'}: "
                  f"{b['seconds_per_step'] / r['seconds_per_step']:.2f}x the steps/s of fp32 eager")
    if {"reference", "fast"} <= set(base):
        ref, fast = base["reference"], base["fast"]
        print(f"{'':20s} fast path: speed-up {ref['seconds_per_step'] / fast['seconds_per_step']:.2f}x, "
              f"FLOPs {ref['gflop_per_step'] / fast['gflop_per_step']:.2f}x fewer (fp32 eager)")


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
    from gqn.precision import flush_denormals

    if argv[:1] == ["_train_child"]:
        flush_denormals()  # as gqn-train: first, so that the OpenMP threads torch starts inherit the mode
        name, path, batch, context, steps, ckpt, precision, compiled, device, backend = argv[1:11]
        spec = json.loads(argv[11]) if len(argv) > 11 else None
        print(json.dumps(_train_child(name, path == "fast", int(batch), int(context), int(steps), bool(int(ckpt)),
                                      precision, bool(int(compiled)), device, backend, spec)))
        return 0
    from gqn.cli import check_writable
    from gqn.data_cli import OneLineParser

    p = OneLineParser(prog="gqn-bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=["all", "train", "data", "synth"])
    p.add_argument("--configs", nargs="+", default=[c for c in TRAIN_CONFIGS if c != "tiny"],
                   choices=list(TRAIN_CONFIGS), help="train: model configurations (tiny: for smoke tests)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up (FLOP-counted) step")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=5)
    p.add_argument("--paths", nargs="+", default=["reference", "fast"], choices=["reference", "fast"])
    p.add_argument("--checkpoint-steps", action="store_true",
                   help="train with activation checkpointing per DRAW step (model.checkpoint_steps; fast path only)")
    p.add_argument("--precision", nargs="+", default=["32-true"], metavar="P",
                   choices=[*PRECISIONS, *PRECISION_ALIASES],
                   help="train: 32 (32-true) and/or bf16-mixed (autocast, as trainer.precision=bf16-mixed)")
    p.add_argument("--compile", default="off", choices=list(COMPILE),
                   help="train: eager (off), torch.compile'd as module.compile=true (on), or both")
    p.add_argument("--compile-backend", default="inductor",
                   help="train: the torch.compile backend of compiled rows (aot_eager: tracing without codegen)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="train: where the model runs")
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar="WORD",
                   help="train: NAME BASE KEY=VALUE...: also time BASE (a --configs name) with these model settings "
                        "(e.g. --variant sweep8 default geometry.sweep_size=8; channels_last=true: the weights "
                        "channels-last, as module.channels_last); repeatable")
    p.add_argument("--rounds", type=int, default=1,
                   help="train: run every row this many times, the rows in turn, and report the median (a machine "
                        "whose speed drifts then slows every row alike)")
    p.add_argument("--out", default="bench", help="directory for the JSON results")
    args = p.parse_args(argv)
    flush_denormals()  # after parsing (--help answers without torch), before torch's first op starts its threads
    if args.checkpoint_steps and "reference" in args.paths:
        p.error("--checkpoint-steps needs --paths fast (the reference path has no activation checkpointing)")
    precisions = list(dict.fromkeys(PRECISION_ALIASES.get(x, x) for x in args.precision))
    if args.steps < 1 or args.batch < 1 or args.context < 1 or args.rounds < 1:
        p.error("--steps, --batch, --context and --rounds must be at least 1")
    if args.what in ("data", "synth") and (args.variant or args.rounds != 1):
        p.error(f"--variant and --rounds time training steps: use them with gqn-bench train, not {args.what}")
    from hydra.errors import ConfigCompositionException

    from gqn.cli import _user_cause, hydra_message, one_line

    variants = {}
    for words in args.variant:
        try:
            name, variant = parse_variant(words)
        except ValueError as err:
            p.error(str(err))
        if name in variants:
            p.error(f"--variant {name} is given twice")
        variants[name] = variant
        if variant["base"] not in args.configs:
            p.error(f"--variant {name}: its base {variant['base']!r} is not among --configs; add it, so that the "
                    "two are timed in one run")
        if args.what in ("all", "train"):  # a setting the model does not take: one line now, not after the timing
            try:
                build_model(variant["preset"], **variant["overrides"])
            except ConfigCompositionException as err:
                p.error(f"--variant {name}: {hydra_message(err)}")
            except Exception as err:
                cause = _user_cause(err) or err
                p.error(f"--variant {name}: the model cannot be built: {one_line(cause)}")
    if args.device == "cuda" or args.what in ("all", "train"):
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            print("gqn-bench: error: --device cuda but torch sees no CUDA GPU (a CPU-only torch build, or no "
                  "driver); run on a GPU machine or use --device cpu", file=sys.stderr)
            return 2
        if args.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
            print(f"gqn-bench: error: --compile-backend {args.compile_backend!r} is not a torch.compile backend "
                  "(e.g. inductor, aot_eager)", file=sys.stderr)
            return 2
    out = Path(args.out)
    check_writable(out, "--out", "the results directory", "give --out <a writable directory>")  # before the timing
    results = {}
    if args.what in ("all", "synth"):
        results["synth"] = bench_synth()
    if args.what in ("all", "data"):
        results["data"] = bench_data()
    if args.what in ("all", "train"):
        results["train"] = bench_train(args.configs, args.steps, args.batch, args.context, tuple(args.paths),
                                       checkpoint=args.checkpoint_steps, precisions=precisions,
                                       compile_modes=COMPILE[args.compile], device=args.device,
                                       backend=args.compile_backend, variants=variants, rounds=args.rounds)
    for key, value in results.items():
        (out / f"{key}.json").write_text(json.dumps(value, indent=2) + "\n")
    print(f"wrote {', '.join(str(out / f'{k}.json') for k in results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
