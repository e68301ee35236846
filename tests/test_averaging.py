"""callbacks.WeightEMA (``callbacks=ema``): the average it checkpoints, where it starts, and resumes from its
checkpoints; gqn-eval's ``weights`` / ``baseline_weights``."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from callbacks import WeightEMA
from gqn.train import train


class WeightLog(L.Callback):
    """The trained weights after every optimizer step (the averaging callback leaves the model alone there)."""

    def __init__(self):
        self.after_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def _ema(train_cfg, *overrides, callbacks=()):
    log = WeightLog()
    cfg = train_cfg("logger=none", "callbacks=ema", "trainer.val_check_interval=1000", *overrides)
    train(cfg, extra_callbacks=[log, *callbacks])
    ckpt = torch.load(f"{cfg.hydra.runtime.output_dir}/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    return log, ckpt


def test_the_checkpoint_holds_the_average_of_the_steps_from_start_step_and_the_trained_weights(train_cfg):
    log, ckpt = _ema(train_cfg, "trainer.max_steps=4", "callbacks.ema.decay=0.75", "callbacks.ema.start_step=1")
    steps = log.after_step
    assert sorted(steps) == [1, 2, 3, 4]
    names = list(steps[4])
    # the first update (after step index 1, i.e. global step 2) copies, every later one lerps by 1 - decay
    expected = {n: 0.75 * (0.75 * steps[2][n] + 0.25 * steps[3][n]) + 0.25 * steps[4][n] for n in names}
    moved = [n for n in names if not torch.equal(steps[2][n], steps[4][n])]
    assert len(moved) > len(names) // 2  # the weights trained, so the average differs from them
    for n in names:
        torch.testing.assert_close(ckpt["state_dict"][n], expected[n], rtol=1e-5, atol=1e-7)
        # where training ends the trained weights are kept for a resume, not the average copied into the model
        torch.testing.assert_close(ckpt["current_model_state"][n], steps[4][n], rtol=0, atol=0)
    assert any(not torch.allclose(ckpt["state_dict"][n], steps[4][n]) for n in moved)
    assert int(ckpt["averaging_state"]["n_averaged"]) == 3


def test_before_start_step_the_weights_are_the_trained_ones(train_cfg):
    """Lightning's averaging validated and checkpointed the copy it made at setup (the untrained weights) until its
    first update; here nothing is averaged before start_step."""
    validated = {}

    class AtValidation(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            validated[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    log, ckpt = _ema(train_cfg, "trainer.max_steps=3", "trainer.val_check_interval=2", "callbacks.ema.start_step=100",
                     callbacks=[AtValidation()])
    assert sorted(validated) == [2, 3]
    for step, weights in validated.items():
        for n, trained in log.after_step[step].items():
            torch.testing.assert_close(weights[n], trained, rtol=0, atol=0)
    for n, trained in log.after_step[3].items():
        torch.testing.assert_close(ckpt["state_dict"][n], trained, rtol=0, atol=0)
    assert int(ckpt["averaging_state"]["n_averaged"]) == 0


def test_a_resume_restores_the_trained_weights_and_the_average(train_cfg, tmp_path):
    _, first = _ema(train_cfg, "trainer.max_steps=3", "callbacks.ema.decay=0.5")
    path = tmp_path / "first.ckpt"
    torch.save(first, path)
    seen = {}

    class AtResume(L.Callback):
        def on_train_start(self, trainer, pl_module):
            ema = next(c for c in trainer.callbacks if isinstance(c, WeightEMA))
            seen["model"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            seen["average"] = {n: p.detach().clone() for n, p in ema._average_model.module.named_parameters()}
            seen["n"] = int(ema._average_model.n_averaged)

    cfg = train_cfg("logger=none", "callbacks=ema", "trainer.val_check_interval=1000", "trainer.max_steps=4",
                    "callbacks.ema.decay=0.5", f"ckpt_path={path}")
    train(cfg, extra_callbacks=[AtResume()])
    assert seen["n"] == 3
    for n in seen["model"]:
        torch.testing.assert_close(seen["model"][n], first["current_model_state"][n], rtol=0, atol=0)
        torch.testing.assert_close(seen["average"][n], first["state_dict"][n], rtol=0, atol=0)
    assert any(not torch.equal(seen["model"][n], seen["average"][n]) for n in seen["model"])


def test_validation_scores_the_average(train_cfg):
    """Validation (val/*, images, the best checkpoint) runs on the averaged weights."""
    from lightning.pytorch.callbacks import Callback

    got = {}

    class AtValidation(Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if "weights" not in got:
                got["weights"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    log = WeightLog()
    cfg = train_cfg("logger=none", "callbacks=ema", "trainer.max_steps=3", "trainer.val_check_interval=3",
                    "callbacks.ema.decay=0.75")
    train(cfg, extra_callbacks=[log, AtValidation()])
    names = list(log.after_step[3])
    expected = {n: 0.75 * (0.75 * log.after_step[1][n] + 0.25 * log.after_step[2][n]) + 0.25 * log.after_step[3][n]
                for n in names}
    for n in names:
        torch.testing.assert_close(got["weights"][n], expected[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"decay": 1.0}, "callbacks.ema.decay must be a number between 0 and 1"),
    ({"decay": 0}, "callbacks.ema.decay must be a number between 0 and 1"),
    ({"start_step": -1}, "callbacks.ema.start_step must be an int >= 0"),
    ({"every_n_steps": 0}, "callbacks.ema.every_n_steps must be an int >= 1"),
])
def test_bad_settings_are_one_line_errors(kwargs, fragment):
    from gqn.cli import UserError

    with pytest.raises(UserError, match=fragment):
        WeightEMA(**kwargs)


def test_gqn_eval_reads_the_average_or_the_trained_weights_and_pairs_them(train_cfg, data_root, tmp_path, capsys,
                                                                          monkeypatch):
    import json

    from conftest import run_main

    from gqn.eval import load_module

    _, ckpt = _ema(train_cfg, "trainer.max_steps=3", "callbacks.ema.decay=0.5")
    path = tmp_path / "ema.ckpt"
    torch.save(ckpt, path)
    average, trained = load_module(str(path)), load_module(str(path), weights="trained")
    for n, p in average.named_parameters():
        torch.testing.assert_close(p.detach(), ckpt["state_dict"][n], rtol=0, atol=0)
    for n, p in trained.named_parameters():
        torch.testing.assert_close(p.detach(), ckpt["current_model_state"][n], rtol=0, atol=0)
    out = tmp_path / "ev"
    monkeypatch.chdir(tmp_path)  # in-process: its relative defaults (paths.output_dir) under tmp_path
    _, stdout, _ = run_main("gqn-eval", [f"ckpt_path={path}", f"baseline_ckpt_path={path}", "baseline_weights=trained",
                                         f"paths.data_dir={data_root}", "data.image_size=32", "num_workers=0",
                                         "limit_batches=1", f"hydra.run.dir={out}"], capsys, check=True)
    assert "(trained weights)" in stdout
    report = json.loads((out / "metrics.json").read_text())
    assert report["weights"] == "average" and report["baseline"]["weights"] == "trained"
    # two sets of weights, so the paired differences are not all zero (the same weights would give exactly 0)
    assert report["metrics"]["paired/elbo"] != 0.0


def test_a_checkpoint_written_mid_validation_keeps_the_average_and_the_trained_weights_apart(train_cfg, tmp_path):
    """SIGINT/SIGTERM stop a run between validation batches, while the model holds the average: the checkpoint
    written there still has the average as state_dict and the trained weights as current_model_state."""
    saved = {}

    class SaveMidValidation(L.Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            if not saved:
                path = tmp_path / "mid.ckpt"
                trainer.save_checkpoint(path)
                saved.update(torch.load(path, map_location="cpu", weights_only=False))

    log, _ = _ema(train_cfg, "trainer.max_steps=3", "trainer.val_check_interval=3", "callbacks.ema.decay=0.75",
                  callbacks=[SaveMidValidation()])
    steps = log.after_step
    for n, trained in steps[3].items():
        average = 0.75 * (0.75 * steps[1][n] + 0.25 * steps[2][n]) + 0.25 * trained
        torch.testing.assert_close(saved["state_dict"][n], average, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(saved["current_model_state"][n], trained, rtol=0, atol=0)


def test_every_n_steps_averages_only_those_steps(train_cfg):
    log, ckpt = _ema(train_cfg, "trainer.max_steps=5", "callbacks.ema.decay=0.75", "callbacks.ema.every_n_steps=2")
    steps = log.after_step  # updates after step indices 0, 2, 4: global steps 1, 3, 5
    for n in steps[5]:
        average = 0.75 * (0.75 * steps[1][n] + 0.25 * steps[3][n]) + 0.25 * steps[5][n]
        torch.testing.assert_close(ckpt["state_dict"][n], average, rtol=1e-5, atol=1e-7)
    assert int(ckpt["averaging_state"]["n_averaged"]) == 3


def test_resuming_an_averaged_run_without_callbacks_ema_is_refused(train_cfg, tmp_path):
    from gqn.cli import UserError

    _, first = _ema(train_cfg, "trainer.max_steps=2")
    path = tmp_path / "first.ckpt"
    torch.save(first, path)
    cfg = train_cfg("logger=none", "trainer.max_steps=3", f"ckpt_path={path}")
    with pytest.raises(UserError, match="was trained with a moving average of its weights \\(callbacks=ema\\): "
                                        "resume it with callbacks=ema"):
        train(cfg)


def test_non_finite_weights_behind_the_average_are_not_written():
    """NonFiniteGuard checks the model's weights before WeightEMA replaces the checkpoint's: trained weights that
    went non-finite after the last update (``every_n_steps``) must still stop the save."""
    from types import SimpleNamespace

    from callbacks.guards import NonFiniteLossError

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

    module, ema = Tiny(), WeightEMA(decay=0.75)
    ema.setup(SimpleNamespace(), module, "fit")
    ema._average_model.update_parameters(module)
    trainer = SimpleNamespace(global_step=5)
    checkpoint = {"state_dict": module.state_dict()}
    ema.on_save_checkpoint(trainer, module, checkpoint)  # finite: written as is
    assert set(checkpoint) >= {"state_dict", "current_model_state", "averaging_state"}
    with torch.no_grad():
        module.layer.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="not finite \\(layer.weight\\) at step 5"):
        ema.on_save_checkpoint(trainer, module, {"state_dict": module.state_dict()})
