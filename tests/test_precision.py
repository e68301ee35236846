"""bf16 mixed precision: every option trains, losses and image metrics stay fp32, fast == reference in bf16."""

from __future__ import annotations

import itertools
import math

import lightning as L
import pytest
import torch
from test_model import ENCODERS, SHARING, _rel, batch, make_model

from gqn.model.distributions import gaussian_nll, kl_gaussian
from gqn.train import train

LOSS_TERMS = ("elbo", "nll", "kl", "kl_steps", "bits_per_pixel", "mse")
BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}

# Fast path vs reference path, both under bf16 autocast: max |a - b| / max |b| over 9 encoder x core
# combinations (h 16, r 32, L 4, batch 3) measured at most: -ELBO and NLL 1.4e-5, KL 1.6e-3, mean image
# 7.7e-3 (2 bf16 ulps: the mean leaves a bf16 convolution), gradients 1.3e-2. Tolerances ~4-7x that:
BF16_TOL = {"elbo": 1e-4, "nll": 1e-4, "kl": 1e-2, "mean": 3e-2, "sample": 3e-2, "grad": 5e-2}


class Record(L.Callback):
    """Training losses (value and dtype) and the validation metrics of a run."""

    def __init__(self):
        self.losses, self.val = [], {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())

    def on_validation_epoch_end(self, trainer, pl_module):
        self.val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


# ---------------------------------------------------------------------------------------------- bf16-mixed
def test_loss_helpers_return_fp32_for_bf16_inputs():
    g = torch.Generator().manual_seed(0)
    mq, mp = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    sq, sp = torch.rand(2, 3, 4, 4, generator=g) + 0.1, torch.rand(2, 3, 4, 4, generator=g) + 0.1
    kl = kl_gaussian(*(t.bfloat16() for t in (mq, sq, mp, sp)))
    assert kl.dtype == torch.float32
    x, mean = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    assert gaussian_nll(x, mean.bfloat16(), 0.5).dtype == torch.float32
    assert gaussian_nll(x.double(), mean.double(), 0.5).dtype == torch.float64  # never narrowed


@pytest.mark.parametrize("fast", [True, False])
def test_loss_terms_are_fp32_under_autocast(fast):
    model = make_model("tower", "shared", steps=3)
    model.generator.fast = fast
    ci, cp, qi, qp = batch()
    with torch.autocast(**BF16):
        out = model(ci, cp, qi, qp)
        prior = model.sample(ci, cp, qp)
    assert out["representation"].dtype == torch.bfloat16  # autocast is on: the convolutions ran in bf16
    for key in LOSS_TERMS:
        assert out[key].dtype == torch.float32, key
        assert torch.isfinite(out[key]).all(), key
    assert torch.isfinite(prior).all()


@pytest.mark.parametrize("encoder,sharing", itertools.product(ENCODERS, SHARING))
def test_fast_path_equals_reference_under_bf16(encoder, sharing):
    """Under bf16 autocast, the optimised DRAW loop matches the reference loop within BF16_TOL (measured
    errors above), outputs, samples and gradients; and the bf16 -ELBO is that of fp32 within 5e-4."""
    torch.manual_seed(0)
    model = make_model(encoder, sharing, steps=4, h=16, canvas=16, r=32)
    ci, cp, qi, qp = batch(B=3)
    results = {}
    for fast, precision in ((False, "bf16"), (True, "bf16"), (True, "fp32")):
        model.generator.fast = fast
        model.zero_grad()
        with torch.autocast(**BF16, enabled=precision == "bf16"):
            out = model(ci, cp, qi, qp, generator=torch.Generator().manual_seed(3))
            sample = model.sample(ci, cp, qp, generator=torch.Generator().manual_seed(4))
        out["elbo"].mean().backward()
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        results[fast, precision] = out, sample, grads
    (ref, ref_sample, ref_grads), (out, sample, grads) = results[False, "bf16"], results[True, "bf16"]
    for name in ("elbo", "nll", "kl", "mean"):
        assert _rel(out[name].float(), ref[name].float()) < BF16_TOL[name], name
    assert _rel(sample.float(), ref_sample.float()) < BF16_TOL["sample"]
    for g, rg in zip(grads, ref_grads):
        assert _rel(g, rg) < BF16_TOL["grad"]
    assert _rel(out["elbo"], results[True, "fp32"][0]["elbo"]) < 5e-4  # measured <= 5e-5


def test_bf16_noise_is_the_fp32_noise():
    """The latent noise is drawn in fp32 under autocast, so a seed gives the same latents in both precisions."""
    model = make_model("pool", "shared", steps=2)
    ci, cp, _, qp = batch(B=16)  # 16 x 3 x 8 x 8 draws: bf16 randn would give other numbers, not rounded ones
    with torch.autocast(**BF16):
        r = model.represent(ci, cp)
        noise = model.generator._noise(16, r, torch.Generator().manual_seed(5))
    assert r.dtype == torch.bfloat16 and noise[0].dtype == torch.float32
    assert torch.equal(noise[1], model.generator._noise(16, r.float(), torch.Generator().manual_seed(5))[1])


@pytest.mark.parametrize("encoder", list(ENCODERS))
@pytest.mark.parametrize("core", SHARING)
def test_every_encoder_and_core_trains_in_bf16_mixed(train_cfg, encoder, core):
    record = Record()
    cfg = train_cfg("model=paper", f"model/encoder={encoder}", f"model/core={core}", "logger=none",
                    "callbacks=none", "trainer.precision=bf16-mixed", "trainer.max_steps=2",
                    "trainer.val_check_interval=2")
    train(cfg, extra_callbacks=[record])
    assert len(record.losses) == 2
    for loss in record.losses:
        assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert math.isfinite(record.val["val/elbo"]) and math.isfinite(record.val["val/psnr_model"])


def test_validation_image_metrics_are_fp32_under_bf16_mixed(train_cfg):
    """The context-view baselines do not depend on the model: bf16-mixed must log the fp32 numbers (SSIM's
    convolutions under bf16 autocast gave -0.50 for a 0.62 SSIM before the metrics left autocast)."""
    val = {}
    for precision in ("32-true", "bf16-mixed"):
        record = Record()
        train(train_cfg("logger=none", "callbacks=none", f"trainer.precision={precision}"), extra_callbacks=[record])
        val[precision] = record.val
    for key in ("val/psnr_nearest_view", "val/ssim_nearest_view", "val/psnr_mean_view", "val/ssim_mean_view"):
        assert val["bf16-mixed"][key] == pytest.approx(val["32-true"][key], rel=1e-6), key
    assert val["bf16-mixed"]["val/psnr_model"] == pytest.approx(val["32-true"]["val/psnr_model"], abs=0.05)
