"""The GQN model: shapes, KL, gradients, sharing, seeded sampling, fast path == reference path."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from gqn.model import GQN, AttentionTower, Pool, Pyramid, Tower
from gqn.model.convlstm import ConvLSTMCell, broadcast_conv
from gqn.model.distributions import kl_gaussian
from gqn.model.geometry import PlaneSweep

ENCODERS = {"tower": Tower, "pool": Pool, "pyramid": Pyramid, "attention": AttentionTower}
SHARING = ["unshared", "shared", "shared_inference_generation"]


def make_model(encoder="tower", sharing="shared", steps=2, size=32, **kw):
    enc = ENCODERS[encoder](image_size=size, channels=kw.pop("r", 16))
    geometry = kw.pop("geometry", False)
    if geometry:  # a small plane-sweep read ("visibility": with the views' own depth maps)
        kw["geometry"] = PlaneSweep(size, feature_channels=2, depths=4, sweep_size=size // 4,
                                    visibility=geometry in ("visibility", "occluder"), visibility_size=size // 8,
                                    occluder_colour=geometry == "occluder",
                                    plane_views=int(geometry in ("agreement", "resample")),
                                    plane_agreement=geometry == "agreement", nearest_view=geometry == "resample",
                                    plane_resample=geometry == "resample")
    return GQN(enc, image_size=size, hidden_channels=kw.pop("h", 8), canvas_channels=kw.pop("canvas", 8),
               latent_channels=kw.pop("z", 3), num_steps=steps, core_sharing=sharing, **kw)


def batch(B=2, M=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, M, 3, size, size, generator=g), torch.randn(B, M, 7, generator=g),
            torch.rand(B, 3, size, size, generator=g), torch.randn(B, 7, generator=g))


@pytest.mark.parametrize("encoder,sharing,steps", itertools.product(ENCODERS, SHARING, [1, 2, 12]))
def test_output_shapes(encoder, sharing, steps):
    model = make_model(encoder, sharing, steps, h=4, canvas=4, r=8)
    ci, cp, qi, qp = batch()
    out = model(ci, cp, qi, qp, sigma=0.7)
    for key in ("elbo", "nll", "kl", "bits_per_pixel", "mse"):
        assert out[key].shape == (2,) and torch.isfinite(out[key]).all(), key
    assert out["kl_steps"].shape == (2, steps)
    assert out["mean"].shape == (2, 3, 32, 32)
    assert torch.allclose(out["elbo"], out["nll"] + out["kl"])
    img, seq = model.sample(ci, cp, qp, return_sequence=True)
    assert img.shape == (2, 3, 32, 32) and seq.shape == (2, steps, 3, 32, 32)
    assert torch.allclose(seq[:, -1], img)


@pytest.mark.parametrize("size", [32, 64, 84, 128])
@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_image_sizes(size, encoder):
    model = make_model(encoder, "shared", 2, size=size, h=4, canvas=4, r=8)
    ci, cp, qi, qp = batch(B=1, M=1, size=size)  # a single context view works too
    r = model.represent(ci, cp)
    assert r.shape[-1] in (1, size // 4)
    assert model(ci, cp, qi, qp)["mean"].shape == (1, 3, size, size)


def test_representation_is_a_sum_over_views():
    model = make_model("tower")
    ci, cp, qi, qp = batch(M=3)
    r = model.represent(ci, cp)
    assert torch.equal(model(ci, cp, qi, qp)["representation"], r)  # forward hands out the same r
    assert torch.equal(model.render(r, qp, mean=True), model.sample(ci, cp, qp, mean=True))
    parts = sum(model.represent(ci[:, i : i + 1], cp[:, i : i + 1]) for i in range(3))
    assert torch.allclose(r, parts, atol=1e-5)


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mq, mp = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    sq, sp = torch.rand(4, 3, 5, 5, generator=g) + 0.1, torch.rand(4, 3, 5, 5, generator=g) + 0.1
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mq, sq), torch.distributions.Normal(mp, sp))
    assert torch.allclose(kl_gaussian(mq, sq, mp, sp), expected, rtol=1e-5, atol=1e-6)


def test_nll_is_the_gaussian_log_likelihood():
    model = make_model()
    ci, cp, qi, qp = batch()
    out = model(ci, cp, qi, qp, sigma=0.5, generator=torch.Generator().manual_seed(0))
    expected = -torch.distributions.Normal(out["mean"], 0.5).log_prob(qi).flatten(1).sum(1)
    assert torch.allclose(out["nll"], expected, rtol=1e-5)


@pytest.mark.parametrize("encoder,sharing", itertools.product(ENCODERS, SHARING))
def test_gradients_reach_every_parameter(encoder, sharing):
    model = make_model(encoder, sharing, steps=3)
    ci, cp, qi, qp = batch()
    model(ci, cp, qi, qp)["elbo"].mean().backward()
    missing = {n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0}
    if sharing == "unshared":  # step 0's own cores only ever see the zero initial states
        missing -= {"generator.inference_cores.0.weight.h", "generator.inference_cores.0.weight.h_g",
                    "generator.generation_cores.0.weight.h"}
    assert not missing, missing


def test_core_sharing_parameter_counts():
    L = 5
    counts = {}
    for sharing in SHARING:
        gen = make_model("pool", sharing, steps=L).generator
        counts[sharing] = (len(gen.inference_cores), len(gen.generation_cores),
                           sum(p.numel() for p in gen.parameters()))
    assert counts["unshared"][:2] == (L, L)
    assert counts["shared"][:2] == (1, 1)
    gen = make_model("pool", "shared_inference_generation", steps=L).generator
    assert gen.inference_cores[0] is gen.generation_cores[0]
    core_params = {s: sum(p.numel() for p in make_model("pool", s, steps=L).generator.inference_cores.parameters())
                   for s in ("unshared", "shared")}
    assert core_params["unshared"] == L * core_params["shared"]
    assert counts["shared_inference_generation"][2] < counts["shared"][2]


def test_sampling_is_reproducible_with_a_seed():
    model = make_model("tower", "unshared", 3)
    ci, cp, _, qp = batch()
    a = model.sample(ci, cp, qp, generator=torch.Generator().manual_seed(7))
    b = model.sample(ci, cp, qp, generator=torch.Generator().manual_seed(7))
    c = model.sample(ci, cp, qp, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    m1, m2 = model.sample(ci, cp, qp, mean=True), model.sample(ci, cp, qp, mean=True)
    assert torch.equal(m1, m2)


def test_prior_uses_the_same_generator_state_in_training_and_sampling():
    """The prior of step l reads the generator state after step l-1 (zero at step 0), in both modes."""
    model = make_model("tower", "unshared", 4)
    model.generator.fast = False  # the reference path calls the cores' forward (hookable)
    gen = model.generator
    ci, cp, qi, qp = batch()
    for training in (True, False):
        prior_in, gen_out = [], []
        hooks = [gen.prior_head.register_forward_hook(lambda m, i, o, acc=prior_in: acc.append(i[0].detach()))]
        hooks += [c.register_forward_hook(lambda m, i, o, acc=gen_out: acc.append(o[0].detach()))
                  for c in gen.generation_cores]
        if training:
            model(ci, cp, qi, qp)
        else:
            model.sample(ci, cp, qp)
        for h in hooks:
            h.remove()
        assert len(prior_in) == 4 and len(gen_out) == 4
        assert prior_in[0].abs().max() == 0
        for step in range(1, 4):
            assert torch.equal(prior_in[step], gen_out[step - 1])


def test_broadcast_conv_is_exact():
    g = torch.Generator().manual_seed(0)
    code, w = torch.randn(3, 6, generator=g), torch.randn(10, 6, 5, 5, generator=g)
    ref = torch.nn.functional.conv2d(code[:, :, None, None].expand(-1, -1, 7, 7), w, padding=2)
    assert torch.allclose(broadcast_conv(code, w, 7), ref, atol=1e-5)
    for dilation in (2, 3):  # the taps dilation apart, zero padding dilation * 2
        ref = F.conv2d(code[:, :, None, None].expand(-1, -1, 7, 7), w, padding=2 * dilation, dilation=dilation)
        assert torch.allclose(broadcast_conv(code, w, 7, dilation), ref, atol=1e-5)


def test_cell_group_kernels_and_dilation():
    """A cell with per-group kernels convolves each group with its own kernel (the smaller ones zero-padded, not
    cropped: the same as separate convolutions), and its dilation spaces the taps: a 3x3 kernel at dilation 2
    reaches two grid positions away and not one."""
    torch.manual_seed(0)
    cell = ConvLSTMCell({"v": 2, "z": 3}, 4, kernel_size=5, kernel_sizes={"h": 3, "z": 3, "a": 3})
    assert {n: w.shape[-1] for n, w in cell.weight.items()} == {"v": 5, "z": 3, "h": 3}  # no "a" group: ignored
    v, z, h = torch.randn(2, 2, 6, 6), torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6)
    ref = (F.conv2d(v, cell.weight["v"], padding=2) + F.conv2d(z, cell.weight["z"], padding=1)
           + F.conv2d(h, cell.weight["h"], padding=1))
    assert torch.allclose(cell.conv(torch.cat([v, z, h], 1), ["v", "z", "h"]), ref, atol=1e-5)
    assert torch.allclose(cell.conv(torch.cat([z, h], 1), ["z", "h"]), ref - F.conv2d(v, cell.weight["v"], padding=2),
                          atol=1e-5)
    both = ConvLSTMCell({"v": 2, "z": 3}, 4, kernel_size=5, kernel_sizes={"h": 3, "z": 3}, dilation=2)
    ref = (F.conv2d(v, both.weight["v"], padding=4, dilation=2) + F.conv2d(z, both.weight["z"], padding=2, dilation=2)
           + F.conv2d(h, both.weight["h"], padding=2, dilation=2))
    assert torch.allclose(both.conv(torch.cat([v, z, h], 1), ["v", "z", "h"]), ref, atol=1e-5)
    dilated = ConvLSTMCell({"v": 1}, 1, kernel_size=3, dilation=2)
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[0, 0, 4, 4] = 1
    reach = dilated.conv(impulse, ["v"])[0].abs().sum(0)
    assert reach.shape == (9, 9) and (reach != 0).nonzero().tolist() == [[y, x] for y in (2, 4, 6) for x in (2, 4, 6)]
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        ConvLSTMCell({"v": 1}, 1, dilation=0)
    with pytest.raises(ValueError, match="must be odd"):
        ConvLSTMCell({"v": 1}, 1, kernel_sizes={"h": 4})


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize(
    "encoder,sharing,options",
    [(e, s, {}) for e, s in itertools.product(ENCODERS, SHARING)]
    + [(e, s, {"grid_coords": True, "inference_kernel_size": 3}) for e, s in itertools.product(ENCODERS, SHARING[:2])]
    + [("tower", "shared_inference_generation", {"grid_coords": True})]
    + [(e, s, {"geometry": True}) for e, s in itertools.product(["tower", "attention"], SHARING)]
    + [("tower", "shared", {"geometry": "visibility"}), ("tower", "shared", {"geometry": "occluder"})]
    + [("tower", s, {"canvas_kernel": 8}) for s in SHARING]
    + [("tower", "shared", {"canvas_kernel": 8, "geometry": True})]
    + [("tower", "shared", {"geometry": "agreement", "geometry_match": 10.0})]
    + [("tower", "unshared", {"geometry": "resample", "geometry_mix_widths": [8, 8]})]
    + [(e, s, {"step_kernel_size": 3, "dilation": 2}) for e, s in itertools.product(["tower", "attention"], SHARING)]
    + [("pool", "shared", {"step_kernel_size": 3, "dilation": 2, "geometry": True})]
    + [("tower", "unshared", {"dilation": 2})],
)
def test_fast_path_equals_reference(encoder, sharing, options):
    """Outputs and gradients of the optimised DRAW loop within 1e-4 relative of the reference (float32)."""
    torch.manual_seed(0)
    model = make_model(encoder, sharing, steps=4, h=16, canvas=16, r=32, **options)
    ci, cp, qi, qp = batch(B=3)
    results = {}
    for fast, ckpt in ((False, False), (True, False), (True, True)):
        model.generator.fast, model.generator.checkpoint_steps = fast, ckpt
        model.zero_grad()
        out = model(ci, cp, qi, qp, generator=torch.Generator().manual_seed(3))
        out["elbo"].mean().backward()
        sample = model.sample(ci, cp, qp, generator=torch.Generator().manual_seed(4), return_sequence=True)
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        results[(fast, ckpt)] = (out, grads, sample)
    ref_out, ref_grads, ref_sample = results[(False, False)]
    tol = 5e-4 if options.get("geometry") else 1e-4  # the plane sweep's sampling adds float32 rounding
    for key in [(True, False), (True, True)]:
        out, grads, sample = results[key]
        for name in ("elbo", "nll", "kl", "mean") + (("drawn",) if out["drawn"] is not None else ()):
            assert _rel(out[name], ref_out[name]) < 1e-4, (key, name)
        assert _rel(sample[0], ref_sample[0]) < 1e-4 and _rel(sample[1], ref_sample[1]) < 1e-4
        for g, rg in zip(grads, ref_grads):  # (or both ~0: the plane sweep's lens and depth scale at initialisation)
            assert _rel(g, rg) < tol or (g - rg).abs().max() < 1e-6, key


def test_overlapping_canvas_blocks_reach_the_neighbouring_blocks():
    """canvas_kernel=4: a latent-grid position writes exactly its own 4x4 block of the canvas; 8: also the
    two pixels beyond each edge (no block edges), and the inference core's view of the canvas follows."""
    torch.manual_seed(0)
    for k, reach in ((4, (8, 12)), (8, (6, 14))):
        gen = make_model(canvas_kernel=k).generator
        assert gen.canvas_up.weight.shape[-1] == k
        h = torch.zeros(1, gen.hidden_channels, gen.grid, gen.grid)
        h[0, :, 2, 2] = torch.randn(gen.hidden_channels)  # one grid position: its block is pixels 8..11
        canvas = gen._canvas(h, 1) - gen._canvas(torch.zeros_like(h), 1)
        rows = canvas.abs().sum((0, 1, 3)).nonzero().flatten()
        assert (rows.min().item(), rows.max().item() + 1) == reach, k
        if k == 8:  # the fast path's composed down(up(.)) equals applying the two layers
            matrix, _ = gen._canvas_maps()
            direct = F.conv2d(F.conv_transpose2d(h, gen.canvas_up.weight, stride=4, padding=2),
                              gen.canvas_down.weight, stride=4)
            assert torch.allclose(F.conv2d(h, matrix, padding=1), direct, atol=1e-6)
    with pytest.raises(ValueError, match="canvas_kernel must be 4 .* or 8"):
        make_model(canvas_kernel=6)


def test_bad_shapes_raise_clear_errors():
    model = make_model()
    ci, cp, qi, qp = batch()
    with pytest.raises(ValueError, match="context_images must be"):
        model.represent(ci[0], cp)
    with pytest.raises(ValueError, match="model expects"):
        model.represent(torch.rand(2, 3, 3, 64, 64), cp)
    with pytest.raises(ValueError, match="divisible by 4"):
        make_model(size=30)


@pytest.mark.slow
def test_training_on_one_batch_drives_elbo_down():
    torch.manual_seed(0)
    model = make_model("tower", "shared", 4, h=32, canvas=32, r=32)
    ci, cp, qi, qp = batch(B=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(300):
        loss = model(ci, cp, qi, qp, sigma=0.1)["elbo"].mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("fast", [True, False])
def test_grid_coords_and_inference_kernel_reach_the_output(fast):
    """The coordinate channels feed both cores (their weights change the result); the inference core
    gets its own kernel size."""
    torch.manual_seed(0)
    model = make_model("tower", "shared", steps=3, grid_coords=True, inference_kernel_size=3)
    model.generator.fast = fast
    gen = model.generator
    assert gen.inference_cores[0].weight["h"].shape[-1] == 3 and gen.generation_cores[0].weight["h"].shape[-1] == 5
    ci, cp, qi, qp = batch()

    def run():
        out = model(ci, cp, qi, qp, generator=torch.Generator().manual_seed(1))
        return out["elbo"], model.sample(ci, cp, qp, mean=True)

    elbo, render = run()
    for cores in (gen.inference_cores, gen.generation_cores):
        with torch.no_grad():
            cores[0].weight["coords"].zero_()
        elbo_off, render_off = run()
        assert not torch.allclose(elbo, elbo_off)
        elbo = elbo_off
    assert not torch.allclose(render, render_off)  # the prior path sees the generation core's coords


def test_step_kernel_and_dilation_reach_only_the_generation_core():
    """model.step_kernel_size gives the generation core's per-step inputs (h, z) their own kernel while v and r keep
    kernel_size; model.dilation spaces the generation core's taps (the same weights render differently), and the
    inference core keeps its own kernel, undilated."""
    torch.manual_seed(0)
    model = make_model("tower", "shared", steps=2, step_kernel_size=3, dilation=2, inference_kernel_size=3)
    gen, inf = model.generator.generation_cores[0], model.generator.inference_cores[0]
    assert {n: w.shape[-1] for n, w in gen.weight.items()} == {"v": 5, "r": 5, "z": 3, "h": 3}
    assert gen.dilation == 2 and inf.dilation == 1 and {w.shape[-1] for w in inf.weight.values()} == {3}
    ci, cp, qi, qp = batch()
    render = model.sample(ci, cp, qp, mean=True)
    gen.dilation = 1
    assert not torch.allclose(render, model.sample(ci, cp, qp, mean=True))
    attention = make_model("attention", "shared", step_kernel_size=3).generator.generation_cores[0]
    assert attention.weight["a"].shape[-1] == 3 and attention.weight["r"].shape[-1] == 5  # the read of every step
    with pytest.raises(ValueError, match="model.dilation must be less than the 8x8 latent grid of 32 px images"):
        make_model(dilation=8)


def test_attention_reads_the_views_not_only_their_sum():
    """Same summed r, views shuffled over the grid: an attention GQN renders differently, a tower GQN does not."""
    torch.manual_seed(0)
    ci, cp, qi, qp = batch(B=2)
    for encoder, should_change in (("attention", True), ("tower", False)):
        model = make_model(encoder, "shared", steps=3, h=16, canvas=16, r=16)
        if model.keeps_views:  # sharper attention than at initialisation, where it is nearly a plain mean
            with torch.no_grad():
                for p in model.generator.attention.parameters():
                    p.mul_(10)
        r, views = model.encode(ci, cp)
        if views is None:
            views_shuffled = None
        else:
            views_shuffled = views.flatten(3).flip(-1).unflatten(-1, views.shape[3:])  # same sum over views
        a = model.render(r, qp, mean=True, views=views)
        b = model.render(r, qp, mean=True, views=views_shuffled)
        assert (not torch.allclose(a, b, atol=1e-6)) == should_change, encoder
    with pytest.raises(ValueError, match="needs the context views"):
        make_model("attention").render(r, qp, mean=True)


def test_several_queries_per_scene_equal_the_context_repeated():
    """K queries per scene (context encoded once) == the flattened batch with each context repeated K times;
    K = 1 in [B, 1, ...] form == the plain [B, ...] batch."""
    torch.manual_seed(0)
    model = make_model("attention", "shared", steps=2, h=8, canvas=8, r=8)
    g = torch.Generator().manual_seed(5)
    ci, cp = torch.rand(2, 3, 3, 32, 32, generator=g), torch.randn(2, 3, 7, generator=g)
    qi, qp = torch.rand(2, 3, 3, 32, 32, generator=g), torch.randn(2, 3, 7, generator=g)  # K = 3
    multi = model(ci, cp, qi, qp, generator=torch.Generator().manual_seed(1))
    flat = model(ci.repeat_interleave(3, 0), cp.repeat_interleave(3, 0), qi.flatten(0, 1), qp.flatten(0, 1),
                 generator=torch.Generator().manual_seed(1))
    for key in ("elbo", "nll", "kl", "mean"):
        assert multi[key].shape[0] == 6 and torch.allclose(multi[key], flat[key], rtol=1e-5, atol=1e-5), key
    one = model(ci, cp, qi[:, :1], qp[:, :1], generator=torch.Generator().manual_seed(2))
    plain = model(ci, cp, qi[:, 0], qp[:, 0], generator=torch.Generator().manual_seed(2))
    assert torch.equal(one["elbo"], plain["elbo"]) and torch.equal(one["mean"], plain["mean"])


def test_attention_pixel_values_let_the_generator_read_context_pixels():
    """With pixel_values the patches carry the views' own pixels: changing only those pixel channels changes
    the render; without, the views hold the tower's features alone."""
    torch.manual_seed(0)
    ci, cp, qi, qp = batch(B=2)
    enc = AttentionTower(image_size=32, channels=16, pixel_values=True)
    model = GQN(enc, image_size=32, hidden_channels=16, canvas_channels=16, num_steps=2)
    r, views = model.encode(ci, cp)
    assert views.shape == (2, 3, 16 + 48, 8, 8)
    assert torch.equal(views[:, :, 16:], torch.nn.functional.pixel_unshuffle(ci.flatten(0, 1), 4).unflatten(0, (2, 3)))
    other = views.clone()
    other[:, :, 16:] = torch.rand_like(other[:, :, 16:])
    assert not torch.allclose(model.render(r, qp, mean=True, views=views), model.render(r, qp, mean=True, views=other))
    assert make_model("attention").encode(ci, cp)[1].shape[2] == 16
