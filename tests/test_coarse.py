"""schedule.coarse_steps: the first training steps on downsampled images, then the full size."""

from __future__ import annotations

from unittest.mock import PropertyMock, patch

import pytest
import torch
from conftest import module_with_batch
from hydra.utils import instantiate

from gqn.bench import build_model
from gqn.gqn_module import downsample_batch

TINY_MODEL = {"hidden_channels": 8, "canvas_channels": 8, "num_steps": 2, "encoder.channels": 8}


def _scenes(B: int, M: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, M, 3, size, size, generator=g), torch.randn(B, M, 7, generator=g) * 0.5,
            torch.rand(B, 3, size, size, generator=g), torch.randn(B, 7, generator=g) * 0.5)


@pytest.mark.parametrize("geometry,extra", [
    (None, {}), ("plane_sweep", {}),
    # grid coordinates and the attention over the views' patches read the latent grid's positions; the reference path
    ("plane_sweep", {"encoder": "attention", "grid_coords": True, "fast": False}),
])
def test_a_model_at_a_coarser_size_computes_what_a_model_built_for_that_size_computes(geometry, extra):
    """The weights are size-agnostic: a 32 px model run on 16 px images inside ``at_image_size(16)`` gives the
    ELBO terms and the render of a 16 px model holding the same weights; outside the block it is a 32 px model."""
    torch.manual_seed(0)
    big = build_model("small", image_size=32, geometry=geometry, **TINY_MODEL, **extra)
    small = build_model("small", image_size=16, geometry=geometry, **TINY_MODEL, **extra)
    small.load_state_dict(big.state_dict())
    scenes = _scenes(2, 3, 16)
    with big.at_image_size(16):
        assert big.generator.grid == 4 and big.image_size == 16
        torch.manual_seed(1)
        got = big(*scenes, sigma=0.5)
        r = big.represent(*scenes[:2])
        render = big.render(r, scenes[3], mean=True, **({"views": got["views"], "geometry": got["geometry"]}))
    torch.manual_seed(1)
    want = small(*scenes, sigma=0.5)
    want_render = small.render(small.represent(*scenes[:2]), scenes[3], mean=True,
                               **({"views": want["views"], "geometry": want["geometry"]}))
    for key in ("elbo", "nll", "kl"):
        assert torch.allclose(got[key], want[key], rtol=1e-5, atol=1e-4), key
    assert render.shape == (2, 3, 16, 16) and torch.allclose(render, want_render, atol=1e-5)
    assert big.generator.grid == 8 and big.image_size == 32 and big.generator.coords.shape[-1] == 8
    with pytest.raises(ValueError, match="context images are 3x16x16 but the model expects 3x32x32"):
        big(*scenes, sigma=0.5)
    assert big(*_scenes(2, 3, 32), sigma=0.5)["elbo"].shape == (2,)


def test_the_built_size_comes_back_when_the_block_raises():
    model = build_model("small", image_size=32, **TINY_MODEL)
    with pytest.raises(RuntimeError, match="boom"), model.at_image_size(16):
        assert model.encoder.image_size == 16
        raise RuntimeError("boom")
    assert (model.image_size, model.generator.image_size, model.generator.grid, model.encoder.image_size,
            model.encoder.out_size) == (32, 32, 8, 32, 8)


def test_downsample_batch_averages_pixel_blocks_of_context_and_every_query_view():
    batch = {"context_images": torch.rand(2, 3, 3, 8, 8), "query_images": torch.rand(2, 4, 3, 8, 8),
             "context_poses": torch.rand(2, 3, 7), "query_poses": torch.rand(2, 4, 7)}
    out = downsample_batch(batch, 2)
    assert out["context_images"].shape == (2, 3, 3, 4, 4) and out["query_images"].shape == (2, 4, 3, 4, 4)
    block = batch["query_images"][1, 2, :, 4:6, 2:4].mean((-1, -2))
    assert torch.allclose(out["query_images"][1, 2, :, 2, 1], block)
    assert out["context_poses"] is batch["context_poses"] and out["query_poses"] is batch["query_poses"]


def test_coarse_steps_train_on_downsampled_images_then_at_the_full_size(train_cfg):
    """Before ``schedule.coarse_steps`` the loss is that of the batch downsampled by ``coarse_factor``, its pixel NLL
    scaled by factor^2 (the full image's pixel count); from it on, the loss of the batch as it is."""
    module, batch, logged = module_with_batch(train_cfg("schedule.coarse_steps=3"))
    model = module.model

    def loss_at(step):
        with patch.object(type(module), "global_step", new_callable=PropertyMock, return_value=step):
            torch.manual_seed(0)
            return module.training_step(batch, 0)

    coarse = loss_at(2)
    assert logged["train/image_size"] == 16 and model.image_size == 32
    small = downsample_batch(batch, 2)
    with model.at_image_size(16):
        torch.manual_seed(0)
        out = model(small["context_images"], small["context_poses"], small["query_images"],
                    small["query_poses"], sigma=module.sigma())
    assert coarse.item() == pytest.approx((4 * out["nll"] + out["kl"]).mean().item(), rel=1e-5)
    full = loss_at(3)
    assert logged["train/image_size"] == 32
    torch.manual_seed(0)
    out = model(batch["context_images"], batch["context_poses"], batch["query_images"], batch["query_poses"],
                sigma=module.sigma())
    assert full.item() == pytest.approx((out["nll"] + out["kl"]).mean().item(), rel=1e-5)
    # off by default: every step at the full size
    plain = instantiate(train_cfg().module, _recursive_=False)
    assert [plain.coarse_factor(s) for s in (0, 10**6)] == [1, 1]
    assert [module.coarse_factor(s) for s in (0, 2, 3)] == [2, 2, 1]


def test_a_run_trains_its_coarse_steps_then_full_size_steps_and_validates_at_the_full_size(train_cfg):
    """gqn-train end to end: steps 0-2 at 16 px, 3-4 at 32 px (the logged image size), validation at 32 px, and a
    checkpoint that renders 32 px views."""
    import csv
    from pathlib import Path

    from gqn.gqn_module import GQNModule
    from gqn.train import train

    cfg = train_cfg("logger=csv", "schedule.coarse_steps=3", "trainer.max_steps=5", "trainer.val_check_interval=2",
                    "trainer.log_every_n_steps=1")
    train(cfg)
    run = Path(cfg.hydra.runtime.output_dir)
    (metrics,) = run.rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.read_text().splitlines()))
    sizes = {int(r["step"]): float(r["train/image_size"]) for r in rows if r.get("train/image_size")}
    assert sizes == {0: 16.0, 1: 16.0, 2: 16.0, 3: 32.0, 4: 32.0}
    # validation during the coarse steps (step 2) and after them, at the full size each time
    assert [int(r["step"]) for r in rows if r.get("val/psnr_model")][:2] == [1, 3]
    module = GQNModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert module.model.image_size == 32 and module.coarse_factor(module.global_step_loaded) == 1


def test_the_default_experiment_trains_its_first_steps_coarse_and_the_paper_schedules_never(tmp_path):
    from conftest import compose_train

    default = compose_train([], tmp_path / "a").schedule
    assert default.coarse_steps > 0 and default.coarse_factor == 2
    paper = compose_train(["experiment=rooms_ring_camera"], tmp_path / "b").schedule
    assert paper.get("coarse_steps", 0) == 0


def test_a_coarse_step_scales_the_auxiliary_pixel_loss_like_the_nll(train_cfg):
    """The prior-mean render's NLL (an auxiliary pixel loss) is summed over the small image's pixels too: scaled by
    factor^2 like the ELBO's NLL."""
    from gqn.model.distributions import gaussian_nll

    module, batch, _ = module_with_batch(train_cfg("schedule.coarse_steps=3", "module.prior_mean_weight=0.5",
                                                   "module.prior_mean_start=0"))
    model = module.model
    with patch.object(type(module), "global_step", new_callable=PropertyMock, return_value=0):
        torch.manual_seed(0)
        loss = module.training_step(batch, 0)
        sigma = module.sigma()
    small = downsample_batch(batch, 2)
    with model.at_image_size(16):
        torch.manual_seed(0)
        out = model(small["context_images"], small["context_poses"], small["query_images"], small["query_poses"],
                    sigma=sigma)
        mean = model.generate(small["query_poses"], out["representation"], out["views"], out["geometry"],
                              sample_prior=False)["mean"]
    prior_nll = gaussian_nll(small["query_images"], mean, sigma)
    expected = (4 * out["nll"] + out["kl"]).mean() + 0.5 * 4 * prior_nll.mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
