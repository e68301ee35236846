"""The plane-sweep read (model/geometry=plane_sweep): its camera is the datasets' camera, and it finds the pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gqn.model.geometry import PlaneSweep, camera_frames
from gqn.synthetic import camera, scenes
from gqn.synthetic.camera import camera_basis, ray_directions


def poses7(cams: np.ndarray) -> torch.Tensor:
    """Raw ``[V, 5]`` cameras -> the reader's 7-d poses."""
    c = torch.as_tensor(cams, dtype=torch.float32)
    return torch.cat([c[:, :3], c[:, 3:4].sin(), c[:, 3:4].cos(), c[:, 4:5].sin(), c[:, 4:5].cos()], dim=1)


def test_camera_frames_match_the_synthetic_camera():
    rng = np.random.default_rng(0)
    cams = np.concatenate([rng.normal(size=(6, 3)), rng.uniform(-3, 3, (6, 1)), rng.uniform(-1.2, 1.2, (6, 1))], 1)
    _, f, r, u = camera_frames(poses7(cams))
    ref = camera_basis(cams[:, 3], cams[:, 4])
    for mine, theirs in zip((f, r, u), ref):
        assert np.allclose(mine.numpy(), theirs, atol=1e-5)


def _room(seed=3, size=32, views=6):
    rng = np.random.default_rng(seed)
    world, _ = scenes._rooms_world(rng)
    cams = scenes._rooms_cameras(rng, views).astype(np.float32)
    frames, objects = scenes.render_views(world, cams, size, return_objects=True)
    # the z-depth of every pixel of the last view (the query): distance along the unit ray x its forward part
    dirs = ray_directions(cams[-1:], size).reshape(1, -1, 3)
    t, _, _ = world._trace(tuple(cams[-1:, i, None] for i in range(3)), tuple(dirs[..., i] for i in range(3)))
    forward = camera_basis(cams[-1, 3], cams[-1, 4])[0]
    zdepth = torch.as_tensor((t * (dirs @ forward)).reshape(1, -1), dtype=torch.float32)
    images = torch.as_tensor(frames, dtype=torch.float32).permute(0, 3, 1, 2) / 255
    objects = torch.as_tensor(objects[-1] == 255).reshape(-1)  # the query view's pixels showing an object
    return images, poses7(cams), zdepth, objects


def test_sweep_projects_like_the_renderer():
    """A query pixel's point at its true depth (ray-traced) lands, in every context view, on the pixel where the
    renderer's own camera projects that world point: the pose convention and the lens are the datasets'."""
    images, poses, depth, _ = _room(seed=3, views=6)
    rng = np.random.default_rng(3)
    scenes._rooms_world(rng)
    cams = scenes._rooms_cameras(rng, 6).astype(np.float32)  # the same cameras as _room drew
    finite = torch.isfinite(depth[0])
    sweep = PlaneSweep(32, feature_channels=0, fov_degrees=math.degrees(camera.FIELD_OF_VIEW))
    rays, origin, slope = sweep._project(camera_frames(poses[None, :-1]), poses[-1:], 32)
    cam = (origin[:, :, None] + slope * torch.where(finite, depth, 1.0)[:, None, :, None])[0].detach()  # [M, P, 3]
    points = cams[-1, :3] + (rays[0].detach() * torch.where(finite, depth, 1.0)[0, :, None]).numpy()
    half = math.tan(camera.FIELD_OF_VIEW / 2)
    for j in range(5):
        rc = camera.project(points[finite.numpy()], cams[j], 32)  # row, col of the renderer's camera
        z, x, y = cam[j, finite].unbind(-1)
        near_image = (z > 0.05).numpy() & (np.abs(rc - 16) < 32).all(axis=1)  # far off-image: float32 noise
        assert near_image.mean() > 0.3
        col = ((x / (z * half) + 1) / 2 * 32).numpy()
        row = ((1 - y / (z * half)) / 2 * 32).numpy()
        assert np.abs(col - rc[:, 1])[near_image].max() < 1e-2 and np.abs(row - rc[:, 0])[near_image].max() < 1e-2


def test_sweep_is_differentiable_in_the_lens_and_depth_scale():
    images, poses, _, _ = _room(views=4)
    sweep = PlaneSweep(32, feature_channels=3, depths=8, sweep_size=8)
    out = sweep(sweep.view_features(images[None, :-1]), poses[None, :-1], poses[None, -1])
    assert out.shape == (1, sweep.out_channels, 32, 32) and torch.isfinite(out).all()
    (out[:, :3] - images[-1]).pow(2).mean().backward()
    for p in (sweep.lens, sweep.depth_scale, sweep.score[0].weight, sweep.features[0].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert abs(sweep.field_of_view - 60) < 1e-4
    fast = PlaneSweep(32, feature_channels=3, depths=8, sweep_size=8, lens_gain=20)
    assert abs(fast.field_of_view - 60) < 1e-4 and torch.isclose(fast.log_half_fov, sweep.log_half_fov)
    fast.load_state_dict(sweep.state_dict() | {"lens": sweep.lens / 20, "depth_scale": sweep.depth_scale / 20})
    out_fast = fast(fast.view_features(images[None, :-1]), poses[None, :-1], poses[None, -1])
    assert torch.allclose(out_fast, out.detach(), atol=1e-5)  # the same function, only the step size differs
    (out_fast[:, :3] - images[-1]).pow(2).mean().backward()
    assert torch.isclose(fast.lens.grad, sweep.lens.grad * 20, rtol=1e-3)


def test_sweep_handles_views_behind_and_a_single_view():
    """A context camera looking away sees nothing of the query's points: zero weight, finite output."""
    images, poses, _, _ = _room(views=3)
    away = poses[:1].clone()
    away[:, 3:5] = -away[:, 3:5]  # turned round: yaw + pi
    sweep = PlaneSweep(32, feature_channels=2, depths=6, sweep_size=16)
    for ctx_poses in (away[None], poses[None, :1]):
        out = sweep(sweep.view_features(images[None, :1]), ctx_poses, poses[None, -1])
        assert torch.isfinite(out).all()


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="near < far"):
        PlaneSweep(32, near=2, far=1)
    with pytest.raises(ValueError, match="fov_degrees"):
        PlaneSweep(32, fov_degrees=190)


def test_the_generator_blends_the_colour_the_sweep_found():
    """alpha -> 1: the render is the context colour the read found for each pixel; alpha -> 0: the canvas's."""
    from gqn.model import GQN, Tower

    torch.manual_seed(0)
    model = GQN(Tower(image_size=32, channels=8), image_size=32, hidden_channels=8, canvas_channels=8, num_steps=2,
                core_sharing="shared", geometry=PlaneSweep(32, feature_channels=2, depths=4, sweep_size=8))
    images, poses, _, _ = _room(views=4)
    ci, cp, qp = images[None, :-1], poses[None, :-1], poses[None, -1]
    last = model.generator.geometry_skip[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([30.0, 0, 0, 0]))
        r, views = model.encode(ci, cp)
        found = model.read_geometry(qp, views)[:, :3]
        assert torch.allclose(model.render(r, qp, mean=True, views=views), found, atol=1e-6)
        last.bias.copy_(torch.tensor([-30.0, 0, 0, 0]))
        canvas_only = model.render(r, qp, mean=True, views=views)
        assert (canvas_only - found).abs().mean() > 0.05


def test_consensus_weighs_down_the_view_that_disagrees():
    """Two views agree on a pixel's colour, a third (say occluded) does not: with consensus the found colour
    moves towards the two; without, all three count by their rays alone."""
    images, poses, depth, _ = _room(views=4)
    depth = torch.where(torch.isfinite(depth), depth, 100.0)
    ctx, frames = images[None, :-1].clone(), camera_frames(poses[None, :-1])
    ctx[:, 0] = torch.tensor([1.0, 0.0, 1.0])[:, None, None]  # view 0 is all magenta: it disagrees everywhere
    plain = PlaneSweep(32, feature_channels=0)
    voting = PlaneSweep(32, feature_channels=0, consensus=True)
    far = [(s._gather(ctx, frames, poses[-1:], depth)[0][0, :3].detach() - torch.tensor([1.0, 0, 1])[:, None])
           .pow(2).sum(0).mean() for s in (plain, voting)]
    assert far[1] > far[0] + 0.05  # further from magenta with consensus


def _room_depths(seed, views=6, object_scale=1.6, radius=1.0, fov_degrees=50.0):
    """A room with big objects near a tight camera ring (occlusion everywhere), its frames ``[V, 3, 32, 32]``, poses
    ``[V, 7]`` and every view's ray-traced z-depth ``[V, 32 * 32]`` (100 where a ray hits nothing)."""
    fov = math.radians(fov_degrees)
    rng = np.random.default_rng(seed)
    world, _ = scenes._rooms_world(rng, object_scale, radius)
    cams = scenes._rooms_cameras(rng, views, radius).astype(np.float32)
    frames = scenes.render_views(world, cams, 32, 2, fov=fov)
    dirs = ray_directions(cams, 32, fov).reshape(views, -1, 3)
    t, _, _ = world._trace(tuple(cams[:, i, None] for i in range(3)), tuple(dirs[..., i] for i in range(3)))
    forward = np.stack([camera_basis(c[3], c[4])[0] for c in cams])
    z = torch.as_tensor(t * np.einsum("vpk,vk->vp", dirs, forward), dtype=torch.float32)
    images = torch.as_tensor(frames, dtype=torch.float32).permute(0, 3, 1, 2) / 255
    return images, poses7(cams), torch.where(torch.isfinite(z), z, 100.0)


def test_visibility_leaves_out_the_views_that_do_not_see_the_point():
    """Every query pixel's true point, gathered from context views whose depth maps are the true ones: with
    visibility a view whose own surface hides the point gives no colour, so where some view sees the point the
    found colour is the truth's; without, hidden views mix in the colours of what hides the point."""
    errors = {False: [], True: []}
    for seed in range(6):
        images, poses, z = _room_depths(seed)
        ctx, ctx_poses, query = images[None, :-1], poses[None, :-1], poses[None, -1]
        own = torch.stack([z[:-1].log(), torch.ones_like(z[:-1])], dim=1).view(1, 5, 2, 32, 32)
        truth = images[-1].reshape(3, -1)
        for visibility in (False, True):
            sweep = PlaneSweep(32, feature_channels=0, fov_degrees=50, visibility=visibility, visibility_margin=0.05)
            features = torch.cat([ctx, own], dim=2) if visibility else ctx
            with torch.no_grad():
                found = sweep._gather(features, camera_frames(ctx_poses), query, z[-1:])[0][0]
                if visibility:  # the pixels some view sees (the same pixels scored for both)
                    seen = found[3] * 5 > 0.5
            errors[visibility].append((found[:3] - truth).pow(2).sum(0))
        errors[False][-1], errors[True][-1] = errors[False][-1][seen], errors[True][-1][seen]
    mse = {k: torch.cat(v).mean().item() for k, v in errors.items()}
    assert mse[True] < 0.7 * mse[False], mse  # measured: 0.0133 against 0.0237


def test_occluder_colour_is_what_the_views_see_on_the_line_to_the_point():
    """occluder_colour: three more channels, last, holding the colour every view with the point in its image sees
    towards it, hidden or not (what the plain read without visibility gathers); everything before them is the
    read without the option, and the option needs visibility."""
    images, poses, z = _room_depths(3)
    ctx, ctx_poses, query = images[None, :-1], poses[None, :-1], poses[None, -1]
    own = torch.stack([z[:-1].log(), torch.ones_like(z[:-1])], dim=1).view(1, 5, 2, 32, 32)
    torch.manual_seed(0)
    plain = PlaneSweep(32, feature_channels=0, fov_degrees=50)
    seeing = PlaneSweep(32, feature_channels=0, fov_degrees=50, visibility=True, visibility_margin=0.05)
    both = PlaneSweep(32, feature_channels=0, fov_degrees=50, visibility=True, visibility_margin=0.05,
                      occluder_colour=True)
    both.load_state_dict(seeing.state_dict())  # the same parameters: the option adds none
    assert both.out_channels == seeing.out_channels + 3
    with torch.no_grad():
        frames = camera_frames(ctx_poses)
        line = plain._gather(ctx, frames, query, z[-1:])[0][0, :3]
        visible = seeing._gather(torch.cat([ctx, own], dim=2), frames, query, z[-1:])[0][0]
        found = both._gather(torch.cat([ctx, own], dim=2), frames, query, z[-1:])[0][0]
        assert torch.allclose(found[:-3], visible) and torch.allclose(found[-3:], line, atol=1e-6)
        assert (found[-3:] - found[:3]).abs().amax() > 0.1  # hidden views change the colour somewhere
        features = torch.cat([ctx, own], dim=2)
        assert torch.allclose(both(features, ctx_poses, query)[:, :-3], seeing(features, ctx_poses, query))
    with pytest.raises(ValueError, match="occluder_colour needs geometry.visibility=true"):
        PlaneSweep(32, occluder_colour=True)


def _tiny_gqn(geometry: PlaneSweep):
    """A small GQN around ``geometry``, its weights from seed 0."""
    from gqn.model import GQN, Tower

    torch.manual_seed(0)
    return GQN(Tower(image_size=32, channels=8), image_size=32, hidden_channels=8, canvas_channels=8, num_steps=2,
               core_sharing="shared", geometry=geometry)


def test_nearest_view_is_the_baseline_view_and_a_third_colour_to_copy():
    """nearest_view: the read ends with the context view the nearest-view baseline picks (and is otherwise the
    read without it); in the render a softmax weighs it against the colour the sweep found and the canvas: each
    weight -> 1 gives that image alone."""
    from gqn.metrics import nearest_context_view

    images, poses, _, _ = _room(views=5)
    torch.manual_seed(0)
    plain = PlaneSweep(32, feature_channels=2, depths=4, sweep_size=8)
    near = PlaneSweep(32, feature_channels=2, depths=4, sweep_size=8, nearest_view=True)
    near.load_state_dict(plain.state_dict())  # the option adds no parameters
    assert (near.out_channels, near.copies) == (plain.out_channels + 3, 2)
    ctx, ctx_poses = images[None, :-1].repeat(2, 1, 1, 1, 1), poses[None, :-1].repeat(2, 1, 1)
    query = torch.stack([poses[-1], poses[1] + 0.01])  # the second query sits next to context view 1
    with torch.no_grad():
        features = plain.view_features(ctx, ctx_poses)
        out = near(features, ctx_poses, query)
        assert torch.equal(out[:, :plain.out_channels], plain(features, ctx_poses, query))
        assert torch.equal(out[:, -3:], nearest_context_view(ctx, ctx_poses, query))
        assert torch.equal(out[1, -3:], ctx[1, 1])

    ci, cp, qp = images[None, :-1], poses[None, :-1], poses[None, -1]
    read, renders = _renders_by_bias(_tiny_gqn(near), ci, cp, qp,
                                     ([30.0, 0, 0, 0, 0], [0, 30.0, 0, 0, 0], [-30.0, -30.0, 0, 0, 0]))
    assert torch.allclose(renders[0], read[:, :3], atol=1e-6)  # the colour the sweep found
    assert torch.allclose(renders[1], read[:, -3:], atol=1e-6)  # the nearest view
    assert torch.allclose(renders[1], nearest_context_view(ci, cp, qp), atol=1e-6)
    assert (renders[2] - renders[0]).abs().mean() > 0.05 and (renders[2] - renders[1]).abs().mean() > 0.05


def test_view_colours_are_the_nearest_views_at_the_found_depth_and_more_colours_to_copy():
    """view_colours: the map ends with, for the K context views nearest the query in pose (nearest first, the
    farthest repeated when there are fewer), each one's RGB at the depth the sweep chose and how much it sees the
    point; the map before it is the read without the option. With the nearest view and the floor read too, every
    colour is one the render copies alone when its weight -> 1."""

    images, poses, _, _ = _room(views=5)
    torch.manual_seed(0)
    kw = dict(feature_channels=2, depths=4, sweep_size=8, nearest_view=True, floor_grid=8, floor_heights=2)
    plain = PlaneSweep(32, **kw)
    views = PlaneSweep(32, view_colours=3, view_colours_logit=0.0, **kw)
    views.load_state_dict(plain.state_dict())  # the option adds no parameters
    assert views.out_channels == plain.out_channels + 12 and views.copies == 6
    at = plain.out_channels
    assert plain.copy_at == (0, at - 12, at - 3)  # found colour, nearest view, then the floor read's RGB (its last)
    assert views.copy_at == plain.copy_at + (at, at + 4, at + 8)
    colours = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])  # each context view a flat colour
    ctx = colours[None, :, :, None, None].expand(2, 4, 3, 32, 32).clone()
    ctx_poses = poses[None, :-1].repeat(2, 1, 1)
    query = torch.stack([poses[0] + 0.05, poses[2] + 0.01])  # beside view 0 and view 2
    with torch.no_grad():
        features = plain.view_features(ctx, ctx_poses)
        out = views(features, ctx_poses, query)
        assert torch.equal(out[:, :at], plain(features, ctx_poses, query))
        assert torch.equal(views.floor_colour(out), plain.floor_colour(out[:, :at]))
        order = (ctx_poses - query[:, None]).pow(2).sum(-1).argsort(dim=1)
        assert order[0, 0] == 0 and order[1, 0] == 2
        for b in range(2):
            for k in range(3):
                rgb, seen = out[b, at + 4 * k:at + 4 * k + 3], out[b, at + 4 * k + 3]
                assert 0 <= seen.min() and seen.max() <= 1 + 1e-6 and seen.mean() > 0.1  # each sees part of it
                assert torch.allclose(rgb, colours[order[b, k]][:, None, None] * seen, atol=1e-5)
        assert out[0, at + 3].mean() > 0.8 and out[1, at + 3].mean() > 0.9  # the query's neighbour: (nearly) all
        few = views(features[:, :2], ctx_poses[:, :2], query)  # two views for three slots: the farther repeats
        assert torch.equal(few[:, at + 8:], few[:, at + 4:at + 8])
        assert not torch.equal(few[:, at:at + 4], few[:, at + 4:at + 8])

    model = _tiny_gqn(views)
    assert model.generator.copy_at == views.copy_at
    torch.manual_seed(0)
    lower = PlaneSweep(32, view_colours=3, **kw)  # the class default, as the YAML's: -3
    assert lower.copy_logits == (0.0, 0.0, 0.0, -3.0, -3.0, -3.0) and views.copy_logits == (0.0,) * 6
    lower.load_state_dict(views.state_dict())
    started = _tiny_gqn(lower)
    shift = started.generator.geometry_skip[-1].bias - model.generator.geometry_skip[-1].bias
    assert torch.allclose(shift, torch.tensor([0.0, 0, 0, -3, -3, -3, 0, 0, 0]))  # the copies' logits, not RGB's
    ci, cp, qp = images[None, :-1], poses[None, :-1], poses[None, -1]
    biases = 30.0 * torch.eye(len(views.copy_at), len(model.generator.geometry_skip[-1].bias))
    read, renders = _renders_by_bias(model, ci, cp, qp, biases)
    for start, render in zip(views.copy_at, renders, strict=True):
        assert torch.allclose(render, read[:, start:start + 3], atol=1e-6)


def test_view_colours_with_visibility_are_sampled_inside_the_image_and_seen_through_it():
    """With ``visibility``, each near view's RGB is its sample at the found depth (weighted by how much of it lies
    inside the image, as every sample) and its ``seen`` is that times how little the view's own depth map hides
    the point: never more, and less where the view's surface stands in front (big objects near a tight ring)."""
    images, poses, _ = _room_depths(seed=5, views=6)
    torch.manual_seed(0)
    sweep = PlaneSweep(32, feature_channels=2, depths=8, sweep_size=8, visibility=True, view_colours=3)
    at = sweep.copy_at[-3]
    assert sweep.copy_at[-2:] == (at + 4, at + 8) and at + 12 == sweep.out_channels
    colours = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]])
    ctx, ctx_poses, query = images[None, :-1], poses[None, :-1], poses[None, -1]
    with torch.no_grad():
        features = sweep.view_features(ctx, ctx_poses)  # the views' depth maps from the real images
        features[:, :, :3] = colours[None, :, :, None, None]  # then each view a flat colour, to tell them apart
        out = sweep(features, ctx_poses, query)[0]
    order = (ctx_poses[0] - query).pow(2).sum(-1).argsort(stable=True)
    hidden = 0.0
    for k in range(3):
        rgb, seen = out[at + 4 * k:at + 4 * k + 3], out[at + 4 * k + 3]
        inside = rgb.amax(dim=0)  # every colour has a channel at 1
        assert torch.allclose(rgb, colours[order[k]][:, None, None] * inside, atol=1e-5)
        assert (seen <= inside + 1e-5).all() and inside.mean() > 0.1
        hidden = max(hidden, (inside - seen).amax().item())
    assert hidden > 0.1  # some near view's own surface hides part of what the query sees


@pytest.mark.parametrize("view_colours", [0, 2])
@pytest.mark.parametrize("nearest_view", [False, True])
@pytest.mark.parametrize("floor_grid", [0, 8])
@pytest.mark.parametrize("extra", ["none", "ray_directions", "occluder_colour"])
def test_copy_at_names_every_colour_to_copy_in_every_layout(view_colours, nearest_view, floor_grid, extra):
    """For every combination of the options that add channels, ``copy_at`` points at the found colour, the nearest
    view, the floor read's colour, each near view's RGB and the nearest view's RGB at every depth plane, in that
    order, and the map without the nearest view, the near views and the planes (none adds parameters) is the read
    without those options."""
    from gqn.metrics import nearest_context_view

    _, poses, _, _ = _room(views=5)
    kw = dict(feature_channels=2, depths=3, sweep_size=8, floor_grid=floor_grid, floor_heights=2,
              ray_directions=extra == "ray_directions", visibility=extra == "occluder_colour",
              occluder_colour=extra == "occluder_colour")
    torch.manual_seed(0)
    base = PlaneSweep(32, **kw)
    full = PlaneSweep(32, nearest_view=nearest_view, view_colours=view_colours, plane_views=1, **kw)
    full.load_state_dict(base.state_dict())
    colours = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])  # each context view a flat colour
    ctx = colours[None, :, :, None, None].expand(1, 4, 3, 32, 32).clone()
    ctx_poses, query = poses[None, :-1], poses[None, 2] + 0.01
    with torch.no_grad():
        features = base.view_features(ctx, ctx_poses)
        plain, out = base(features, ctx_poses, query), full(features, ctx_poses, query)
    at, tail = full.copy_at, 4 * (view_colours + 3)  # the near views' and the nearest view's planes end the map
    assert out.shape[1] == full.out_channels == base.out_channels + 3 * nearest_view + tail
    assert len(at) == full.copies == 1 + nearest_view + bool(floor_grid) + view_colours + 3
    assert at[0] == 0 and list(at) == sorted(set(at)) and at[-1] + 4 == full.out_channels
    i = 1
    if nearest_view:
        assert torch.equal(out[:, at[1]:at[1] + 3], nearest_context_view(ctx, ctx_poses, query))
        assert torch.equal(torch.cat([out[:, :at[1]], out[:, at[1] + 3:-tail]], dim=1), plain)
        i = 2
    else:
        assert torch.equal(out[:, :-tail], plain)
    if floor_grid:
        assert torch.equal(out[:, at[i]:at[i] + 3], base.floor_colour(plain))
        assert torch.equal(full.floor_colour(out), base.floor_colour(plain))
    order = (ctx_poses[0] - query).pow(2).sum(-1).argsort(stable=True)
    assert order[0] == 2
    views, planes = at[len(at) - 3 - view_colours:len(at) - 3], at[-3:]
    for k, start in enumerate(views):
        rgb, seen = out[0, start:start + 3], out[0, start + 3]
        assert torch.allclose(rgb, colours[order[k]][:, None, None] * rgb.amax(dim=0), atol=1e-5)
        assert (seen <= rgb.amax(dim=0) + 1e-5).all() and rgb.amax(dim=0).mean() > 0.1  # seen: inside x visible
        if extra != "occluder_colour":  # no visibility: seen is how much of the sample lies inside the image
            assert torch.allclose(rgb, colours[order[k]][:, None, None] * seen, atol=1e-5)
    for start in planes:  # the nearest view (2, blue) at each plane, weighted by how much lies inside its image
        rgb, inside = out[0, start:start + 3], out[0, start + 3]
        assert torch.allclose(rgb, colours[2][:, None, None] * inside, atol=1e-5) and inside.mean() > 0.1
    # a context view at the nearest one's pose: every read picks the first of the two, as the baseline does
    twin = torch.cat([ctx_poses[:, :2], ctx_poses[:, 2:3], ctx_poses[:, 2:3]], dim=1)
    with torch.no_grad():
        tied = full(features, twin, query)[0]
    assert all(tied[start:start + 2].abs().amax() == 0 and tied[start + 2].amax() > 0 for start in planes)  # blue
    if view_colours:
        first, second = tied[views[0]:views[0] + 3], tied[views[1]:views[1] + 3]
        assert first[:2].abs().amax() == 0 and first[2].amax() > 0 and second[2].abs().amax() == 0  # then yellow
    if nearest_view:
        assert torch.equal(tied[at[1]:at[1] + 3], ctx[0, 2])  # view 2 (blue), not its twin 3 (yellow)
        assert torch.equal(tied[None, at[1]:at[1] + 3], nearest_context_view(ctx, twin, query))


def test_plane_views_are_the_nearest_views_at_every_depth_plane_and_colours_to_copy():
    """plane_views: the map ends with, for the K context views nearest the query, each one's RGB at every depth plane
    of each query ray and how much of that sample lies inside its image (the map before it is the read without the
    option). A query at a context view's own pose sees that view's image at every plane; another view's samples move
    with the plane (parallax). Each is a colour the render copies alone when its weight -> 1."""
    images, poses, _, _ = _room(views=5)
    torch.manual_seed(0)
    kw = dict(feature_channels=2, depths=3, sweep_size=8, nearest_view=True, view_colours=1)
    plain = PlaneSweep(32, **kw)
    planes = PlaneSweep(32, plane_views=2, plane_views_logit=-2.0, **kw)
    planes.load_state_dict(plain.state_dict())  # the option adds no parameters
    at = plain.out_channels
    assert planes.out_channels == at + 2 * 3 * 4 and planes.copy_at == plain.copy_at + tuple(range(at, at + 24, 4))
    assert planes.copy_logits == plain.copy_logits + (-2.0,) * 6
    depths = planes.base_depths * planes.log_depth_scale.exp()
    ctx, ctx_poses = images[None, :-1], poses[None, :-1]
    with torch.no_grad():
        features = plain.view_features(ctx, ctx_poses)
        for q in (1, 3):
            out = planes(features, ctx_poses, poses[None, q])
            assert torch.equal(out[:, :at], plain(features, ctx_poses, poses[None, q]))
            part = out[0, at:].view(2, 3, 4, 32, 32)  # [view, plane, RGB + inside, H, W]
            order = (ctx_poses[0] - poses[q]).pow(2).sum(-1).argsort(stable=True)
            assert order[0] == q
            for d in range(3):
                # the query's own view, through the same lens: its image at every depth
                assert torch.allclose(part[0, d, :3], ctx[0, q], atol=1e-4) and part[0, d, 3].min() > 1 - 1e-4
                # both views as the one-depth read samples them with every query pixel at this plane's depth
                _, ref = planes._gather(features, camera_frames(ctx_poses), poses[None, q],
                                        depths[d].expand(1, 32 * 32), order[None, :2])
                assert torch.allclose(part[:, d], ref[0].view(2, 4, 32, 32), atol=1e-5)
            other = part[1, :, :3] * part[1, :, 3:].gt(0.99)  # another view: where it lands moves with the depth
            assert (other[0] - other[-1]).abs().mean() > 0.02
    model = _tiny_gqn(planes)
    assert model.generator.copy_at == planes.copy_at
    ci, cp, qp = images[None, :-1], poses[None, :-1], poses[None, -1]
    biases = 30.0 * torch.eye(len(planes.copy_at), len(model.generator.geometry_skip[-1].bias))
    read, renders = _renders_by_bias(model, ci, cp, qp, biases[-6:])
    for start, render in zip(planes.copy_at[-6:], renders, strict=True):
        assert torch.allclose(render, read[:, start:start + 3], atol=1e-6)
    with pytest.raises(ValueError, match="plane_views must be >= 0"):
        PlaneSweep(32, plane_views=-1)


def test_plane_agreement_is_the_nearest_view_against_the_others_at_every_plane():
    """plane_agreement: after every colour to copy (the map before it is the read without the option, copy_at
    unchanged), per depth plane the squared distance between the nearest view's colour and the mean of the others that
    hold the point, and the fraction of them that do. Views of one flat colour but the nearest view of another: that
    colours' distance wherever both are inside, 0 where no other view is; needs plane_views."""
    images, poses, _, _ = _room(views=5)
    torch.manual_seed(0)
    kw = dict(feature_channels=2, depths=3, sweep_size=8, plane_views=1)
    plain = PlaneSweep(32, **kw)
    agree = PlaneSweep(32, plane_agreement=True, **kw)
    agree.load_state_dict(plain.state_dict())  # no parameters of its own
    at = plain.out_channels
    assert agree.out_channels == at + 2 * 3 and agree.copy_at == plain.copy_at
    ctx_poses, q = poses[None, :-1], 2
    a, b = torch.tensor([0.2, 0.4, 0.6]), torch.tensor([0.9, 0.1, 0.3])
    flat = a[None, None, :, None, None].expand(1, 4, 3, 32, 32).clone()
    order = (ctx_poses[0] - poses[q]).pow(2).sum(-1).argsort(stable=True)
    flat[0, order[0]] = b[:, None, None]  # the nearest view in another colour
    with torch.no_grad():
        features = plain.view_features(flat, ctx_poses)
        out = agree(features, ctx_poses, poses[None, q])
        assert torch.equal(out[:, :at], plain(features, ctx_poses, poses[None, q]))
        own_inside = out[0, at - 3 * 4:at].view(3, 4, 32, 32)[:, 3]  # the plane views' inside channel
        part = out[0, at:].view(3, 2, 32, 32)  # [plane, distance | others' fraction, H, W]
        far = (b - a).pow(2).sum()
        for d in range(3):
            distance, seen = part[d]
            assert 0 <= seen.min() and seen.max() <= 1 + 1e-6
            both = (own_inside[d] > 0.01) & (seen * 3 > 0.01)
            assert both.sum() > 100
            assert torch.allclose(distance[both], far.expand(int(both.sum())), atol=1e-4)
            assert torch.all(distance[(seen == 0) | (own_inside[d] == 0)] == 0)  # no pair to compare: 0
        assert part[:, 1].max() > 0.5  # a farther plane: more of the others hold it
        same = agree(plain.view_features(a[None, None, :, None, None].expand(1, 4, 3, 32, 32), ctx_poses),
                     ctx_poses, poses[None, q])[0, at:].view(3, 2, 32, 32)
        assert same[:, 0][own_inside > 0.01].abs().max() < 1e-4  # one colour everywhere: they agree
    with pytest.raises(ValueError, match="plane_agreement .* needs geometry.plane_views >= 1"):
        PlaneSweep(32, plane_agreement=True)


def test_plane_resample_samples_the_nearest_view_between_its_planes():
    """plane_resample: the map ends with the nearest view's sample positions at every plane (the map before it is the
    read without the option; no parameters of its own). In the render, all weight on one plane gives exactly that
    plane's colour; weight split between two planes gives the view's sample at the mean of their positions (between
    the planes), not the mean of their colours; the planes' summed weight carries it against the other copies."""
    import torch.nn.functional as F

    images, poses, _, _ = _room(views=5)
    torch.manual_seed(0)
    kw = dict(feature_channels=2, depths=3, sweep_size=8, nearest_view=True, plane_views=1)
    plain = PlaneSweep(32, **kw)
    resample = PlaneSweep(32, plane_resample=True, **kw)
    resample.load_state_dict(plain.state_dict())
    at = plain.out_channels
    assert resample.out_channels == at + 2 * 3 and resample.copy_at == plain.copy_at
    assert resample.resample == (plain.copy_at[1], at, len(plain.copy_at) - 3, 3)
    ci, cp, q = images[None, :-1], poses[None, :-1], poses[None, -1]
    model = _tiny_gqn(resample)
    assert model.generator.resample == resample.resample
    k = len(resample.copy_at)
    planes = [k - 3 + d for d in range(3)]
    one = [30.0 * torch.eye(k + 3)[i] for i in planes]  # all weight on one plane
    halves = []
    for a, b in ((1, 2), (0, 2)):  # half the weight on each of two planes
        halves.append(torch.zeros(k + 3))
        halves[-1][planes[a]] = halves[-1][planes[b]] = 30.0
    read, renders = _renders_by_bias(model, ci, cp, q, [*one, *halves])
    inside = read[0, [resample.copy_at[i] + 3 for i in planes]]  # how much of each plane's sample is inside the view
    colour = [read[0, resample.copy_at[i]:resample.copy_at[i] + 3] for i in planes]
    with torch.no_grad():
        assert torch.equal(read[:, :at], plain(plain.view_features(ci, cp), cp, q))
        for start, render in zip(resample.copy_at[-3:], renders[:3], strict=True):
            assert torch.allclose(render, read[:, start:start + 3], atol=1e-5)
        positions = read[0, at:].view(3, 2, 32, 32)
        assert (positions[1] - positions[2]).abs().amax() > 0.1  # the planes land apart in the nearest view
        middle = ((positions[1] + positions[2]) / 2).permute(1, 2, 0)[None]
        nearest = read[:, resample.copy_at[1]:resample.copy_at[1] + 3]
        between = F.grid_sample(torch.cat([nearest, torch.ones_like(nearest[:, :1])], 1), middle, mode="bilinear",
                                padding_mode="zeros", align_corners=False)[0]
        both = (inside[1] > 0.999) & (inside[2] > 0.999) & (between[3] > 0.999)
        assert both.sum() > 100
        assert torch.allclose(renders[3][0][:, both], between[:3, both], atol=1e-5)  # one sample between the planes
        mixed = (colour[1] + colour[2]) / 2
        assert (renders[3][0] - mixed)[:, both].abs().mean() > 0.01  # not the two planes' colours over each other
        # one plane outside the view (the nearest: the view does not hold it), the other inside: that plane's colour
        # at half strength (black for the one outside, as its copy is), not a sample halfway to a point outside
        alone = (inside[0] == 0) & (inside[2] > 0.999)
        assert alone.sum() > 50
        assert torch.allclose(renders[4][0][:, alone], colour[2][:, alone] / 2, atol=1e-5)
    # the resampled colour passes gradient to the blend's weights through the image
    last = model.generator.geometry_skip[-1]
    last.bias.data.copy_(halves[0])
    r, views = model.encode(ci, cp)
    model.generator(q, r, geometry=model.read_geometry(q, views), sample_prior=False)["mean"].sum().backward()
    assert last.bias.grad[planes[1]].abs() > 0 and last.bias.grad[planes[2]].abs() > 0
    with pytest.raises(ValueError, match="plane_resample .* needs geometry.plane_views >= 1 and geometry.nearest_view"):
        PlaneSweep(32, plane_resample=True, nearest_view=True)
    with pytest.raises(ValueError, match="plane_resample .* needs"):
        PlaneSweep(32, plane_resample=True, plane_views=1)
    # with two views' planes the nearest view's come first: they are the ones resampled
    two = PlaneSweep(32, plane_resample=True, **{**kw, "plane_views": 2})
    assert two.resample == (two.copy_at[1], two.out_channels - 6, len(two.copy_at) - 6, 3)


def _renders_by_bias(model, context_images, context_poses, query_poses, biases):
    """The model's geometric read of the query and its prior-mean render with the blend's last layer set to each of
    ``biases`` and no weights (each a softmax logit per colour to copy, then the canvas's RGB residual)."""
    last = model.generator.geometry_skip[-1]
    with torch.no_grad():
        last.weight.zero_()
        r, views = model.encode(context_images, context_poses)
        renders = []
        for bias in biases:
            last.bias.copy_(torch.as_tensor(bias))
            renders.append(model.render(r, query_poses, mean=True, views=views))
        return model.read_geometry(query_poses, views), renders


def test_the_generator_says_which_colours_to_copy_it_cannot_take():
    """geometry_copies: where each colour starts, the found colour's (0) first; out of the map, not a sequence of
    offsets, or logits of another count: a clear error."""
    from gqn.model.generator import DRAWGenerator

    kw = dict(r_channels=8, image_size=32, hidden_channels=8, canvas_channels=8, num_steps=1, geometry_channels=20)
    assert DRAWGenerator(**kw).copy_at == (0,)
    assert DRAWGenerator(**kw, geometry_copies=[0, 17]).copy_at == (0, 17)
    assert DRAWGenerator(**kw, geometry_copies=[0, 5, 17]).geometry_copies == 3
    for bad in (2, "07", [0, 18], [], [-1], [5, 0]):
        with pytest.raises(ValueError, match="geometry_copies must"):
            DRAWGenerator(**kw, geometry_copies=bad)
    with pytest.raises(ValueError, match=r"one logit per colour to copy \(2\), got 3"):
        DRAWGenerator(**kw, geometry_copies=[0, 17], geometry_copy_logits=[0.0, 0.0, -1.0])


def test_geometry_match_weighs_the_colours_nearest_the_drawn_one():
    """geometry_match: each colour's logit falls by the learned weight times its squared distance from the colour the
    canvas draws there; off (0) no parameter and the plain softmax; negative, or without a read, a clear error."""
    from gqn.model.generator import DRAWGenerator

    kw = dict(r_channels=8, image_size=32, hidden_channels=8, canvas_channels=8, num_steps=1, geometry_channels=12,
              geometry_copies=[0, 3, 6])
    torch.manual_seed(0)
    plain = DRAWGenerator(**kw)
    assert plain.log_copy_match is None
    matched = DRAWGenerator(**kw, geometry_match=50.0)
    matched.load_state_dict(plain.state_dict(), strict=False)
    assert matched.log_copy_match.item() == pytest.approx(math.log(50.0))
    with torch.no_grad():  # the blend's logits all 0: only the distances tell the copies apart
        for gen in (plain, matched):
            gen.geometry_skip[-1].weight.zero_()
            gen.geometry_skip[-1].bias.zero_()
    canvas = torch.randn(2, 8, 32, 32)
    drawn = torch.sigmoid(plain.observation(canvas))
    geometry = torch.rand(2, 12, 32, 32)
    geometry[:, 3:6] = (drawn + 0.05).clamp(0, 1)  # the second copy near the drawn colour, the others anywhere
    d = torch.stack([(geometry[:, at:at + 3] - drawn).pow(2).sum(1) for at in (0, 3, 6)], 1)  # [B, 3, H, W]
    w = torch.softmax(torch.cat([-50.0 * d, torch.zeros_like(d[:, :1])], 1), 1)
    expect = sum(w[:, i:i + 1] * geometry[:, at:at + 3] for i, at in enumerate((0, 3, 6))) + w[:, 3:] * drawn
    out = matched.observe(canvas, geometry)
    assert torch.allclose(out, expect, atol=1e-5)
    assert torch.allclose(plain.observe(canvas, geometry), (geometry[:, 0:3] + geometry[:, 3:6] + geometry[:, 6:9]
                                                            + drawn) / 4, atol=1e-5)
    near = geometry[:, 3:6]  # the blend moved to the copy nearest the drawn colour
    assert (out - near).abs().mean() < 0.5 * (plain.observe(canvas, geometry) - near).abs().mean()
    out.sum().backward()
    assert matched.log_copy_match.grad is not None and matched.log_copy_match.grad.abs() > 0
    one = DRAWGenerator(**{**kw, "geometry_copies": [0]}, geometry_match=50.0)  # one copy: the sigmoid's logit
    with torch.no_grad():
        one.geometry_skip[-1].weight.zero_()
        one.geometry_skip[-1].bias.zero_()
    drawn1 = torch.sigmoid(one.observation(canvas))
    alpha = torch.sigmoid(-50.0 * (geometry[:, :3] - drawn1).pow(2).sum(1, keepdim=True))
    assert torch.allclose(one.observe(canvas, geometry), alpha * geometry[:, :3] + (1 - alpha) * drawn1, atol=1e-5)
    for bad in ({"geometry_match": -1.0}, {"geometry_match": 1.0, "geometry_channels": 0, "geometry_copies": [0]}):
        with pytest.raises(ValueError, match="geometry_match must be >= 0"):
            DRAWGenerator(**{**kw, **bad})


def test_geometry_mix_widths_are_the_blend_networks_hidden_layers():
    """geometry_mix_widths: the blending network's hidden layers, each a ReLU after it, the first with
    geometry_mix_kernel and the rest 1x1; the default [32] has the parameters (names and shapes) of the network before
    the option, so old checkpoints load; the blend computes exactly what its layers say; bad widths: a clear error."""
    from torch import nn

    from gqn.model.generator import DRAWGenerator

    kw = dict(r_channels=8, image_size=32, hidden_channels=8, canvas_channels=8, num_steps=1, geometry_channels=12,
              geometry_copies=[0, 3, 6])
    torch.manual_seed(0)
    one = DRAWGenerator(**kw)
    assert {k: tuple(v.shape) for k, v in one.geometry_skip.state_dict().items()} == {
        "0.weight": (32, 20, 1, 1), "0.bias": (32,), "2.weight": (6, 32, 1, 1), "2.bias": (6,)}
    deep = DRAWGenerator(**kw, geometry_mix_widths=[16, 24], geometry_mix_kernel=3)
    convs = [m for m in deep.geometry_skip if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (20, 16, (3, 3)), (16, 24, (1, 1)), (24, 6, (1, 1))]
    assert sum(isinstance(m, nn.ReLU) for m in deep.geometry_skip) == 2
    canvas, geometry = torch.randn(2, 8, 32, 32), torch.rand(2, 12, 32, 32)
    h = torch.cat([canvas, geometry], 1)
    for conv in convs[:-1]:
        h = torch.relu(conv(h))
    mix = convs[-1](h)
    w = torch.softmax(torch.cat([mix[:, :3], torch.zeros_like(mix[:, :1])], 1), 1)
    drawn = torch.sigmoid(deep.observation(canvas) + mix[:, 3:])
    expect = sum(w[:, i:i + 1] * geometry[:, at:at + 3] for i, at in enumerate((0, 3, 6))) + w[:, 3:] * drawn
    assert torch.allclose(deep.observe(canvas, geometry), expect, atol=1e-5)
    parts = deep.observe(canvas, geometry, parts=True)  # the canvas's own colour beside the blend, and the blend
    assert torch.allclose(parts["mean"], expect, atol=1e-5) and torch.allclose(parts["drawn"], drawn, atol=1e-6)
    assert torch.allclose(parts["weights"], w, atol=1e-6)
    copies = torch.stack([geometry[:, 0:3], geometry[:, 3:6], geometry[:, 6:9]], 1)
    assert torch.allclose(parts["copies"], copies, atol=1e-6)
    colours = torch.cat([parts["copies"], parts["drawn"][:, None]], 1)
    assert torch.allclose((parts["weights"][:, :, None] * colours).sum(1), parts["mean"], atol=1e-5)
    for bad in ([], [0], [16, -1], [1.5], [True]):
        with pytest.raises(ValueError, match="geometry_mix_widths must be a non-empty list of integers >= 1"):
            DRAWGenerator(**kw, geometry_mix_widths=bad)
    from gqn.model import GQN, Tower

    for bad in (64, None, "64", []):  # the model says so before it builds anything (with a read or without)
        with pytest.raises(ValueError, match="geometry_mix_widths must be a non-empty list of integers >= 1"):
            GQN(Tower(image_size=32, channels=8), image_size=32, hidden_channels=8, canvas_channels=8,
                geometry_mix_widths=bad)


def test_ray_profile_is_the_sweep_along_each_ray():
    """ray_profile: after the read without the option (the same parameters), every depth plane of each query ray:
    the mean colour of the context views whose image holds that point and their fraction. Checked against the
    renderer's own camera projecting the same world points (nearest pixel; points within a pixel of an image
    border left out, where bilinear sampling is partly outside)."""
    images, poses, _ = _room_depths(2)
    ctx, ctx_poses, query = images[None, :-1], poses[None, :-1], poses[None, -1]
    torch.manual_seed(0)
    D, fov = 6, math.radians(50)
    plain = PlaneSweep(32, feature_channels=0, fov_degrees=50, depths=D, sweep_size=32)
    profiled = PlaneSweep(32, feature_channels=0, fov_degrees=50, depths=D, sweep_size=32, ray_profile=True)
    profiled.load_state_dict(plain.state_dict())  # the option adds no parameters
    assert profiled.out_channels == plain.out_channels + 4 * D
    with torch.no_grad():
        out = profiled(ctx, ctx_poses, query)
        assert torch.allclose(out[:, :plain.out_channels], plain(ctx, ctx_poses, query))
        profile = out[0, plain.out_channels:].view(4, D, 32 * 32)  # RGB planes, then the fraction of views
        rays, _, _ = plain._project(camera_frames(ctx_poses), query, 32)
    cams = np.concatenate([poses[:, :3].numpy(), np.arctan2(poses[:, 3:4], poses[:, 4:5]).numpy(),
                           np.arctan2(poses[:, 5:6], poses[:, 6:7]).numpy()], axis=1)
    pixels = images.permute(0, 2, 3, 1).numpy()
    checked = 0
    for d, depth in enumerate(plain.base_depths.tolist()):
        points = cams[-1, :3] + rays[0].numpy() * depth  # [P, 3]: the rays have unit forward component
        colours, inside, clear = np.zeros((32 * 32, 3)), np.zeros(32 * 32), np.ones(32 * 32, bool)
        for j in range(5):
            rc = camera.project(points, cams[j], 32, fov)
            in_front = (points - cams[j, :3]) @ camera_basis(cams[j, 3], cams[j, 4])[0] > 1e-3
            within = in_front & (rc >= 0).all(1) & (rc < 32).all(1)
            clear &= ~in_front | (np.abs(rc - 16).max(1) < 15) | (np.abs(rc - 16).max(1) > 17)
            idx = np.clip(rc[within].astype(int), 0, 31)
            colours[within] += pixels[j, idx[:, 0], idx[:, 1]]
            inside += within
        assert np.abs(profile[3, d].numpy() - inside / 5)[clear].max() < 1e-4
        seen = clear & (inside > 0)
        mean = colours[seen] / inside[seen, None]
        # bilinear against the nearest pixel: equal in flat regions, apart on the few edges
        assert np.median(np.abs(profile[:3, d].numpy().T[seen] - mean)) < 0.02
        checked += int(seen.sum())
    assert checked > 2000  # most of the 6 x 1024 points lie in some context view


def test_visibility_needs_two_views_and_learns_its_margin():
    """One context view has no depth map of its own (reliability 0): the read is the plain one. With several,
    the views' depth maps come from sweeps against each other, and the margin and sharpness get gradients."""
    images, poses, _ = _room_depths(1, views=4)
    torch.manual_seed(0)
    plain = PlaneSweep(32, feature_channels=2, depths=6, sweep_size=8)
    seeing = PlaneSweep(32, feature_channels=2, depths=6, sweep_size=8, visibility=True, visibility_size=8)
    seeing.load_state_dict(plain.state_dict(), strict=False)  # (it has the margin and sharpness on top)
    one = [images[None, :1], poses[None, :1]]
    a = plain(plain.view_features(*one), poses[None, :1], poses[None, -1])
    b = seeing(seeing.view_features(*one), poses[None, :1], poses[None, -1])
    assert seeing.view_features(*one).shape[2] == plain.view_features(*one).shape[2] + 2
    assert torch.allclose(a, b, atol=1e-6)
    ctx, ctx_poses = images[None, :-1], poses[None, :-1]
    features = seeing.view_features(ctx, ctx_poses)
    assert features.shape == (1, 3, 3 + 2 + 2, 32, 32) and (features[:, :, -1] > 0).any()
    out = seeing(features, ctx_poses, poses[None, -1])
    assert torch.isfinite(out).all() and not torch.allclose(out, plain(plain.view_features(ctx), ctx_poses,
                                                                          poses[None, -1]))
    (out[:, :3] - images[-1]).pow(2).mean().backward()
    assert seeing.visibility_margin.grad.abs() > 0 and seeing.log_visibility_sharpness.grad.abs() > 0
    with pytest.raises(ValueError, match="context poses"):
        seeing.view_features(ctx)
    with pytest.raises(ValueError, match="visibility_margin"):
        PlaneSweep(32, visibility=True, visibility_margin=0)


def test_the_views_depth_maps_carry_gradient_only_with_visibility_grad():
    """The views' depth sweeps run without gradient by default (half their cost; only the global depth scale,
    applied after them, learns through the maps), with it on request."""
    images, poses, _ = _room_depths(1, views=4)
    for grad in (False, True):
        torch.manual_seed(0)
        sweep = PlaneSweep(32, feature_channels=2, depths=6, sweep_size=8, visibility=True, visibility_grad=grad)
        sweep.view_features(images[None, :-1], poses[None, :-1])[:, :, -2].sum().backward()  # the log depth
        assert sweep.depth_scale.grad.abs() > 0
        for p in (sweep.score[0].weight, sweep.features[-1].weight):  # (the last conv: no ReLU can silence it)
            assert bool(p.grad is not None and p.grad.abs().sum() > 0) is grad

def test_view_depth_maps_in_chunks_equal_one_batch(monkeypatch):
    """Many large views make their depth sweeps a few query views at a time (bounded memory): the same maps."""
    images, poses, _ = _room_depths(2, views=5)
    torch.manual_seed(0)
    sweep = PlaneSweep(32, feature_channels=2, depths=6, sweep_size=8, visibility=True, visibility_size=8)
    ctx, ctx_poses = images[None, :4].expand(2, -1, -1, -1, -1), poses[None, :4].expand(2, -1, -1)
    batches = []
    real = PlaneSweep._sweep
    monkeypatch.setattr(PlaneSweep, "_sweep",
                        lambda self, f, *a, **k: batches.append(f.shape[0]) or real(self, f, *a, **k))
    with torch.no_grad():
        whole = sweep.view_features(ctx, ctx_poses)
        assert batches == [2 * 4]  # the default's sizes: one batch
        batches.clear()
        monkeypatch.setattr(PlaneSweep, "copy_budget", 2 * 3 * (3 + 2) * 32 * 32 * 3)  # three query views a batch
        chunked = sweep.view_features(ctx, ctx_poses)
    assert batches == [2 * 3, 2 * 1]
    assert torch.allclose(chunked, whole, atol=1e-6)


def test_the_depth_scores_run_under_the_callers_autocast_and_the_rest_in_fp32():
    """Under bf16 autocast the depth-scoring network runs in bf16 (2.2x faster on a CPU with bf16 units), the
    coordinates and samples stay fp32; without autocast all is fp32. The map is fp32 either way and close."""
    images, poses, _, _ = _room(views=4)
    sweep = PlaneSweep(32, feature_channels=2, depths=4, sweep_size=8, visibility=True)
    ctx, ctx_poses, query = images[None, :-1], poses[None, :-1], poses[None, -1]
    seen = []
    sweep.score[0].register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    grids = []
    real = torch.nn.functional.grid_sample
    with torch.no_grad():
        plain = sweep(sweep.view_features(ctx, ctx_poses), ctx_poses, query)
        assert set(seen) == {torch.float32}
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.nn.functional, "grid_sample", lambda x, g, **k: grids.append(g.dtype) or real(x, g, **k))
            mixed = sweep(sweep.view_features(ctx, ctx_poses), ctx_poses, query)
    assert set(seen) == {torch.bfloat16}  # the views' depth maps' sweeps and the query's
    assert grids and set(grids) == {torch.float32}
    assert mixed.dtype == plain.dtype == torch.float32
    assert (mixed - plain).abs().max() < 0.1 and not torch.equal(mixed, plain)


def test_found_colour_is_the_colour_and_the_seeing_fraction_in_every_layout():
    """found_colour picks the sweep's found colour and the fraction of views that see the point out of the map,
    whichever options add channels (occluder colour, ray profile, nearest view): the same as in the plain map."""
    images, poses, _, _ = _room(views=5)
    ctx, ctx_poses, query = images[None, :-1], poses[None, :-1], poses[None, -1]
    torch.manual_seed(0)
    plain = PlaneSweep(32, feature_channels=2, depths=4, sweep_size=8, visibility=True)
    full = PlaneSweep(32, feature_channels=2, depths=4, sweep_size=8, visibility=True, occluder_colour=True,
                      ray_profile=True, nearest_view=True)
    full.load_state_dict(plain.state_dict())
    with torch.no_grad():
        features = plain.view_features(ctx, ctx_poses)
        base, every = plain(features, ctx_poses, query), full(features, ctx_poses, query)
        colour, seen = plain.found_colour(base)
        assert torch.equal(colour, base[:, :3])  # the map starts with the found colour (RGB of the samples)
        assert torch.equal(seen, base[:, 5:6])  # after RGB and the 2 features: the fraction of views that see it
        for mine, theirs in zip(full.found_colour(every), (colour, seen)):
            assert torch.equal(mine, theirs)
    assert 0 <= seen.min() and seen.max() <= 1 and 0 < seen.mean() < 1



def _yaw_pose(x, y, z, yaw, pitch=0.0):
    return torch.tensor([x, y, z, math.sin(yaw), math.cos(yaw), math.sin(pitch), math.cos(pitch)])


def test_floor_read_appends_a_rendered_colour_and_keeps_the_layout_before_it():
    """floor_grid: the map ends with the floor read (9 channels, RGB last: the second colour to copy); the channels
    before it are the read without the option (the same parameters); it depends on the scene's place only through
    the cameras (a shifted scene renders the same) and its own loss reaches the map's network and its extent."""
    images, poses, _, _ = _room(views=5)
    torch.manual_seed(0)
    plain = PlaneSweep(32, feature_channels=2, depths=6, sweep_size=8, visibility=True)
    floor = PlaneSweep(32, feature_channels=2, depths=6, sweep_size=8, visibility=True, floor_grid=8, floor_heights=3,
                       ray_directions=True)
    missing, unexpected = floor.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("floor_", "log_floor")) for k in missing)
    assert (floor.out_channels, floor.copies) == (plain.out_channels + 3 + 9, 2)  # the rays, then the floor read
    ctx, ctx_poses, query = images[None, :-1], poses[None, :-1], poses[None, -1]
    with torch.no_grad():
        out = floor(floor.view_features(ctx, ctx_poses), ctx_poses, query)
        assert torch.equal(out[:, :plain.out_channels], plain(plain.view_features(ctx, ctx_poses), ctx_poses, query))
        colour = floor.floor_colour(out)
        assert colour.shape == (1, 3, 32, 32) and 0 <= colour.min() and colour.max() <= 1
        features = floor.view_features(ctx, ctx_poses)
        _, _, planes = floor._sweep(features, camera_frames(ctx_poses), query, 8, planes=True)
        drawn = floor._floor_render(*floor._floor_map(features, ctx_poses, camera_frames(ctx_poses), None), query,
                                    planes, 4, None)
        up = torch.nn.functional.interpolate(drawn, size=(32, 32), mode="bilinear", align_corners=False)
        assert torch.allclose(colour, up[:, -3:], atol=1e-6) and torch.allclose(out[:, -9:], up, atol=1e-6)
        stopped = out[:, -9]
        assert 0 <= stopped.min() and stopped.max() <= 1 + 1e-6
        shift = torch.tensor([3.0, -2.0, 1.5, 0, 0, 0, 0])
        moved = floor(floor.view_features(ctx, ctx_poses + shift), ctx_poses + shift, query + shift)
        assert torch.allclose(moved[:, -9:], out[:, -9:], atol=2e-4)
    out = floor(floor.view_features(ctx, ctx_poses), ctx_poses, query)
    floor.floor_colour(out).sum().backward()
    assert floor.floor_net[0].weight.grad.abs().sum() > 0 and floor.log_floor_extent.grad != 0
    with pytest.raises(ValueError, match="floor_grid must be >= 0"):
        PlaneSweep(32, floor_grid=-1)
    with pytest.raises(ValueError, match="floor_colour needs"):
        plain.floor_colour(out)


def test_floor_map_lifts_what_each_view_sees_where_it_sees_it():
    """The lifted map: a cell's point takes the colour of the pixel of each view it projects to (left of a camera
    looking along +x is +y), averaged over the views that see it; a point behind every camera gets none; the map
    is centred on the cameras and floor_extent times as wide as their spread."""
    G = 8
    sweep = PlaneSweep(32, feature_channels=0, fov_degrees=90, sweep_size=8, floor_grid=G, floor_heights=2)
    sweep.floor_levels = torch.tensor([0.0, -0.3])  # the cameras' own height, then below them
    image = torch.zeros(1, 2, 3, 32, 32)
    image[0, 0, 0, :, :16] = 1.0  # view 0: its left half red
    image[0, 0, 2, :, 16:] = 1.0  # its right half blue
    image[0, 0, 1, 17:] = 0.5  # and its bottom half half green
    image[0, 1, 1] = 1.0  # view 1: green everywhere
    # both look along +x: view 0 from (-2, 0), view 1 from (2, 0)
    poses = torch.stack([_yaw_pose(-2.0, 0.0, 1.0, 0.0), _yaw_pose(2.0, 0.0, 1.0, 0.0)])[None]
    with torch.no_grad():
        centre, height, half = sweep._floor_frame(poses)
        assert torch.allclose(centre, torch.zeros(1, 2)) and float(height) == pytest.approx(1.0)
        assert float(half) == pytest.approx(1.5 * 2.0)  # floor_extent x the cameras' largest distance from the centre
        lifted = sweep._floor_lift(image, camera_frames(poses), centre, height, half)
    assert lifted.shape == (1, (3 + 6) * 2 + 2, G, G)
    rgb, count = lifted[0, :3], lifted[0, 6]  # the first height; cell centres at -2.625, -1.875, ..., 2.625
    # (row 5, column 6) is (x, y) = (1.875, 1.125): ahead of view 0, left of its axis, behind view 1: red
    assert torch.allclose(rgb[:, 5, 6], torch.tensor([1.0, 0, 0]), atol=1e-4)
    assert float(count[5, 6]) == pytest.approx(0.5)  # one of the two views
    # the second height lies below the cameras (-0.1 x the half-width): there view 0 sees its bottom half
    below = lifted[0, 9:12]  # per height (outer) 3 + 6 channels
    assert torch.allclose(below[:, 5, 6], torch.tensor([1.0, 0.5, 0]), atol=1e-4)
    assert torch.allclose(rgb[:, 2, 6], torch.tensor([0, 0, 1.0]), atol=1e-4)  # y = -1.125: right of it, blue
    # (row 4, column 7) is (2.625, 0.375): ahead of both, left of view 0's axis: red and green averaged
    assert torch.allclose(rgb[:, 4, 7], torch.tensor([0.5, 0.5, 0]), atol=1e-4)
    assert float(count[4, 7]) == pytest.approx(1.0)
    # (row 4, column 0) is (-2.625, 0.375): behind both cameras, no view sees it
    assert float(count[4, 0]) == 0.0 and torch.equal(rgb[:, 4, 0], torch.zeros(3))
    cells = (torch.arange(G) + 0.5) / G * 2 - 1
    assert torch.equal(lifted[0, -2:], torch.stack(torch.meshgrid(cells, cells, indexing="xy")))


def test_floor_map_marks_free_space_in_front_of_what_a_view_sees():
    """With visibility, a cell's point in front of the surface a view's own depth map puts on its line gets a negative
    log-depth difference (free space), one behind it a positive one, averaged over the views with a reliable depth
    there (their fraction follows); a view without a reliable depth map does not count."""
    G = 8
    sweep = PlaneSweep(32, feature_channels=0, fov_degrees=90, sweep_size=8, visibility=True, floor_grid=G,
                       floor_heights=1)
    sweep.floor_levels = torch.tensor([0.0])  # the cameras' own height
    features = torch.zeros(1, 2, 3 + 2, 32, 32)  # RGB, each view's own log depth and its reliability
    features[0, 0, 3], features[0, 0, 4] = math.log(3.0), 1.0  # view 0: a surface 3 ahead everywhere, reliable
    features[0, 1, 3], features[0, 1, 4] = math.log(3.0), 0.0  # view 1: a depth it does not trust
    poses = torch.stack([_yaw_pose(-2.0, 0.0, 1.0, 0.0), _yaw_pose(2.0, 0.0, 1.0, 0.0)])[None]
    with torch.no_grad():
        lifted = sweep._floor_lift(features, camera_frames(poses), *sweep._floor_frame(poses))
    free, sure = lifted[0, 7], lifted[0, 8]  # per height: 3 mean, 3 variance, count, then these two
    # (row 4, column 3) is (-0.375, 0.375): 1.625 ahead of view 0, before its surface; behind view 1
    assert float(free[4, 3]) == pytest.approx(math.log(1.625 / 3.0), abs=1e-3)
    assert float(sure[4, 3]) == pytest.approx(0.5)  # one reliable view of two
    # (row 4, column 6) is (1.875, 0.375): 3.875 ahead of view 0, behind its surface; still behind view 1
    assert float(free[4, 6]) == pytest.approx(math.log(3.875 / 3.0), abs=1e-3)
    # (row 4, column 0) is (-2.625, 0.375): behind both cameras, no view has a say
    assert float(free[4, 0]) == 0.0 and float(sure[4, 0]) == 0.0


def test_floor_render_marches_the_query_rays_through_the_map():
    """The floor read renders an opaque cell of the map where the query camera sees that cell's place in the room,
    and the far plane's colour elsewhere (no context view sees the rays' points: the network's colours); where the
    views see the points, the views' colour."""
    G = 8
    sweep = PlaneSweep(32, feature_channels=0, fov_degrees=60, depths=16, sweep_size=16, floor_grid=G,
                       floor_channels=1)
    with torch.no_grad():  # opacity 30 * feature - 10; colour: red where the feature is, about black elsewhere
        first, last = sweep.floor_point[0], sweep.floor_point[-1]
        first.weight.zero_(), first.bias.zero_(), last.weight.zero_(), last.bias.zero_()
        first.weight[0, 0] = 1.0
        last.weight[0, 0], last.bias[0] = 30.0, -10.0
        last.weight[5, 0], last.bias[5:] = 60.0, -5.0
    grid = torch.zeros(1, 1, G, G)
    grid[0, 0, 5, 6] = 1.0  # the cell of row 5 (y), column 6 (x)
    centre, height, half = torch.tensor([[0.0, 0.0]]), torch.tensor([1.0]), torch.tensor([4.0])
    cell = centre[0] + half * (torch.tensor([6.5, 5.5]) / G * 2 - 1)  # its x, y: (2.5, 1.5)
    # a camera at the room's centre, at the map's height, looking at that cell
    yaw = math.atan2(float(cell[1]), float(cell[0]))
    query = _yaw_pose(0.0, 0.0, 1.0, yaw)[None]
    with torch.no_grad():
        out = sweep._floor_render(grid, centre, height, half, query, torch.zeros(1, 16 * 16, 16, 5), 3, None)
    assert out.shape == (1, 9, 16, 16)
    red = out[0, -3]
    assert float(red[7:9, 7:9].mean()) > 0.9  # the image's centre sees the cell
    assert float(red[:, :3].max()) < 0.05 and float(red[:, -3:].max()) < 0.05  # its sides do not
    assert float(out[0, 0, 7:9, 7:9].mean()) > 0.9  # the ray stopped there, before the far plane
    # the cell's distance along the ray (its z-depth for the centre pixel), as a disparity near / depth
    depth = float(cell.norm())
    disparity = float(out[0, 1, 7:9, 7:9].mean())
    assert sweep.base_depths[0] / disparity == pytest.approx(depth, rel=0.35)
    # opaque below the camera only: the bottom rows of a level camera stop before the far plane, the top rows do not
    with torch.no_grad():
        last.weight.zero_(), last.bias.zero_(), first.weight.zero_()
        first.weight[0, 1] = -1.0  # the hidden unit: -up (the point's height above the cameras)
        last.weight[0, 0], last.bias[0] = 400.0, -8.0
        low = sweep._floor_render(torch.zeros(1, 1, G, G), centre, height, half, query,
                                  torch.zeros(1, 16 * 16, 16, 5), 3, None)
    assert float(low[0, 0, -3:].mean()) > 0.9 and float(low[0, 0, :3].mean()) < 0.1
    # where the context views see a ray's points, their colour is the point's: green views, a green render
    planes = torch.tensor([0.0, 1.0, 0.0, 0.0, 2.0]).expand(1, 16 * 16, 16, 5)
    with torch.no_grad():
        seen = sweep._floor_render(grid, centre, height, half, query, planes, 3, None)
    assert torch.allclose(seen[0, -3:], torch.tensor([0.0, 1.0, 0.0])[:, None, None].expand(3, 16, 16), atol=1e-5)


def test_ray_directions_are_the_query_pixels_unit_rays_in_the_world():
    """ray_directions: after the sweep's channels (the read without it, the same parameters), before the nearest
    view's colour, each query pixel's unit ray: the image's centre looks along the camera's forward vector, its top
    row upwards of its bottom row, its left column to the camera's left."""
    images, poses, _, _ = _room(views=5)
    torch.manual_seed(0)
    plain = PlaneSweep(32, feature_channels=2, depths=4, sweep_size=8)
    rays = PlaneSweep(32, feature_channels=2, depths=4, sweep_size=8, ray_directions=True, nearest_view=True)
    rays.load_state_dict(plain.state_dict())  # the option adds no parameters
    assert rays.out_channels == plain.out_channels + 3 + 3
    ctx, ctx_poses = images[None, :-1], poses[None, :-1]
    query = _yaw_pose(0.3, -0.2, 0.5, 2.0, pitch=0.2)[None]
    with torch.no_grad():
        features = plain.view_features(ctx, ctx_poses)
        out = rays(features, ctx_poses, query)
        assert torch.equal(out[:, :plain.out_channels], plain(features, ctx_poses, query))
    d = out[0, plain.out_channels:plain.out_channels + 3]  # [3, 32, 32]
    assert torch.allclose(d.norm(dim=0), torch.ones(32, 32), atol=1e-5)
    _, forward, right, _ = camera_frames(query)
    assert torch.allclose(d[:, 15:17, 15:17].mean(dim=(1, 2)), forward[0], atol=0.01)
    assert (d[2, 0] > d[2, -1] + 0.5).all()  # the top row looks up, the bottom down (60° lens)
    assert ((d[:, :, 0] * right[0, :, None]).sum(0) < 0).all()  # the left column: to the camera's left


def test_camera_spread_is_the_median_scenes_mean_distance_from_the_centroid():
    angles = torch.linspace(0, 2 * math.pi, 5)[:-1]  # four cameras on a ring
    ring = torch.stack([angles.cos(), angles.sin(), torch.full_like(angles, 0.5)], dim=-1)  # radius 1
    poses = torch.zeros(3, 4, 7)
    for b, radius in enumerate((0.5, 2.0, 3.0)):
        poses[b, :, :3] = ring * torch.tensor([radius, radius, 1.0]) + torch.tensor([5.0, -1.0, 0.0])
    assert torch.isclose(PlaneSweep.camera_spread(poses), torch.tensor(2.0))  # the median of 0.5, 2, 3
    assert PlaneSweep.camera_spread(poses[:, :1]) == 0  # one view per scene


def test_depth_from_cameras_puts_the_planes_in_units_of_the_cameras_spread():
    """Scaling a scene's world (the cameras' positions; the images do not change) by s changes nothing in the read
    once the depth scale has started from the cameras' spread: the planes scale with the world. Without the option
    they do not, and the read differs."""
    images, poses, _, _ = _room(views=5)
    reads = {}
    for option in (True, False):
        for s in (1.0, 8.0):
            torch.manual_seed(0)
            sweep = PlaneSweep(32, feature_channels=3, depths=8, sweep_size=8, visibility=True,
                               depth_from_cameras=option, lens_gain=2.0)
            scaled = poses.clone()
            scaled[:, :3] *= s
            ctx = scaled[None, :-1]
            if option:
                spread = PlaneSweep.camera_spread(ctx)
                assert torch.isclose(spread, s * PlaneSweep.camera_spread(poses[None, :-1]))
                assert sweep.start_depth_scale(spread)
                assert torch.isclose(sweep.log_depth_scale.exp(), spread)
                assert not sweep.start_depth_scale(spread * 3)  # once
                assert torch.isclose(sweep.log_depth_scale.exp(), spread)
            else:
                assert not sweep.start_depth_scale(PlaneSweep.camera_spread(ctx))
                assert sweep.log_depth_scale == 0
            with torch.no_grad():
                features = sweep.view_features(images[None, :-1], ctx)
                reads[option, s] = sweep(features, ctx, scaled[None, -1])
    assert torch.allclose(reads[True, 1.0], reads[True, 8.0], atol=1e-4)
    assert (reads[False, 1.0] - reads[False, 8.0]).abs().max() > 0.1


def test_depth_from_cameras_ignores_a_spread_that_says_nothing():
    sweep = PlaneSweep(32, feature_channels=0, depths=4, depth_from_cameras=True)
    for spread in (torch.tensor(0.0), torch.tensor(float("nan"))):
        assert not sweep.start_depth_scale(spread)
    assert sweep.cameras_measured == 0 and sweep.depth_scale == 0
    assert "cameras_measured" in sweep.state_dict()  # a resumed run does not measure again
    assert "cameras_measured" not in PlaneSweep(32, feature_channels=0, depths=4).state_dict()


class _FixedScores(torch.nn.Module):
    """Stands in for a sweep's depth-scoring network: the scores ``[P, D]`` whatever the statistics."""

    def __init__(self, scores):
        super().__init__()
        self.scores = scores

    def forward(self, stats):  # [B, P, D, 2C + 2] -> [B, P, D, 1]
        return self.scores.expand(stats.shape[0], -1, -1)[..., None]


def test_cost_filter_starts_as_without_it_and_carries_a_depth_into_its_neighbours():
    """cost_filter: at the start (its last layer zero) the read is the read without it, parameter for parameter.
    Set to add each point's 3x3 neighbours' scores at the same depth, a pixel whose own scores are flat takes the
    depth its neighbours found and a pixel two away keeps none: the volume is laid out as the sweep's pixels are.
    Trained, its last layer (the one that starts at zero) gets a gradient from the read."""
    images, poses, _ = _room_depths(2)
    ctx, ctx_poses, query = images[None, :-1], poses[None, :-1], poses[None, -1]
    torch.manual_seed(0)
    plain = PlaneSweep(32, feature_channels=2, depths=6, sweep_size=8, visibility=True)
    torch.manual_seed(0)
    filtered = PlaneSweep(32, feature_channels=2, depths=6, sweep_size=8, visibility=True, cost_filter=2)
    assert {k: v for k, v in filtered.state_dict().items() if not k.startswith("cost_filter")}.keys() == \
        plain.state_dict().keys()
    for k, v in plain.state_dict().items():
        assert torch.equal(filtered.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(filtered(filtered.view_features(ctx, ctx_poses), ctx_poses, query),
                           plain(plain.view_features(ctx, ctx_poses), ctx_poses, query))
    out = filtered(filtered.view_features(ctx, ctx_poses), ctx_poses, query)
    (out[:, :3] - images[-1]).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in filtered.cost_filter[-1].parameters())

    # one layer that adds the 3x3 neighbourhood's scores at the same depth; the scores: flat but in column 0
    s, D = 8, 6
    one = PlaneSweep(32, feature_channels=0, depths=D, sweep_size=s, cost_filter=1)
    scores = torch.zeros(s, s, D)
    scores[:, 0, 2] = 10.0  # column 0 prefers depth 2; the other columns cannot tell
    one.score = _FixedScores(scores.view(s * s, D))
    with torch.no_grad():
        one.log_agreement.fill_(-30.0)  # no agreement prior: the logits are the scores
        one.cost_filter[0].weight.zero_()
        for d in range(D):  # the input channels: the scores of every depth, then the counts and colours
            one.cost_filter[0].weight[d, d] = 1.0  # depth d's score, 3x3 pixels, onto depth d
        _, disparity = one._sweep(ctx, camera_frames(ctx_poses), query, s)
    plane = one.base_depths[0] / one.base_depths
    flat = plane.mean()  # a uniform softmax
    box = F.conv2d(scores.permute(2, 0, 1)[:, None], torch.ones(1, 1, 3, 3), padding=1)[:, 0].permute(1, 2, 0)
    expected = (torch.softmax(scores + box, dim=-1) * plane).sum(-1)
    assert torch.allclose(disparity[0, 0], expected, atol=1e-5)
    assert torch.allclose(disparity[0, 0, :, 1], plane[2].expand(s), atol=1e-3)  # the neighbours' depth
    assert torch.allclose(disparity[0, 0, :, 2:], flat.expand(s, s - 2), atol=1e-5)  # two away: none
    with pytest.raises(ValueError, match="cost_filter"):
        PlaneSweep(32, cost_filter=-1)


def _textured_wall(size=32, fov_degrees=60.0):
    """Five cameras looking along +x at a slanted wall ``x - 0.5 y = 2`` painted with a smooth colour texture (every
    depth plane but the wall's shows other colours): frames ``[5, 3, S, S]`` (the last one the query), poses
    ``[5, 7]`` and the query's z-depth ``[S, S]`` (it falls from the left of the image to the right)."""
    half = math.tan(math.radians(fov_degrees) / 2)
    cams = np.array([[0, -0.6, -0.4, 0, 0], [0, 0.6, -0.4, 0, 0], [0, -0.6, 0.4, 0, 0], [0, 0.6, 0.4, 0, 0],
                     [0, 0.05, 0.0, 0, 0]], dtype=np.float64)
    c = (np.arange(size) + 0.5) / size * 2 - 1
    u, v = np.meshgrid(c * half, -c * half)  # right, up (row-major pixels)
    frames, depth = [], None
    for _, y0, z0, _, _ in cams:  # x 0, yaw 0: forward +x, right -y, up +z
        dy, dz = -u, v
        t = (2 + 0.5 * y0) / (1 - 0.5 * dy)  # along (1, dy, dz): the forward component is 1, so t is the z-depth
        y, z = y0 + t * dy, z0 + t * dz
        frames.append(np.stack([0.5 + 0.4 * np.sin(9 * y + 1) * np.cos(7 * z), 0.5 + 0.4 * np.cos(11 * y - 2 * z),
                                0.5 + 0.4 * np.sin(8 * z + 3 * y)]))
        depth = t
    return torch.as_tensor(np.stack(frames), dtype=torch.float32), poses7(cams), torch.as_tensor(depth).float()


def test_plane_nll_trains_the_depth_softmax_to_the_planes_whose_colour_matches_the_query():
    """depth_weight's loss: free depth logits per sweep pixel, trained on plane_nll of the query image alone, put
    each pixel's expected depth on the textured wall's true depth (it varies across the image: a read laid out
    otherwise would not); a query whose points no view sees scores as wrong colours, 37.5 nats a pixel."""
    images, poses, depth = _textured_wall()
    s, D = 16, 24
    sweep = PlaneSweep(32, feature_channels=0, depths=D, near=1.2, far=5.0, sweep_size=s)
    logits = torch.nn.Parameter(torch.zeros(s * s, D))
    sweep.score = _FixedScores(logits)
    sweep.keep_planes = True
    with torch.no_grad():
        sweep.log_agreement.fill_(-30.0)  # no agreement prior: the logits alone weigh the planes
    ctx, ctx_poses, query = images[None, :-1], poses[None, :-1], poses[None, -1]
    truth = F.interpolate(depth[None, None], size=(s, s), mode="area")[0, 0]

    def expected_depth():
        _, disparity = sweep._sweep(ctx, camera_frames(ctx_poses), query, s)
        return sweep._depth(disparity)[0, 0]

    error = lambda: (expected_depth() / truth).log().abs()  # noqa: E731
    with torch.no_grad():
        before = error()
    opt = torch.optim.Adam([logits], lr=0.3)
    for _ in range(150):
        sweep(ctx, ctx_poses, query)
        loss = sweep.plane_nll(images[None, -1]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = error()
    print(f"within 10 %: {(before < 0.1).float().mean():.2f} -> {(after < 0.1).float().mean():.2f}")
    assert (before < 0.1).float().mean() < 0.4 and (after < 0.1).float().mean() > 0.85
    assert truth[:, 0].mean() > truth[:, -1].mean() + 0.5  # the depth varies across the image

    behind = poses.clone()
    behind[-1, 4] = -1.0  # the query turned to face away (yaw 180 degrees): no context view sees its points
    sweep(ctx, ctx_poses, behind[None, -1])
    assert torch.allclose(sweep.plane_nll(images[None, -1]), torch.tensor([37.5 * s * s]))
    with pytest.raises(RuntimeError, match="keep_planes"):
        sweep.plane_nll(images[None, -1])  # once per forward
