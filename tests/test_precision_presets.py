"""The precision the trainer presets pick, per machine."""

from __future__ import annotations

import json
import math
from unittest.mock import patch

import pytest

from gqn import precision


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No cached CPU facts or measurements; the speed-up cache in a tmp dir."""
    monkeypatch.setenv("GQN_CACHE_DIR", str(tmp_path / "cache"))
    precision.cpu_has_bf16.cache_clear()
    precision.cpu_bf16_speedup.cache_clear()
    yield tmp_path
    precision.cpu_has_bf16.cache_clear()
    precision.cpu_bf16_speedup.cache_clear()


def _fake_cpu(fake, flags):
    fake.write_text(f"model name\t: Test CPU\nflags\t\t: {flags}\n")


def test_bf16_only_where_the_cpu_has_bf16_units_and_it_measures_faster(fresh):
    fake = fresh / "cpuinfo"
    with patch.object(precision, "CPUINFO", fake):
        _fake_cpu(fake, "fpu sse avx2 avx512f avx512_bf16 avx512_vnni")
        with patch.object(precision, "measure_bf16_speedup", return_value=1.9) as probe:
            assert precision.fastest_precision("cpu") == "bf16-mixed"
        precision.cpu_bf16_speedup.cache_clear()
        # the same CPU measured before: the cache answers, no probe
        with patch.object(precision, "measure_bf16_speedup", side_effect=AssertionError("measured again")):
            assert precision.fastest_precision("cpu") == "bf16-mixed"
        assert probe.call_count == 1
        # bf16 units, but bf16 measures slower than fp32 (an Intel Xeon of this machine kind: 0.56x)
        (fresh / "cache" / "precision.json").unlink()
        precision.cpu_bf16_speedup.cache_clear()
        with patch.object(precision, "measure_bf16_speedup", return_value=0.56):
            assert precision.fastest_precision("cpu") == "32-true"
        precision.cpu_has_bf16.cache_clear()
        _fake_cpu(fake, "fpu sse avx2 avx512f avx512bw")  # no bf16 units: emulated bf16 is slower, never probed
        with patch.object(precision, "measure_bf16_speedup", side_effect=AssertionError("probed")):
            assert precision.fastest_precision("cpu") == "32-true"
        precision.cpu_has_bf16.cache_clear()
        fake.unlink()
        assert precision.fastest_precision("cpu") == "32-true"


def test_speedup_cache_is_keyed_by_cpu_and_threads_and_survives_garbage(fresh):
    import torch

    path = precision.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("not json")
    with patch.object(precision, "measure_bf16_speedup", return_value=1.5):
        assert precision.cpu_bf16_speedup() == 1.5
    cached = json.loads(path.read_text())
    (key,) = cached
    assert f"{torch.get_num_threads()} threads" in key and torch.__version__ in key
    cached[key] = 0.7  # another measurement of the same machine is what the next process reads
    path.write_text(json.dumps(cached))
    precision.cpu_bf16_speedup.cache_clear()
    assert precision.cpu_bf16_speedup() == 0.7


def test_the_probe_measures_a_positive_ratio():
    # on a CPU without bf16 units bf16 is emulated: a 2-core AMD EPYC without AVX-512 measured 0.024 (session 38)
    ratio = precision.measure_bf16_speedup(repeats=1)
    assert math.isfinite(ratio) and 0 < ratio < 20, ratio


def test_trainer_presets_resolve_to_a_lightning_precision(train_cfg):
    for preset in ("cpu", "gpu", "ddp"):
        cfg = train_cfg(f"trainer={preset}")
        assert cfg.trainer.precision in ("bf16-mixed", "32-true", "16-mixed"), preset
    assert train_cfg("trainer.precision=32-true").trainer.precision == "32-true"


def test_denormals_flush_to_zero_on_the_threads_started_after(tmp_path):
    """flush_denormals, called first in a fresh process: a product in the denormal range is zero on every thread of
    torch's OpenMP pool (started later, it inherits the mode); without it, not."""
    import subprocess
    import sys

    # the denormals built from their bits (a float literal would already be flushed on the main thread), counted by
    # their bits; "late": the pool started before the mode is set, so its threads keep denormals
    code = ("import sys, torch\n"
            "from gqn.precision import flush_denormals\n"
            "torch.set_num_threads(2)\n"
            "if sys.argv[1] == 'late': torch.ones(1 << 22).mul(2.0)\n"
            "ok = flush_denormals() if sys.argv[1] != 'off' else None\n"
            "x = torch.full((1 << 22,), 700000, dtype=torch.int32).view(torch.float32)\n"
            "print(ok, int((x * 1.0).view(torch.int32).count_nonzero()))\n")
    runs = {flag: subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True, timeout=120)
            for flag in ("first", "off", "late")}
    assert runs["off"].stdout.split() == ["None", str(1 << 22)], runs["off"].stderr
    assert runs["first"].stdout.split() == ["True", "0"], runs["first"].stderr
    late = runs["late"].stdout.split()
    assert late[0] == "True" and 0 < int(late[1]) < 1 << 22, runs["late"].stderr  # the main thread's share flushed


def test_training_flushes_denormals(train_cfg):
    """gqn-train's train() flushes denormals (first thing; gqn-eval, gqn-render and gqn-bench alike)."""
    import torch

    from gqn.train import train

    torch.set_flush_denormal(False)
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0
    try:
        train(train_cfg("logger=none", "callbacks=none", "trainer.max_steps=1", "trainer.limit_val_batches=0"))
        assert (torch.tensor([1e-39]) * 1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)
