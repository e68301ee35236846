"""The precision the trainer presets pick, per machine."""

from __future__ import annotations

from unittest.mock import patch

from gqn import precision


def test_bf16_only_where_the_cpu_has_bf16_units(tmp_path):
    precision.cpu_has_bf16.cache_clear()
    fake = tmp_path / "cpuinfo"
    with patch.object(precision, "Path", lambda _: fake):
        fake.write_text("flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n")
        assert precision.fastest_precision("cpu") == "bf16-mixed"
        precision.cpu_has_bf16.cache_clear()
        fake.write_text("flags\t\t: fpu sse avx2 avx512f avx512bw\n")  # no bf16 units: emulated bf16 is slower
        assert precision.fastest_precision("cpu") == "32-true"
        precision.cpu_has_bf16.cache_clear()
        fake.unlink()
        assert precision.fastest_precision("cpu") == "32-true"
    precision.cpu_has_bf16.cache_clear()


def test_trainer_presets_resolve_to_a_lightning_precision(train_cfg):
    for preset in ("cpu", "gpu", "ddp"):
        cfg = train_cfg(f"trainer={preset}")
        assert cfg.trainer.precision in ("bf16-mixed", "32-true", "16-mixed"), preset
    assert train_cfg("trainer.precision=32-true").trainer.precision == "32-true"
