"""The precision the trainer presets pick, per machine."""

from __future__ import annotations

import json
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
    assert 0.05 < precision.measure_bf16_speedup(repeats=1) < 20


def test_trainer_presets_resolve_to_a_lightning_precision(train_cfg):
    for preset in ("cpu", "gpu", "ddp"):
        cfg = train_cfg(f"trainer={preset}")
        assert cfg.trainer.precision in ("bf16-mixed", "32-true", "16-mixed"), preset
    assert train_cfg("trainer.precision=32-true").trainer.precision == "32-true"
