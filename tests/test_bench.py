"""gqn-bench smoke tests (never timed): the documented modes run and write their JSON, every precision x
compile combination of gqn-bench train."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
import torch
from conftest import run_main

from gqn.bench import conv_peak_gflops, main

#: keys every row of train.json's results had before precision/compile were added (scripts rely on them)
ROW_KEYS = {"config", "path", "batch", "context", "checkpoint_steps", "params", "gflop_per_step", "seconds_per_step",
            "step_times", "gflops_per_s", "peak_rss_gb", "percent_of_conv_peak"}


def _cpu_flags() -> set[str]:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    return next((set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")), set())


def _bench_here(capsys, *args) -> str:
    """gqn-bench in this process (its rows still run in their own processes, as they time them); its stdout.
    Every call gives ``--out`` (absolute), so nothing is written to the working directory."""
    return run_main("gqn-bench", list(args), capsys, check=True)[1]


def _bench(tmp_path, capsys, *extra, backend="aot_eager"):
    _bench_here(capsys, "train", "--configs", "tiny", "--paths", "fast", "--precision", "32", "bf16-mixed",
                "--compile", "both", "--compile-backend", backend, "--steps", "1", "--batch", "2", "--context", "2",
                "--out", str(tmp_path), *extra)
    return json.loads((tmp_path / "train.json").read_text())


def _check(report, backend):
    rows = report["results"]
    assert {(r["precision"], r["compiled"]) for r in rows} == {
        ("32-true", False), ("32-true", True), ("bf16-mixed", False), ("bf16-mixed", True)}
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["config"] == "tiny" and r["path"] == "fast" and r["device"] == "cpu"
        assert r["seconds_per_step"] > 0 and r["gflop_per_step"] > 0 and r["percent_of_conv_peak"] > 0
        assert (r["compile_seconds"] is not None) == r["compiled"]
        assert r["compile_backend"] == (backend if r["compiled"] else None)
    flops = {r["gflop_per_step"] for r in rows}
    assert max(flops) == pytest.approx(min(flops), rel=1e-6)  # same model, same FLOPs in every mode
    peaks = report["conv_peak_gflops_by_precision"]
    assert set(peaks) == {"32-true", "bf16-mixed"} and report["conv_peak_gflops"] == peaks["32-true"]
    machine = report["machine"]
    assert machine["cpu"] and machine["device"] == "cpu" and machine["torch_threads"] >= 1
    assert set(machine["cpu_bf16_flags"]) == {f for f in _cpu_flags() if "bf16" in f}
    assert machine["cpu_has_bf16_units"] == bool({"avx512_bf16", "amx_bf16"} & _cpu_flags()) or not _cpu_flags()


def test_bench_train_every_precision_and_compile_mode(tmp_path, capsys):
    """fp32 / bf16-mixed x eager / compiled (aot_eager: tracing without code generation, to stay fast)."""
    _check(_bench(tmp_path, capsys), "aot_eager")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_bench_train_with_inductor(tmp_path, capsys):
    _check(_bench(tmp_path, capsys, backend="inductor"), "inductor")


def _refused(argv, capsys) -> str:
    """gqn-bench's main in this process (the console script exits with what it returns; a subprocess would add
    ~5 s of imports to check the same status and line): status 2, one line on stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_cuda_without_a_gpu_is_one_clear_line(tmp_path, capsys):
    assert "--device cuda" in _refused(["train", "--device", "cuda", "--configs", "tiny", "--out", str(tmp_path)],
                                       capsys)
    assert not (tmp_path / "train.json").exists()


def test_bench_unknown_compile_backend_is_one_clear_line(tmp_path, capsys):
    err = _refused(["train", "--compile", "on", "--compile-backend", "turbo", "--configs", "tiny",
                    "--out", str(tmp_path)], capsys)
    assert "'turbo' is not a torch.compile backend" in err
    assert not (tmp_path / "train.json").exists()


def test_train_benchmark_with_activation_checkpointing_writes_json(tmp_path, capsys):
    _bench_here(capsys, "train", "--configs", "small", "--steps", "1", "--batch", "1", "--context", "1",
                "--paths", "fast", "--checkpoint-steps", "--out", str(tmp_path))
    result = json.loads((tmp_path / "train.json").read_text())
    (row,) = result["results"]
    assert row["config"] == "small" and row["path"] == "fast" and row["checkpoint_steps"] is True
    assert row["gflop_per_step"] > 0 and row["seconds_per_step"] > 0 and row["peak_rss_gb"] > 0


def test_checkpoint_steps_on_the_reference_path_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--checkpoint-steps"])
    assert exit_info.value.code == 2
    assert "--checkpoint-steps needs --paths fast" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["memory"])  # the undocumented mode is gone: the flag above replaces it


def test_bench_train_channels_last_variant_keeps_the_model_and_its_flops(tmp_path, capsys):
    """--variant NAME BASE channels_last=true: the same model (parameters, FLOPs) with its weights channels-last
    (module.channels_last of gqn-train), timed beside its base."""
    stdout = _bench_here(capsys, "train", "--configs", "tiny", "--paths", "fast", "--steps", "1", "--batch", "2",
                         "--context", "2", "--variant", "nhwc", "tiny", "channels_last=true", "--out", str(tmp_path))
    assert re.search(r"nhwc fast 32-true eager: [0-9.]+x the steps/s of tiny$", stdout, re.M)
    base, variant = json.loads((tmp_path / "train.json").read_text())["results"]
    assert variant["variant_of"]["overrides"]["channels_last"] == "true"
    assert variant["channels_last"] is True and base["channels_last"] is False  # the weights' layout after the steps
    assert variant["params"] == base["params"] and variant["gflop_per_step"] == pytest.approx(base["gflop_per_step"])


def test_bench_train_times_a_variant_beside_its_base_in_rounds(tmp_path, capsys):
    """--variant NAME BASE KEY=VALUE: a row of BASE with those model settings, compared with BASE's row;
    --rounds N: every row's process runs N times, in turn, and its time is the median over all its steps."""
    stdout = _bench_here(capsys, "train", "--configs", "tiny", "--paths", "fast", "--steps", "2", "--batch", "2",
                         "--context", "2", "--rounds", "2", "--variant", "tiny16", "tiny", "model.hidden_channels=16",
                         "--out", str(tmp_path))
    # in turn: the first round timed both rows before the second began, and its line says so
    assert re.search(r"^round 1/2: tiny/fast/32-true [0-9.]+, tiny16/fast/32-true [0-9.]+ s/step$", stdout, re.M)
    assert re.search(r"tiny16 fast 32-true eager: [0-9.]+x the steps/s of tiny$", stdout, re.M)
    report = json.loads((tmp_path / "train.json").read_text())
    assert report["rounds"] == 2
    base, variant = report["results"]
    assert base["config"] == "tiny" and "variant_of" not in base
    assert variant["config"] == "tiny16" and variant["variant_of"] == {
        "base": "tiny", "preset": "small",
        "overrides": {"hidden_channels": "16", "canvas_channels": 8, "num_steps": 2, "encoder.channels": 8}}
    assert variant["params"] > base["params"] and variant["gflop_per_step"] > base["gflop_per_step"]  # it changed
    for row in (base, variant):
        assert ROW_KEYS <= set(row)
        assert len(row["step_times"]) == 4 and len(row["round_seconds_per_step"]) == 2
        assert row["round_seconds_per_step"] == [statistics.median(row["step_times"][:2]),
                                                 statistics.median(row["step_times"][2:])]
        assert row["seconds_per_step"] == pytest.approx(statistics.median(row["step_times"]))


@pytest.mark.parametrize("words, message", [
    (["x"], "--variant needs NAME BASE KEY=VALUE..., got 'x'"),
    (["default", "tiny", "num_steps=3"], "--variant default: the name is one of the built-in configs"),
    (["v", "huge", "num_steps=3"], "--variant v: unknown base config 'huge'"),
    (["v", "tiny", "num_steps"], "--variant v: 'num_steps' is not KEY=VALUE"),
    (["v", "tiny", "no_such_setting=3"], "--variant v: Could not override 'model.no_such_setting'"),
    (["v", "tiny", "num_steps=0"], "--variant v: the model cannot be built: num_steps (L) must be >= 1"),
    (["v", "tiny", "fast=false"], "--variant v: fast is set for every row by --paths"),
    (["v", "tiny", "channels_last=yes"], "--variant v: channels_last is true or false"),
    (["v", "small", "num_steps=3"], "--variant v: its base 'small' is not among --configs"),
])
def test_a_malformed_variant_is_one_clear_line_before_any_timing(tmp_path, capsys, words, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--configs", "tiny", "--variant", *words, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "train.json").exists()


def test_variant_and_rounds_are_refused_where_no_training_step_is_timed(tmp_path, capsys):
    for extra in (["--rounds", "3"], ["--variant", "v", "tiny", "num_steps=3"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["data", *extra, "--out", str(tmp_path)])
        assert exit_info.value.code == 2
        assert "--variant and --rounds time training steps: use them with gqn-bench train, not data" in \
            capsys.readouterr().err


def test_the_default_row_times_the_default_experiments_model(tmp_path):
    """gqn-bench's ``default`` config is what ``gqn-train`` (experiment=default) builds: the same modules (the read
    included), shapes and DRAW steps, its weights channels-last as module.channels_last trains them."""
    import hydra
    from conftest import compose_train

    from gqn.bench import TRAIN_CONFIGS, build_model

    cfg = compose_train([], tmp_path / "run")
    trained = hydra.utils.instantiate(cfg.model)
    preset, overrides = TRAIN_CONFIGS["default"]
    benched = build_model(preset, **dict(overrides))
    convs = [m.weight for m in benched.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    assert cfg.module.channels_last is True
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    assert benched.generator.num_steps == trained.generator.num_steps
    assert repr(benched) == repr(trained)
    shapes = [{k: v.shape for k, v in model.state_dict().items()} for model in (benched, trained)]
    assert shapes[0] == shapes[1]


@pytest.mark.parametrize("overrides,steps", [([], 2), (["~model/geometry"], 4), (["model=paper"], 12),
                                             (["model.num_steps=6"], 6)])
def test_the_small_presets_draw_steps_follow_the_read(tmp_path, overrides, steps):
    """conf/model/small.yaml: L 2 with a geometric read (the default experiment, session 38), 4 without; another
    preset keeps its own and model.num_steps wins."""
    import hydra
    from conftest import compose_train

    cfg = compose_train(overrides, tmp_path / "run")
    assert cfg.model.num_steps == steps
    assert hydra.utils.instantiate(cfg.model).generator.num_steps == steps


def test_the_conv_peak_probe_stops_at_its_time_budget(monkeypatch):
    """A CPU that emulates bf16 takes seconds per probe call. The probe times one scene first: where that alone
    takes an eighth of the budget, its rate is the measurement (one call); else the batch of 8: once the budget is
    spent the probe stops (the warm-up call is then the measurement); with time to spare it makes the warm-up and
    every timed call, and reports the fastest timed one, not the slow warm-up. The conv is replaced by sleeps of
    ``per_scene`` seconds a scene, ``warm_up`` more on the first call of the batch."""
    import time

    import torch.nn.functional as F

    calls = []

    def probe(per_scene, warm_up, **kwargs):
        calls.clear()

        def sleeping(x, *args, **kw):
            calls.append(x.shape[0])
            time.sleep(per_scene * x.shape[0] + (warm_up if calls.count(8) == 1 and x.shape[0] == 8 else 0.0))
            return x

        monkeypatch.setattr(F, "conv2d", sleeping)
        return conv_peak_gflops(repeats=3, **kwargs)

    gflop = 2 * 8 * 512 * 391 * 25 * 16 * 16 / 1e9
    # slow: one scene takes 0.2 s, so the batch would take 1.6 s of a 1 s budget: the scene's rate
    assert 0 < probe(0.2, 0.0, budget_s=1.0) <= gflop / 8 / 0.2 and calls == [1]
    # the scene fits (0.04 s for 8 of them) but the warm-up of the batch spends the budget: the warm-up's rate
    assert 0 < probe(0.005, 0.1, budget_s=0.1) <= gflop / 0.14 and calls == [1, 8]
    # time to spare: the scene, the warm-up and three timed calls; the fastest timed one, not the warm-up
    assert probe(0.001, 0.05, budget_s=1e9) > gflop / 0.03 and calls == [1, 8, 8, 8, 8]
