"""Checkpoints load through Lightning's standard API (also a GPU checkpoint on a CPU-only machine); bad
files are one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from gqn.cli import UserError, one_line_errors
from gqn.eval import load_module
from gqn.gqn_module import GQNModule
from gqn.train import train


@pytest.fixture(scope="module")
def ckpt(data_root, tmp_path_factory) -> Path:
    from conftest import TINY, compose_train

    run = tmp_path_factory.mktemp("ckpt") / "run"
    train(compose_train([f"paths.data_dir={data_root}", *TINY, "logger=none", "callbacks=none"], run))
    return run / "checkpoints" / "last.ckpt"


def _same_weights(module: GQNModule, state_dict: dict) -> None:
    loaded = module.state_dict()
    assert loaded.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert loaded[key].device.type == "cpu" and torch.equal(loaded[key], value.cpu()), key


def test_checkpoint_loads_through_lightnings_standard_api(ckpt):
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    module = GQNModule.load_from_checkpoint(ckpt, map_location="cpu")
    _same_weights(module, raw["state_dict"])
    assert module.global_step_loaded == raw["global_step"] == 2
    assert module.hparams.model["num_steps"] == 2
    ours = load_module(str(ckpt))
    _same_weights(ours, raw["state_dict"])
    assert not ours.training and ours.global_step_loaded == 2


def test_checkpoint_written_on_a_gpu_loads_on_the_cpu(ckpt, tmp_path, monkeypatch):
    """Every tensor of the file is tagged "cuda:0", as torch.save writes them from a GPU."""
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    gpu_ckpt = tmp_path / "gpu.ckpt"
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(raw, gpu_ckpt)
    if not torch.cuda.is_available():  # the file really is a GPU checkpoint: a plain load needs CUDA
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(gpu_ckpt, weights_only=False)
    for module in (GQNModule.load_from_checkpoint(gpu_ckpt, map_location="cpu"), load_module(str(gpu_ckpt))):
        _same_weights(module, raw["state_dict"])
        assert module.device.type == "cpu" and module.global_step_loaded == 2


def test_checkpoint_error_paths_are_one_line_user_errors(ckpt, tmp_path, capsys):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all\n" * 10)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    del raw["state_dict"][next(iter(raw["state_dict"]))]
    broken = tmp_path / "broken.ckpt"
    torch.save(raw, broken)
    cases = {
        str(tmp_path / "missing.ckpt"): "checkpoint not found: ",
        "auto": "no checkpoint at 'auto'; train first",
        str(garbage): f"cannot load checkpoint {garbage}: ",
        str(foreign): f"{foreign} is not a checkpoint of gqn-train (no state_dict/hyper_parameters)",
        str(broken): f"cannot load checkpoint {broken}: RuntimeError: Error(s) in loading state_dict",
    }
    for path, message in cases.items():
        with pytest.raises(UserError, match="^" + re.escape(message)):
            load_module(path, output_dir=str(tmp_path / "outputs"))
        with pytest.raises(SystemExit) as exit_info:
            one_line_errors("gqn-eval")(load_module)(path, str(tmp_path / "outputs"))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"gqn-eval: error: {message}"), err
