"""bf16 mixed precision and torch.compile: every option trains, losses stay fp32, fast == reference in bf16,
compiled == eager, checkpoints of compiled models load into eager ones."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from test_model import ENCODERS, SHARING, _rel, batch, make_model

from gqn.gqn_module import GQNModule
from gqn.model.distributions import gaussian_nll, kl_gaussian
from gqn.model.gqn import compile_model
from gqn.train import train

LOSS_TERMS = ("elbo", "nll", "kl", "kl_steps", "bits_per_pixel", "mse")
BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}

# Fast path vs reference path, both under bf16 autocast: max |a - b| / max |b| over 9 encoder x core
# combinations (h 16, r 32, L 4, batch 3) measured at most: -ELBO and NLL 1.4e-5, KL 1.6e-3, mean image
# 7.7e-3 (2 bf16 ulps: the mean leaves a bf16 convolution), gradients 1.3e-2. Tolerances ~4-7x that:
BF16_TOL = {"elbo": 1e-4, "nll": 1e-4, "kl": 1e-2, "mean": 3e-2, "sample": 3e-2, "grad": 5e-2}
# Compiled (inductor) vs eager in fp32: outputs differ by < 2e-7 relative, gradients < 2e-6 (measured).
COMPILE_TOL = 1e-4


class Record(L.Callback):
    """Training losses (value and dtype) and the validation metrics of a run."""

    def __init__(self):
        self.losses, self.val = [], {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())
        self.module = pl_module
        self.logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}

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
    errors above), outputs, samples and gradients (a gradient further off only where the fast loop's is the nearer
    to fp32's); and the bf16 -ELBO is that of fp32 within 5e-4."""
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
    fp32 = results[True, "fp32"][0]
    for name in ("elbo", "nll", "kl", "mean"):  # as the gradients below (AMX: the KL 1.2e-2 apart)
        a, b, c = out[name].float(), ref[name].float(), fp32[name].float()
        assert _rel(a, b) < BF16_TOL[name] or _rel(a, c) <= max(BF16_TOL[name], _rel(b, c)), name
    assert _rel(sample.float(), ref_sample.float()) < BF16_TOL["sample"]
    for g, rg, g32 in zip(grads, ref_grads, results[True, "fp32"][2]):
        # where the two bf16 paths differ more, the fast one must be the accurate one: on CPUs with AMX bf16 units
        # (Intel Xeon, session 31) the reference loop's gradients of the inference cores' input weights are 0.3-0.6
        # off the fp32 ones and the fast loop's 0.004-0.012 (the fp32 paths agree to 1e-6)
        assert _rel(g, rg) < BF16_TOL["grad"] or _rel(g, g32) <= max(BF16_TOL["grad"], _rel(rg, g32))
    assert _rel(out["elbo"], fp32["elbo"]) < 5e-4  # measured <= 5e-5


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


# ---------------------------------------------------------------------------------------------- compile
def _step_outputs(model, ci, cp, qi, qp):
    model.zero_grad()
    out = model(ci, cp, qi, qp, generator=torch.Generator().manual_seed(3))
    out["elbo"].mean().backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    render = model.render(out["representation"].detach(), qp, mean=True)
    sample = model.sample(ci, cp, qp, generator=torch.Generator().manual_seed(4))
    return out, grads, render, sample


def _assert_compiled_equals_eager(model, data, backend="inductor"):
    keys = list(model.state_dict())
    eager = _step_outputs(model, *data)
    compile_model(model, backend)
    assert list(model.state_dict()) == keys  # in place: no _orig_mod prefixes
    compiled = _step_outputs(model, *data)
    for name in ("elbo", "nll", "kl", "mean"):
        assert _rel(compiled[0][name], eager[0][name]) < COMPILE_TOL, name
    for g, eg in zip(compiled[1], eager[1]):
        assert _rel(g, eg) < COMPILE_TOL
    assert _rel(compiled[2], eager[2]) < COMPILE_TOL and _rel(compiled[3], eager[3]) < COMPILE_TOL


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_equals_eager_tiny(backend):
    """A tiny model compiled gives eager's -ELBO terms, gradients, prior-mean render and seeded sample within
    COMPILE_TOL (1e-4 relative; measured < 2e-6). aot_eager (dynamo graphs + AOT autograd, no code
    generation) is the fast smoke; inductor's C++ compilation took 135 s from a cold cache on 2 busy cores."""
    torch.manual_seed(0)
    model = make_model("tower", "shared", steps=2, h=8, canvas=8, r=8, inference_kernel_size=3)
    _assert_compiled_equals_eager(model, batch(B=2, M=2), backend)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["small", "paper"])
def test_compiled_equals_eager_presets(preset):
    """The default (small, 32 px) and the paper (64 px) presets, batch 2, 3 context views."""
    from gqn.bench import build_model

    torch.manual_seed(0)
    size = 32 if preset == "small" else 64
    model = build_model(preset, image_size=size)
    _assert_compiled_equals_eager(model, batch(B=2, M=3, size=size))


def _assert_checkpoint_loads_both_ways(cfg, option: str, value, other) -> None:
    """The run's last checkpoint saved ``option=value``; it loads into a module with it and one with ``other`` (the
    same state-dict keys), and both render the same prior mean."""
    ckpt = torch.load(Path(cfg.hydra.runtime.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"][option] == value
    modules = [GQNModule(**{**ckpt["hyper_parameters"], option: v}) for v in (value, other)]
    assert list(ckpt["state_dict"]) == list(modules[1].state_dict())
    for module in modules:
        module.load_state_dict(ckpt["state_dict"])
    ci, cp, _, qp = batch(B=2, M=2)
    b = {"context_images": ci, "context_poses": cp, "query_poses": qp}
    assert _rel(modules[0].sample(b, mean=True), modules[1].sample(b, mean=True)) < COMPILE_TOL


def _train_compiled(train_cfg, *overrides):
    cfg = train_cfg("logger=none", "trainer.log_every_n_steps=1", *overrides)
    record = Record()
    train(cfg, extra_callbacks=[record])  # training steps, validation, callbacks' sampling and fly-through
    return cfg, record


@pytest.mark.parametrize("precision", [pytest.param("32-true", marks=pytest.mark.slow), "bf16-mixed"])
def test_compiled_module_trains_validates_samples_and_checkpoints(train_cfg, precision):
    """module.compile (here the aot_eager backend: dynamo tracing and AOT autograd without code generation)
    runs the training step, validation and the callbacks' sampling; its checkpoint has the eager keys and
    loads into an eager module that reproduces the compiled module's prior-mean render."""
    cfg, record = _train_compiled(train_cfg, "module.compile=aot_eager", f"trainer.precision={precision}")
    assert len(record.losses) == 2 and all(math.isfinite(x.item()) for x in record.losses)
    assert math.isfinite(record.val["val/psnr_model"])
    _assert_checkpoint_loads_both_ways(cfg, "compile", "aot_eager", False)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_depth_search_options_train_in_bf16_mixed(train_cfg, compiled):
    """The depth search's two options (off by default): the filter over the depth scores runs under the
    caller's bf16 autocast and the plane-NLL loss reads an fp32 stash; both train (eager, and compiled with the
    aot_eager backend), with fp32 losses and a finite plane NLL, and validate."""
    record = Record()
    cfg = train_cfg("logger=none", "callbacks=none", "trainer.precision=bf16-mixed", "trainer.log_every_n_steps=1",
                    "model.geometry.cost_filter=2", "module.depth_weight=0.5",
                    *(["module.compile=aot_eager"] if compiled else []))
    train(cfg, extra_callbacks=[record])
    assert len(record.losses) == 2
    assert all(loss.dtype == torch.float32 and math.isfinite(loss.item()) for loss in record.losses)
    assert math.isfinite(record.val["val/psnr_model"]) and math.isfinite(record.logged["train/plane_nll"])
    assert record.logged["train/plane_nll"] > 0
    geometry = record.module.model.geometry
    assert geometry.cost_filter is not None and geometry.keep_planes
    assert all(torch.isfinite(p).all() for p in geometry.cost_filter.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("model", ["small", "paper"])
def test_inductor_compiled_module_trains_validates_and_samples(train_cfg, model):
    _, record = _train_compiled(train_cfg, f"model={model}", "module.compile=true")
    assert len(record.losses) == 2 and all(math.isfinite(x.item()) for x in record.losses)
    assert math.isfinite(record.val["val/psnr_model"])


def test_unknown_compile_backend_is_one_clear_error():
    """module.compile=<not a backend> is a UserError (gqn-train prints it as one line and exits 2)."""
    from gqn.cli import UserError

    with pytest.raises(UserError, match="module.compile='fast_please' is neither true/false nor a torch.compile"):
        compile_model(make_model(), "fast_please")


# ---------------------------------------------------------------------------------------------- channels-last
def test_channels_last_default_model_equals_contiguous():
    """The default model (small, plane-sweep read, 32 px) with its 4-D weights channels-last (module.channels_last)
    gives the contiguous model's -ELBO terms, gradients, prior-mean render and seeded sample in fp32 (within
    COMPILE_TOL); every spatial convolution's weight is channels-last (and no longer contiguous NCHW)."""
    import copy

    from gqn.bench import build_model

    torch.manual_seed(0)
    model = build_model("small", image_size=32, geometry="plane_sweep")
    data = batch(B=2, M=3, size=32)
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    convs = [m.weight for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs
                         if w.shape[-1] > 1 or w.shape[-2] > 1)

    def outputs(m):
        m.zero_grad()
        out = m(*data, generator=torch.Generator().manual_seed(3))
        out["elbo"].mean().backward()
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in m.parameters()]
        ci, cp, _, qp = data
        renders = [m.sample(ci, cp, qp, mean=True), m.sample(ci, cp, qp, generator=torch.Generator().manual_seed(4))]
        return out, grads, renders

    eager, cl = outputs(model), outputs(nhwc)
    for name in ("elbo", "nll", "kl", "mean"):
        assert _rel(cl[0][name], eager[0][name]) < COMPILE_TOL, name
    # gradients against the largest of them: two sum to ~0 in both layouts (a softmax's shared bias: 6e-7 against
    # 1.5e-6) and the depth scale's sum of many terms rounds 9e-4 apart (relative to itself)
    scale = max(float(eg.abs().max()) for eg in eager[1])
    assert max(float((g - eg).abs().max()) for g, eg in zip(cl[1], eager[1])) < COMPILE_TOL * scale
    for r, er in zip(cl[2], eager[2]):
        assert _rel(r, er) < COMPILE_TOL


def test_the_read_goes_channels_last_with_the_weights():
    """With its weights channels-last the generator turns the geometric read channels-last once, so the read's
    summary conv and the blend's first layer take it without a layout copy each (3-5 % of the default's step on a
    2-core EPYC); with contiguous weights the read stays as the sweep made it."""
    import copy

    from gqn.bench import build_model

    torch.manual_seed(0)
    model = build_model("small", image_size=32, geometry="plane_sweep")
    data = batch(B=2, M=3, size=32)
    for m, channels_last in ((model, False), (copy.deepcopy(model).to(memory_format=torch.channels_last), True)):
        seen = _read_inputs(m, data)
        assert len(seen) == 2 and all(x.is_contiguous(memory_format=torch.channels_last) == channels_last
                                      for x in seen)


def _read_inputs(model, data, autocast: bool = False) -> list[torch.Tensor]:
    """The tensors shaped as the geometric read that convolutions of ``model``'s forward take (F.conv2d watched)."""
    import torch.nn.functional as F

    seen, shape, conv2d = [], (data[0].shape[0], model.generator.geometry_channels), F.conv2d

    def watch(x, *args, **kwargs):
        if tuple(x.shape[:2]) == shape:
            seen.append(x)
        return conv2d(x, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, torch.autocast(**BF16, enabled=autocast):
        mp.setattr(F, "conv2d", watch)
        mp.setattr(torch.nn.modules.conv.F, "conv2d", watch)
        model(*data)
    return seen


def test_under_autocast_the_read_is_cast_once_and_the_colours_copied_in_fp32():
    """Under bf16 autocast the generator casts the geometric read (fp32) to bf16 once, in the weights' layout, for
    both convolutions that take it (each cast its own copy before, and its gradients were cast back and summed one
    by one; with the blend's concatenation ~14 % of the default's bf16 step in a profile, and without them the step
    took 0.93x the time on an EPYC with bf16 units), and copies the colours it blends from the fp32 read itself; the
    blend's first layer, the sum of its convs of the canvas and of the read, is the conv of the two concatenated."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from gqn.bench import build_model

    torch.manual_seed(0)
    model = build_model("small", image_size=32, geometry="plane_sweep", channels_last="true")
    data = batch(B=2, M=3, size=32)
    seen = _read_inputs(model, data, autocast=True)
    assert len(seen) == 2 and seen[0] is seen[1]  # one tensor for both convs
    assert seen[0].dtype == torch.bfloat16 and seen[0].is_contiguous(memory_format=torch.channels_last)

    class Casts(TorchDispatchMode):  # copies the forward makes of tensors shaped as the read
        def __init__(self, shape):
            super().__init__()
            self.shape, self.count = shape, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.clone, torch.ops.aten.copy_) and (
                    isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape):
                self.count += 1
            return out

    casts = Casts(tuple(seen[0].shape))
    with casts, torch.autocast(**BF16):
        model(*data)
    assert casts.count == 1

    g = model.generator
    canvas, read = torch.rand(2, g.canvas_up.out_channels, 32, 32), torch.rand(2, g.geometry_channels, 32, 32)
    with torch.autocast(**BF16):
        parts = g.observe(canvas, read.to(torch.bfloat16), parts=True, read=read)
    assert parts["copies"].dtype == torch.float32
    assert torch.equal(parts["copies"][:, 0], read[:, :3])  # the found colour, not rounded to bf16
    mix = g.geometry_skip(torch.cat([canvas, read], dim=1))  # the layers as modules, on the concatenation
    drawn = torch.sigmoid(g.observation(canvas) + mix[:, g.geometry_copies:])
    assert torch.allclose(g.observe(canvas, read, parts=True)["drawn"], drawn, atol=1e-6)


def test_channels_last_module_trains_and_its_checkpoint_loads_either_way(train_cfg):
    """module.channels_last=true trains (bf16 autocast), validates and checkpoints; the checkpoint loads into a
    module with and without it, and both render the same prior mean."""
    cfg = train_cfg("logger=none", "callbacks=none", "trainer.precision=bf16-mixed", "trainer.log_every_n_steps=1",
                    "module.channels_last=true")
    record = Record()
    train(cfg, extra_callbacks=[record])
    assert len(record.losses) == 2 and all(math.isfinite(x.item()) for x in record.losses)
    assert math.isfinite(record.val["val/psnr_model"])
    conv = next(m for m in record.module.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    _assert_checkpoint_loads_both_ways(cfg, "channels_last", True, False)
