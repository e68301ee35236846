"""A geometric read of the context views: a plane sweep along each query pixel's ray (in the spirit of E-GQN,
Tobin et al. 2019, "Geometry-aware neural rendering", and of multi-view stereo cost volumes).

For every pixel of the query view, points at ``depths`` depths along its ray are projected into every context
view with the pinhole camera of the DeepMind poses (``[x, y, z, sin yaw, cos yaw, sin pitch, cos pitch]``;
z up, yaw from +x towards +y, pitch positive looking up, square images). There the context views' pixels and
learned features are sampled. Per depth, the views' samples are summarised by their mean, their variance (low
where the views agree: a surface) and how many views see the point; a small network scores each depth, a
softmax over depths weighs them, and the weighted summary is a full-resolution map that the DRAW generator
reads beside r (its cores, and the observation that turns the canvas into pixels).

With ``visibility``, every context view first gets a depth map of its own (the same sweep, that view as the query
and the other context views as its context), and a view whose own surface lies clearly in front of a point counts
as not seeing it (occluded): in the depth scores and in the final colour. Where views see different sides of an
object this keeps the hidden side's colour out of the render.

Camera intrinsics of the public datasets are not published: the field of view is a learned parameter (its
initial value ``fov_degrees``), and so is a global scale of the depth planes, so that other renderers' lenses
and units are learned rather than assumed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of the autocast in force on ``device_type``, or None when there is none."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def camera_frames(poses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Position, forward, right and up vectors ``[..., 3]`` of 7-d poses ``[..., 7]``."""
    p = poses[..., :3]
    sy, cy, sp, cp = poses[..., 3], poses[..., 4], poses[..., 5], poses[..., 6]
    forward = torch.stack([cp * cy, cp * sy, sp], dim=-1)
    right = torch.stack([sy, -cy, torch.zeros_like(sy)], dim=-1)
    up = torch.stack([-cy * sp, -sy * sp, cp], dim=-1)  # right x forward
    return p, forward, right, up


def pixel_coords(size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image-plane coordinates of the pixel centres, ``u`` (left -1 .. right 1) and ``v`` (top 1 ..
    bottom -1), each ``[size * size]`` in row-major pixel order."""
    c = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2 - 1
    rows, cols = torch.meshgrid(c, c, indexing="ij")
    return cols.reshape(-1), -rows.reshape(-1)


class PlaneSweep(nn.Module):
    """The plane-sweep read. ``view_features`` runs once per context view; ``forward`` once per query view.

    Args:
        image_size: side of the (square) images.
        feature_channels: learned per-pixel features of each context view, sampled beside its RGB.
        depths: number of depth planes along each query ray (log-spaced from ``near`` to ``far``).
        near, far: depth range of the planes (z-depth along the query's view direction), in the poses' units,
            before the learned scale.
        fov_degrees: initial full field of view (horizontal = vertical).
        learn_fov: learn the field of view (else it stays ``fov_degrees``).
        hidden: width of the network that scores each depth.
        nearest_view: also hand the generator the context view nearest the query in pose (7-d distance, as the
            nearest-view baseline picks it), one more colour it may copy per pixel (cameras close together).
        view_colours: also hand the generator, one by one, what the ``view_colours`` context views nearest the
            query in pose (as ``nearest_view`` orders them) see at the depth the sweep chose: each view's RGB there
            and how much it sees the point (4 channels each, after the rest of the read and before ``plane_views``;
            fewer views than that repeat the farthest). Each RGB is one more colour the generator may copy per
            pixel: where the views' weighted mean (the found colour) blurs a surface that the depth misplaces or one
            view's occlusion, the nearest view that sees it keeps it sharp. 0: off.
        view_colours_logit: the starting logit of each of those colours in the generator's softmax (the canvas's
            and the other colours' start at 0).
        plane_views: also hand the generator, for the ``plane_views`` context views nearest the query in pose, each
            one's RGB at *every* depth plane of the sweep along each query ray (and how much of that sample lies
            inside its image; 4 channels per view and plane, after the view colours, at full resolution): one more
            colour to copy per view and plane, so the generator's own blend, which sees its canvas, picks the depth
            where the sweep's scores find none (flat colours). Each starts at ``plane_views_logit``. 0: off.
        plane_agreement: with ``plane_views``, also how well the nearest view agrees with the others at every depth
            plane of each query ray, at full resolution (two-view stereo where the sweep's 16 px scores are flat): per
            plane the squared RGB distance between its sample and the mean of the other views' samples that lie
            inside their images, and the fraction of the others that do (2 channels per plane, last in the map; not
            colours to copy).
        plane_resample: with ``plane_views`` and ``nearest_view``, the generator renders the nearest view's planes
            not as the blend of their colours but as one sample of that view at the point their blend weights pick
            on each query ray's line through it: the weighted mean of the planes' sample positions (a depth between
            the planes instead of two misaligned copies over each other, the ghosts at occlusions). The map ends with
            those positions (x, y in the view's image, -1 .. 1, per plane near to far; 2 channels per plane);
            :attr:`resample` tells the generator where. Gradients reach the blend weights through the image.
        sweep_size: the query resolution of the sweep (None: the image size); the depth it finds is upsampled, and
            the views are sampled once more at that depth for every pixel of the full-resolution map.
        consensus: in that last sampling, weigh down a view whose colour disagrees with the other views' mean
            (an occluded view), beside weighing each view by how close its ray is to the query ray.
        lens_gain: how fast the lens and the depth scale learn relative to the other weights (their parameters
            are stored divided by it, so Adam's steps on them are ``lens_gain`` times larger).
        visibility: occlusion reasoning: each context view's depth map (from a sweep against the other context
            views, at ``visibility_size``) decides whether it sees a point; views that do not are left out.
        visibility_size: the resolution of the views' depth maps (None: ``sweep_size``); upsampled to the image.
        visibility_grad: back-propagate through the views' depth maps (else they are computed without gradient,
            about half their cost; the depth scores still learn from the query's sweep).
        visibility_margin: how far (in log depth) a point may lie behind the surface a view sees and still count as
            seen by it (learned from this initial value).
        occluder_colour: with ``visibility``, also hand the generator what the views that do *not* see a point see
            on the line to it (three more channels, after the sweep's): the nearer surface, often the other side of
            the same object, whose colour a uniformly coloured object shares. The generator learns when to copy it.
        ray_profile: also hand the generator the whole sweep along each query ray, not only its depth-weighted
            summary: per depth plane the mean colour of the views that see that point and how many do
            (``4 * depths`` more channels at ``sweep_size``, upsampled; after the summary, before
            ``occluder_colour``). Where one view alone sees an object, no depth is photo-consistent and the
            summary takes the wall behind it; the profile still shows the object's colour at the depths where
            the ray passes it in that view.
        depth_from_cameras: start the learned depth scale at the context cameras' spread in the first training batch
            (:meth:`camera_spread`: per scene their mean distance from their centroid, the median over the batch), so
            that ``near`` and ``far`` are in units of that spread and not of whatever units a dataset's poses use.
        cost_filter: layers of a small convolution (3x3 over the sweep's pixels, every depth plane's score, fraction
            of the views that see it and their mean RGB as channels, ``cost_channels`` wide) over the depth scores
            of every sweep (the query's and the views' own), added to them: the per-point scores see only their own
            point, so a flat-coloured wall or object, where every depth agrees, gets no depth; the filter carries
            the depth found at its edges into it (a multi-view-stereo cost-volume regularisation; 2-D with the
            depths as channels: 8x faster on a CPU than 3x3x3 over depth too). Its last layer starts at zero: the
            read starts as without it. 0: off.
    """

    #: visibility: at most this many numbers in the copies of the context views for their depth sweeps
    copy_budget = 2**26

    def __init__(self, image_size: int, feature_channels: int = 5, depths: int = 16, near: float = 0.2,
                 far: float = 20.0, fov_degrees: float = 60.0, learn_fov: bool = True, hidden: int = 32,
                 sweep_size: int | None = 16, consensus: bool = False, lens_gain: float = 1.0,
                 visibility: bool = False, visibility_margin: float = 0.2, visibility_size: int | None = 8,
                 visibility_grad: bool = False, occluder_colour: bool = False, ray_profile: bool = False,
                 nearest_view: bool = False, floor_grid: int = 0, floor_heights: int = 8, floor_channels: int = 16,
                 floor_extent: float = 1.5, ray_directions: bool = False, depth_from_cameras: bool = False,
                 cost_filter: int = 0, cost_channels: int = 32, view_colours: int = 0,
                 view_colours_logit: float = -3.0, plane_views: int = 0, plane_views_logit: float = -3.0,
                 plane_agreement: bool = False, plane_resample: bool = False):
        super().__init__()
        if not 0 < near < far:
            raise ValueError(f"geometry needs 0 < near < far, got near={near}, far={far}")
        if not 0 < fov_degrees < 180:
            raise ValueError(f"geometry.fov_degrees must be in (0, 180), got {fov_degrees}")
        if depths < 2:
            raise ValueError(f"geometry.depths must be >= 2, got {depths}")
        self.image_size, self.depths = image_size, depths
        self.sample_channels = 3 + feature_channels  # what is sampled per view: RGB and the learned features
        #: the map handed to the generator: at full resolution the views' samples (RGB first, then the features)
        #: at the depth the sweep chose and how many views see that point; then from the sweep (at ``sweep_size``,
        #: upsampled) the depth-weighted sample mean, the expected disparity, the confidence (largest depth
        #: weight) and the fraction of views that see the chosen points
        for key, value in (("sweep_size", sweep_size), ("visibility_size", visibility_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"geometry.{key} must be a whole number >= 1 (a resolution; null: "
                                 f"{'the image size' if key == 'sweep_size' else 'sweep_size'}), got {value!r}")
        self.sweep_size = sweep_size or image_size
        self.out_channels = 2 * self.sample_channels + 4
        if occluder_colour and not visibility:
            raise ValueError("geometry.occluder_colour needs geometry.visibility=true (without it every view that "
                             "has the point in its image already counts)")
        self.occluder_colour = occluder_colour
        self.ray_profile = ray_profile
        if ray_profile:  # per depth plane: the seeing views' mean RGB and their count
            self.out_channels += 4 * depths
        if occluder_colour:  # the colour on the line from each view to the point, whatever hides it: RGB, last
            self.out_channels += 3
        #: with nearest_view the map ends with the RGB of the context view whose pose is nearest the query's (the
        #: nearest-view baseline, as a second colour the generator may copy where the sweep found none)
        self.nearest_view = nearest_view
        if nearest_view:
            self.out_channels += 3
        self.ray_directions = ray_directions
        if ray_directions:  # the query pixels' unit rays in world space (elevation: where the horizon is)
            self.out_channels += 3
        if floor_grid < 0 or floor_heights < 1 or floor_channels < 1 or not floor_extent > 0:
            raise ValueError(f"geometry.floor_grid must be >= 0 (0: off), floor_heights and floor_channels >= 1 and "
                             f"floor_extent > 0, got {floor_grid}, {floor_heights}, {floor_channels}, {floor_extent}")
        self.features = nn.Sequential(
            nn.Conv2d(3, feature_channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(feature_channels, feature_channels, 3, padding=1),
        ) if feature_channels else None
        if lens_gain <= 0:
            raise ValueError(f"geometry.lens_gain must be > 0, got {lens_gain}")
        half = math.tan(math.radians(fov_degrees) / 2)
        self.lens_gain = float(lens_gain)
        # log tan(fov / 2) and log(depth scale), divided by lens_gain
        self.lens = nn.Parameter(torch.tensor(math.log(half) / lens_gain), requires_grad=learn_fov)
        self.depth_scale = nn.Parameter(torch.zeros(()))
        self.depth_from_cameras = depth_from_cameras
        if depth_from_cameras:  # (only then: checkpoints from before the option load as they are) 0 until measured
            self.register_buffer("cameras_measured", torch.zeros(()))
        self.register_buffer("base_depths", torch.logspace(math.log10(near), math.log10(far), depths),
                             persistent=False)
        c = self.sample_channels
        self.score = nn.Sequential(nn.Linear(2 * c + 2, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        # a prior the network refines: views that agree in colour mark a surface
        self.log_agreement = nn.Parameter(torch.tensor(math.log(50.0)))
        self.log_view_sharpness = nn.Parameter(torch.tensor(math.log(10.0)))
        self.consensus = consensus
        self.log_consensus = nn.Parameter(torch.tensor(math.log(20.0)), requires_grad=consensus)
        if visibility_margin <= 0:
            raise ValueError(f"geometry.visibility_margin must be > 0, got {visibility_margin}")
        self.visibility = visibility
        self.visibility_size = visibility_size or self.sweep_size
        self.visibility_grad = visibility_grad
        if visibility:  # (only then: checkpoints from before the option load as they are)
            self.visibility_margin = nn.Parameter(torch.tensor(float(visibility_margin)))
            self.log_visibility_sharpness = nn.Parameter(torch.tensor(math.log(50.0)))
        # built last: with the same seed the parameters above start as without the option
        self.floor_grid = int(floor_grid)
        if floor_grid:  # the map of the room from above and the renderer that marches the query rays through it
            self.out_channels += self.floor_out
            self.floor_heights = int(floor_heights)
            lifted = (self.sample_channels + 6) * floor_heights + 2  # per height: the views' summary; then x, y
            self.floor_net = nn.Sequential(
                nn.Conv2d(lifted, 48, 3, padding=1), nn.ReLU(),
                nn.Conv2d(48, 48, 3, padding=1), nn.ReLU(),
                nn.Conv2d(48, floor_channels, 3, padding=1),
            )
            # a point of a query ray: the map there, its height, disparity, whether it lies inside the map, the views'
            # mean RGB there, their RGB variance and the fraction of the views that see it
            self.floor_point = nn.Sequential(nn.Linear(floor_channels + 8, hidden), nn.ReLU(),
                                              nn.Linear(hidden, 1 + 4 + 3))
            with torch.no_grad():  # a start where rays pass most planes (opacity ~0.12 each) rather than the first
                self.floor_point[-1].bias[0] = -2.0
            self.log_floor_extent = nn.Parameter(torch.tensor(math.log(floor_extent)))
            # heights of the lifted points, from the cameras' mean height, in units of the map's half-width
            self.register_buffer("floor_levels", torch.linspace(-0.5, 0.2, floor_heights), persistent=False)
        #: set by the training module for its ``depth_weight`` loss: a training forward keeps its query sweep's depth
        #: logits and the views' colours and counts per plane for :meth:`plane_nll`
        self.keep_planes = False
        self._planes = None
        if cost_filter < 0 or cost_channels < 1:
            raise ValueError(f"geometry.cost_filter must be >= 0 and cost_channels >= 1, got {cost_filter} and "
                             f"{cost_channels}")
        self.cost_filter = None
        if cost_filter:  # built last, like the floor map: the parameters above start as without it
            layers, width = [], self.cost_inputs * depths
            for _ in range(cost_filter - 1):
                layers += [nn.Conv2d(width, cost_channels, 3, padding=1), nn.ReLU()]
                width = cost_channels
            layers.append(nn.Conv2d(width, depths, 3, padding=1))
            nn.init.zeros_(layers[-1].weight)
            nn.init.zeros_(layers[-1].bias)
            self.cost_filter = nn.Sequential(*layers)
        if view_colours < 0:
            raise ValueError(f"geometry.view_colours must be >= 0 (0: off), got {view_colours}")
        self.view_colours = int(view_colours)
        if plane_views < 0:
            raise ValueError(f"geometry.plane_views must be >= 0 (0: off), got {plane_views}")
        self.plane_views = int(plane_views)
        if plane_agreement and not self.plane_views:
            raise ValueError("geometry.plane_agreement compares the nearest view's plane samples with the other "
                             "views': it needs geometry.plane_views >= 1")
        self.plane_agreement = bool(plane_agreement)
        # where the colours the generator may copy start in the map (forward's layout): the found colour first, then
        # the nearest view's, the floor read's (its last three channels), each near view's RGB (then how much it
        # sees the point) and the plane views' RGB at each depth plane (then how much of the sample is inside)
        at = self.out_channels - 3 * nearest_view - (self.floor_out if floor_grid else 0)
        self.copy_at = [0]
        if nearest_view:
            self.copy_at.append(at)
            at += 3
        if floor_grid:
            at += self.floor_out
            self.copy_at.append(at - 3)
        planes = self.plane_views * depths  # one colour per view and depth plane
        self.out_channels += 4 * (self.view_colours + planes)
        self.copy_at += [at + 4 * i for i in range(self.view_colours + planes)]
        self.copy_at = tuple(self.copy_at)
        self.out_channels += 2 * depths * self.plane_agreement  # last, after every colour to copy
        if plane_resample and not (self.plane_views and nearest_view):
            raise ValueError("geometry.plane_resample samples the nearest view between its depth planes: it needs "
                             "geometry.plane_views >= 1 and geometry.nearest_view=true")
        self.plane_resample = bool(plane_resample)
        #: with plane_resample, for the generator: (where the nearest view's RGB starts in the map, where its planes'
        #: sample positions start, the index of its first plane among the colours to copy, how many planes)
        self.resample = None
        if plane_resample:
            self.resample = (self.copy_at[1], self.out_channels, len(self.copy_at) - planes, depths)
            self.out_channels += 2 * depths  # last of all
        #: how many colours the generator may copy per pixel
        self.copies = len(self.copy_at)
        #: the initial logit of each in the generator's softmax over them and its canvas (whose logit is 0)
        self.copy_logits = ((0.0,) * (self.copies - self.view_colours - planes)
                            + (float(view_colours_logit),) * self.view_colours + (float(plane_views_logit),) * planes)

    #: :meth:`plane_nll`: a plane matches a query pixel whose colour lies within about this of the colour the views
    #: see there (per channel, colours in 0..1)
    plane_match_sigma = 0.1
    #: :meth:`plane_nll`: a plane no view sees scores as a colour this far off in every channel (as a wrong one)
    plane_unseen_distance = 0.5

    def plane_nll(self, query_images: torch.Tensor) -> torch.Tensor:
        """The depth weights of the last training forward's query sweep (``keep_planes``), scored against the query
        images ``[B, 3, H, W]`` (known in training): per pixel of the sweep (the image area-averaged to
        ``sweep_size``) the mixture NLL ``-log sum_d w_d exp(m_d)``, ``m_d = -|x - c_d|^2 / (2 s^2)`` for a
        plane that at least half a view sees (``c_d`` the seeing views' mean colour there), and for one that
        none sees as for a colour ``plane_unseen_distance`` off in every channel, summed over each scene's
        pixels ``[B]``. A direct signal for the depth scores (and the features, the visibility margin, the
        lens and the depth scale): one view that sees the query's point suffices, where the views' agreement
        needs two, and a flat-coloured object still tells its planes from those of the wall behind it. Hiding
        a point from the views earns nothing. Measured (session 25): on flat-coloured rooms a pixel's colour
        matches at many planes; the weights grew peakier, not right, the depth scale drifted 2x outwards and
        the lens moved the wrong way on our 60-degree rooms (to 78): off by default."""
        if self._planes is None:
            raise RuntimeError("plane_nll needs a training forward of the read with keep_planes set")
        logits, mean, count = self._planes
        self._planes = None
        if query_images.shape[0] != logits.shape[0]:
            raise ValueError(f"plane_nll: {query_images.shape[0]} query images for a sweep of {logits.shape[0]}")
        size = math.isqrt(logits.shape[1])
        x = query_images.float()
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="area")
        seen = count[:, 0] > 0.5  # [B, P, D]
        # the seeing views' mean colour: _view_stats divides their sum by count.clamp(min=1), undone for soft counts
        colour = mean[:, :3] * count.clamp(min=1) / count.clamp(min=0.5)
        match = -(colour - x.flatten(2)[..., None]).pow(2).sum(1) / (2 * self.plane_match_sigma ** 2)  # [B, P, D]
        unseen = -3 * self.plane_unseen_distance ** 2 / (2 * self.plane_match_sigma ** 2)
        match = torch.where(seen, match, torch.full_like(match, unseen))
        return -torch.logsumexp(torch.log_softmax(logits, dim=-1) + match, dim=-1).sum(1)

    #: what the cost filter sees at every point of a sweep (per depth plane): its depth score, the fraction of the
    #: views that see it and their mean RGB
    cost_inputs = 5

    @staticmethod
    def camera_spread(context_poses: torch.Tensor) -> torch.Tensor:
        """The context cameras' spread in a batch ``[B, M, 7]``: per scene the mean distance of its cameras from
        their centroid, the median over the scenes (a scalar; 0 with one view per scene)."""
        pos = context_poses[..., :3].float()
        return (pos - pos.mean(dim=1, keepdim=True)).norm(dim=-1).mean(dim=1).median()

    def start_depth_scale(self, spread: torch.Tensor) -> bool:
        """With ``depth_from_cameras``, once, before the first training step: start the learned depth scale at the
        context cameras' ``spread`` (:meth:`camera_spread`), so that ``near`` and ``far`` are in units of it
        whatever units a dataset's poses use. Returns whether it set it (False: off, done already, or a spread
        that says nothing: one view per scene, cameras at one point)."""
        if not self.depth_from_cameras or bool(self.cameras_measured) or not bool(torch.isfinite(spread)):
            return False
        if float(spread) < 1e-6:
            return False
        with torch.no_grad():
            self.depth_scale.add_(torch.log(spread.to(self.depth_scale)) / self.lens_gain)
            self.cameras_measured.fill_(1.0)
        return True

    @property
    def log_half_fov(self) -> torch.Tensor:
        """log tan(fov / 2), the lens."""
        return self.lens * self.lens_gain

    @property
    def log_depth_scale(self) -> torch.Tensor:
        return self.depth_scale * self.lens_gain

    @property
    def plane_depths(self) -> torch.Tensor:
        """The depth planes along the view direction ``[depths]`` (near to far), with the learned depth scale."""
        return self.base_depths * self.log_depth_scale.exp()

    @property
    def fov_degrees(self) -> torch.Tensor:
        """The current full field of view in degrees, a tensor (reading it needs no device sync)."""
        return torch.rad2deg(2 * torch.atan(self.log_half_fov.exp()))

    @property
    def field_of_view(self) -> float:
        """The current full field of view in degrees."""
        return float(self.fov_degrees.detach())

    #: channels of the floor read: how much of the ray stopped before the far plane, its expected disparity, 4
    #: features, RGB
    floor_out = 9

    def floor_colour(self, read: torch.Tensor) -> torch.Tensor:
        """The colour the floor read rendered for each pixel ``[B, 3, H, W]`` in a map of :meth:`forward` (with
        ``floor_grid``: the last three channels of its part)."""
        if not self.floor_grid:
            raise ValueError("floor_colour needs a PlaneSweep with floor_grid > 0")
        at = self.copy_at[1 + self.nearest_view]
        return read[:, at:at + 3]

    def found_colour(self, read: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The colour the sweep found for each pixel ``[B, 3, H, W]`` in a map of :meth:`forward`, and the fraction of
        the context views that see that point ``[B, 1, H, W]`` (0: none does, and the colour means nothing)."""
        C = self.sample_channels
        return read[:, :3], read[:, C:C + 1]

    def view_features(self, images: torch.Tensor, poses: torch.Tensor | None = None) -> torch.Tensor:
        """Context images ``[B, M, 3, H, W]`` (and their poses ``[B, M, 7]``) -> what is sampled from them,
        ``[B, M, 3 + F, H, W]``; with ``visibility`` two more channels: each view's own log depth and how
        reliable it is (0: no other view saw the point, so its depth is a guess), ``[B, M, 3 + F + 2, H, W]``."""
        B, M = images.shape[:2]
        if self.features is not None:
            feats = self.features(images.flatten(0, 1)).unflatten(0, (B, M))
            images = torch.cat([images, feats.to(images.dtype)], dim=2)
        if not self.visibility:
            return images
        if poses is None:
            raise ValueError("PlaneSweep(visibility=True).view_features needs the context poses")
        return torch.cat([images, self._view_depths(images, poses).to(images.dtype)], dim=2)

    def _view_depths(self, features: torch.Tensor, poses: torch.Tensor) -> torch.Tensor:
        """Each context view's log depth map and its reliability ``[B, M, 2, H, W]``: the sweep (at
        ``visibility_size``) with that view as the query and the other views as its context (one view alone:
        depth unknown, reliability 0)."""
        amp = _autocast_dtype(features.device.type)
        with torch.autocast(features.device.type, enabled=False):
            features, poses = features.float(), poses.float()
            B, M, C, H, W = features.shape
            if M < 2:
                return features.new_zeros(B, M, 2, H, W)
            others = torch.tensor([[i for i in range(M) if i != j] for j in range(M)], device=features.device)
            size = self.visibility_size
            # each query view's sweep takes a copy of the other views: batch as many as keep the copies under
            # copy_budget numbers (all of them for the default; one at a time for e.g. 20 views of 84 px, batch 36)
            step = max(1, self.copy_budget // (B * (M - 1) * C * H * W))
            maps = []
            for start in range(0, M, step):
                js = others[start:start + step]  # [m, M - 1]
                ctx = features[:, js].flatten(0, 1)  # [B * m, M - 1, C, H, W]
                ctx_poses = poses[:, js].flatten(0, 1)  # [B * m, M - 1, 7]
                with torch.set_grad_enabled(torch.is_grad_enabled() and self.visibility_grad):
                    summary, disparity = self._sweep(ctx, camera_frames(ctx_poses),
                                                     poses[:, start:start + step].flatten(0, 1), size, amp=amp)
                seen_by = summary[:, C + 2:C + 3] * (M - 1)  # how many other views see the chosen points
                part = torch.cat([self._depth(disparity).log(), seen_by.clamp(max=1)], dim=1)
                if size != H:
                    part = F.interpolate(part, size=(H, W), mode="bilinear", align_corners=False)
                maps.append(part.unflatten(0, (B, len(js))))
            return torch.cat(maps, dim=1)

    def _depth(self, disparity: torch.Tensor) -> torch.Tensor:
        """Depth along the view direction of a disparity (1 at ``near``, ``near/far`` at ``far``), with the learned
        depth scale."""
        return self.plane_depths[0] / disparity.clamp(min=1e-3)

    def forward(self, features: torch.Tensor, context_poses: torch.Tensor, query_poses: torch.Tensor) -> torch.Tensor:
        """``features`` ``[B, M, C, H, W]`` (from :meth:`view_features`), poses ``[B, M, 7]`` and ``[B, 7]`` ->
        the map ``[B, out_channels, H, W]``. Computed in fp32 whatever the autocast (it is coordinates), but for
        the small networks on statistics of the samples (the depth scores; with ``floor_grid`` the map's CNN and the
        network on each ray's points), which run under the caller's autocast."""
        amp = _autocast_dtype(features.device.type)
        with torch.autocast(features.device.type, enabled=False):
            features, context_poses, query_poses = features.float(), context_poses.float(), query_poses.float()
            B, M, _, H, W = features.shape
            frames = camera_frames(context_poses)
            coarse, disparity, *planes = self._sweep(features, frames, query_poses, self.sweep_size,
                                                     profile=self.ray_profile, amp=amp, planes=bool(self.floor_grid),
                                                     keep=self.keep_planes and torch.is_grad_enabled())
            if self.sweep_size != H:
                coarse = F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)
                disparity = F.interpolate(disparity, size=(H, W), mode="bilinear", align_corners=False)
            depth = self._depth(disparity)  # [B, 1, H, W]
            near = self._nearest(context_poses, query_poses)
            projection = self._project(frames, query_poses, H)  # the query pixels' rays into every view, once
            fine, views = self._gather(features, frames, query_poses, depth.flatten(1),
                                       near[:, :self.view_colours] if self.view_colours else None, projection)
            fine = fine.view(B, -1, H, W)
            if self.occluder_colour:  # after the sweep's channels: the layout before it stays as without the option
                out = [fine[:, :-3], coarse, fine[:, -3:]]
            else:
                out = [fine, coarse]  # RGB first: what the generator may copy
            if self.ray_directions:  # after the sweep's channels, before the colours that end the map
                out.append(F.normalize(self._rays(query_poses, H), dim=-1).transpose(1, 2).reshape(B, 3, H, W))
            if self.nearest_view:  # last: the layout before it stays as without the option
                # the view nearest_context_view picks (the first of the stable order; ties: the first view)
                out.append(features[torch.arange(B, device=near.device), near[:, 0], :3])
            if self.floor_grid:  # after the nearest view, RGB last (one more colour to copy)
                floor = self._floor_render(*self._floor_map(features, context_poses, frames, amp), query_poses,
                                           planes[0], M, amp)
                if self.sweep_size != H:
                    floor = F.interpolate(floor, size=(H, W), mode="bilinear", align_corners=False)
                out.append(floor)
            if self.view_colours:  # near the end: the layout before it stays as without the option
                out.append(views.reshape(B, -1, H, W))
            if self.plane_views:  # last, after the view colours: view by view, plane by plane, RGB + inside
                cams = self._plane_cams(near[:, :self.plane_views], projection)  # [B, K, P, D, 3]
                samples = self._plane_samples(features, near[:, :self.plane_views], cams)  # [B, K, 4, P, D]
                out.append(samples.permute(0, 1, 4, 2, 3).reshape(B, -1, H, W))
            if self.plane_agreement:  # last: not a colour to copy
                out.append(self._plane_agreement(features, near[:, 0], samples[:, 0], H, projection))
            if self.plane_resample:  # last of all: where the nearest view's planes fall in its image (x, y per plane)
                out.append(self._grid(cams[:, 0]).permute(0, 2, 3, 1).reshape(B, -1, H, W))
            return torch.cat(out, dim=1)

    def _nearest(self, context_poses: torch.Tensor, query_poses: torch.Tensor) -> torch.Tensor | None:
        """The indices ``[B, max(nearest_view, view_colours, plane_views)]`` of the context views nearest each query
        in pose (7-d distance, as :func:`gqn.metrics.nearest_context_view`), nearest first; with fewer views the
        farthest repeats. None without any of those options."""
        k = max(int(self.nearest_view), self.view_colours, self.plane_views)
        if not k:
            return None
        # stable: of views at the same distance the first, as nearest_context_view's argmin picks
        order = (context_poses - query_poses[:, None]).pow(2).sum(dim=-1).argsort(dim=1, stable=True)  # [B, M]
        order = order[:, :k]
        return torch.cat([order, order[:, -1:].expand(-1, k - order.shape[1])], dim=1)

    def _plane_samples(self, features, views, cams):
        """For the context views ``views`` ``[B, K]`` (indices), each one's RGB at every depth plane of each query
        ray (``cams``: :meth:`_plane_cams` of those views) and how much of that sample lies inside its image:
        ``[B, K, 4, P, depths]`` (planes near to far)."""
        images = features[:, :, :3].gather(1, views[:, :, None, None, None].expand(-1, -1, 3, *features.shape[-2:]))
        return self._sample(images, cams)

    def _plane_cams(self, views, projection):
        """Each query ray's point at every depth plane in the cameras of the context views ``views`` ``[B, K]``
        (indices; ``projection`` from :meth:`_project`): ``[B, K, P, depths, 3]`` (z, x, y)."""
        _, origin, slope = projection  # [B, M, 3], [B, M, P, 3]
        origin = origin.gather(1, views[..., None].expand(-1, -1, 3))
        slope = slope.gather(1, views[:, :, None, None].expand(-1, -1, *slope.shape[2:]))
        depth = self.plane_depths  # [D]
        return origin[:, :, None, None] + slope[:, :, :, None] * depth[:, None]  # [B, K, P, D, 3]

    def _plane_agreement(self, features, nearest, own, size, projection):
        """At every depth plane of each query ray (``size`` x ``size``, ``projection`` from :meth:`_project`): the
        squared RGB distance between the view ``nearest`` ``[B]`` (index; ``own``: its :meth:`_plane_samples`
        ``[B, 4, P, D]``, already made for the plane views) and the mean of the other views whose image holds the
        point (each sample divided by how much of it lies inside), and the fraction of those others:
        ``[B, depths * 2, s, s]`` (plane by plane, near to far; distance 0 where the nearest view or no other view
        holds the point)."""
        B, M = features.shape[:2]
        mine, mine_inside = own.split([3, 1], dim=1)  # [B, 3 | 1, P, D]
        if M == 1:  # no other view
            seen, others = torch.zeros_like(mine_inside), torch.zeros_like(mine)
        else:
            index = torch.arange(M, device=nearest.device).expand(B, M)
            rest = index[index != nearest[:, None]].view(B, M - 1)  # every view but the nearest
            rgb, inside = self._plane_samples(features, rest, self._plane_cams(rest, projection)).split(
                [3, 1], dim=2)  # [B, M - 1, 3 | 1, P, D]
            seen = inside.sum(1)  # [B, 1, P, D]
            others = rgb.sum(1) / seen.clamp(min=1e-3)
        mine = mine / mine_inside.clamp(min=1e-3)
        distance = (mine - others).pow(2).sum(1, keepdim=True) * ((seen > 1e-3) & (mine_inside > 1e-3))
        out = torch.cat([distance, seen / max(M - 1, 1)], dim=1)  # [B, 2, P, D]
        return out.permute(0, 3, 1, 2).reshape(B, -1, size, size)

    def _floor_frame(self, context_poses):
        """The map's centre ``[B, 2]`` (the context cameras' mean x, y), reference height ``[B]`` (their mean z) and
        half-width ``[B]`` (``floor_extent`` times their largest distance from the centre; at least ``near`` x 5)."""
        pos = context_poses[..., :3]
        centre, height = pos[..., :2].mean(dim=1), pos[..., 2].mean(dim=1)
        spread = (pos[..., :2] - centre[:, None]).norm(dim=-1).amax(dim=1)
        least = 5 * self.plane_depths[0]
        return centre, height, self.log_floor_extent.exp() * torch.maximum(spread, least)

    def _floor_map(self, features, context_poses, frames, amp):
        """The fused map of the room from above ``[B, floor_channels, G, G]`` (rows along y, columns along x) and
        its frame (:meth:`_floor_frame`)."""
        centre, height, half = self._floor_frame(context_poses)
        lifted = self._floor_lift(features, frames, centre, height, half)
        with torch.autocast(features.device.type, dtype=amp, enabled=amp is not None):
            grid = self.floor_net(lifted).float()
        return grid, centre, height, half

    def _floor_lift(self, features, frames, centre, height, half):
        """The context views lifted into the map ``[B, (C + 6) * Y + 2, G, G]``: per height (outer) the mean of the
        samples of the views that see the cell's point (C), their RGB variance (3), the fraction of the views that
        see it, the mean over the views with a reliable depth map of how far (log depth, within +-1) the point lies
        behind its surface (< 0: in front, free space) and the fraction of those views; then the cell's x, y in
        the map (-1 .. 1)."""
        B, M = features.shape[:2]
        G, Y = self.floor_grid, self.floor_heights
        u, v = pixel_coords(G, features.device)  # the cells' centres, row-major: x = u, y = -v (rows along y)
        gx, gy = u.view(G, G), -v.view(G, G)
        xy = centre[:, None, None] + half[:, None, None, None] * torch.stack([gx, gy], dim=-1)  # [B, G, G, 2]
        z = height[:, None] + half[:, None] * self.floor_levels  # [B, Y]
        points = torch.cat([xy[:, None].expand(B, Y, G, G, 2),
                            z[:, :, None, None, None].expand(B, Y, G, G, 1)], dim=-1).view(B, Y * G * G, 3)
        c_pos, c_f, c_r, c_u = frames
        axes = torch.stack([c_f, c_r, c_u], dim=2)  # [B, M, 3 (z, x, y), 3]
        cam = torch.einsum("bmax,bmnx->bmna", axes, points[:, None] - c_pos[:, :, None])[:, :, :, None]
        raw = self._sample(features, cam)  # [B, M, C' + 1, N, 1]
        samples, seen, visible = self._seen(raw, cam)
        if visible is not None:
            samples = samples * visible
        count, mean, var = self._view_stats(samples, seen)  # [B, 1 | C | C, N, 1]
        var = var[:, :3]
        if visible is not None:  # free space: the point lies in front of the surface a view's own depth map puts there
            inside = raw[:, :, -1:]
            behind, reliability = self._behind(raw[:, :, -3:-2], raw[:, :, -2:-1], inside, cam)
            trust = reliability * inside
            sure = trust.sum(dim=1)
            free = [(trust * behind.clamp(-1, 1)).sum(dim=1) / sure.clamp(min=1e-3), sure / M]
        else:
            free = [torch.zeros_like(count)] * 2
        lifted = torch.cat([mean, var, count / M, *free], dim=1)  # [B, C + 6, N, 1]
        lifted = lifted.view(B, -1, Y, G, G).transpose(1, 2).flatten(1, 2)
        return torch.cat([lifted, torch.stack([gx, gy])[None].expand(B, 2, G, G)], dim=1)

    def _floor_render(self, grid, centre, height, half, query_poses, planes, views, amp):
        """March every query ray (at ``sweep_size``) through the map: ``[B, floor_out, s, s]``. ``planes``
        ``[B, P, D, 5]``: the sweep's points on those rays (``_sweep(planes=True)``: the seeing views' mean RGB,
        RGB variance and count, of ``views`` context views). A point's opacity comes from the map there, its height
        and those statistics; its colour is the views' where they see it, the network's where none does."""
        B, s, D = grid.shape[0], self.sweep_size, self.depths
        q_pos, rays = query_poses[..., :3], self._rays(query_poses, s)  # [B, 3], [B, P, 3]
        depth = self.plane_depths  # [D]
        points = q_pos[:, None, None] + rays[:, :, None] * depth[None, None, :, None]  # [B, P, D, 3]
        where = (points[..., :2] - centre[:, None, None]) / half[:, None, None, None]  # [B, P, D, 2]
        cell = F.grid_sample(grid, where, mode="bilinear", padding_mode="zeros", align_corners=False)  # [B, F, P, D]
        disparity = (self.base_depths[0] / self.base_depths).expand(B, s * s, D)
        inside = (where.abs() < 1).all(dim=-1).float()
        up = (points[..., 2] - height[:, None, None]) / half[:, None, None]
        seen = planes[..., 4:].clamp(max=1)  # [B, P, D, 1]
        x = torch.cat([cell.permute(0, 2, 3, 1), torch.stack([up, disparity, inside], dim=-1), planes[..., :4],
                       planes[..., 4:] / views], dim=-1)
        with torch.autocast(grid.device.type, dtype=amp, enabled=amp is not None):
            point = self.floor_point(x).float()  # [B, P, D, 8]
        alpha = torch.sigmoid(point[..., 0])
        alpha = torch.cat([alpha[..., :-1], torch.ones_like(alpha[..., -1:])], dim=-1)  # the far plane stops every ray
        through = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1 - alpha[..., :-1]], dim=-1), dim=-1)
        w = (through * alpha)[..., None]  # [B, P, D, 1]
        stopped = w[..., :-1, 0].sum(-1, keepdim=True)
        out = torch.cat([stopped, (w[..., 0] * disparity).sum(-1, keepdim=True), (w * point[..., 1:5]).sum(2),
                         (w * (seen * planes[..., :3] + (1 - seen) * torch.sigmoid(point[..., 5:]))).sum(2)],
                        dim=-1)  # [B, P, 9]
        return out.transpose(1, 2).reshape(B, self.floor_out, s, s)

    def _rays(self, query_poses, size):
        """The world-space rays of the query pixels at ``size`` x ``size`` ``[B, P, 3]``, scaled so that a depth ``t``
        along the view direction is the point ``position + t * ray``."""
        u, v = pixel_coords(size, query_poses.device)  # [P]
        half = self.log_half_fov.exp()
        _, q_f, q_r, q_u = camera_frames(query_poses)  # [B, 3]
        return q_f[:, None] + half * (u[None, :, None] * q_r[:, None] + v[None, :, None] * q_u[:, None])

    def _project(self, frames, query_poses, size):
        """Rays of the query pixels at ``size`` x ``size`` and the affine map from a depth along them to each context
        camera's coordinates: ``origin`` ``[B, M, 3]`` + t * ``slope`` ``[B, M, P, 3]`` (z, x, y)."""
        q_pos = query_poses[..., :3]
        rays = self._rays(query_poses, size)  # [B, P, 3]
        c_pos, c_f, c_r, c_u = frames  # [B, M, 3]
        axes = torch.stack([c_f, c_r, c_u], dim=2)  # [B, M, 3 (z, x, y), 3]
        origin = torch.einsum("bmax,bmx->bma", axes, q_pos[:, None] - c_pos)
        slope = torch.einsum("bmax,bpx->bmpa", axes, rays)
        return rays, origin, slope

    def _sample(self, features, cam):
        """Sample ``features`` ``[B, M, C, H, W]`` where the context-camera coordinates ``cam`` ``[B, M, P, N, 3]``
        fall: ``[B, M, C + 1, P, N]``, the last channel how much of the sample lies inside its view (0 .. 1)."""
        B, M = features.shape[:2]
        grid = self._grid(cam).flatten(0, 1)  # [B*M, P, N, 2]
        ones = features.new_ones(B, M, 1, *features.shape[-2:])
        return F.grid_sample(torch.cat([features, ones], dim=2).flatten(0, 1), grid, mode="bilinear",
                             padding_mode="zeros", align_corners=False).unflatten(0, (B, M))

    def _grid(self, cam):
        """Context-camera coordinates ``[..., 3]`` (z, x, y) -> where they fall in the image as ``grid_sample`` reads
        it ``[..., 2]`` (x, y; -1 .. 1 across the image; behind the camera far outside)."""
        half = self.log_half_fov.exp()
        z = cam[..., 0]
        in_front = z > 1e-4
        scale = 1 / (z.clamp(min=1e-4) * half)
        # behind the camera: far outside the image, where zero padding samples nothing
        x = torch.where(in_front, cam[..., 1] * scale, 4.0).clamp(-4, 4)
        y = torch.where(in_front, -cam[..., 2] * scale, 4.0).clamp(-4, 4)  # image rows grow downwards
        return torch.stack([x, y], dim=-1)

    def _seen(self, samples, cam):
        """Split sampled ``[B, M, C' + 1, ...]`` (``_sample`` of ``view_features``) into the samples ``[B, M, C, ...]``,
        how much each view sees each point ``[B, M, 1, ...]`` (inside its image, times ``visible``) and ``visible``
        ``[B, M, 1, ...]``: with the views' depth maps, how little the surface each view's own map puts there hides
        the point (None without them: no visibility, or while making them). ``cam`` ``[B, M, ..., 3]``: the points
        in each view's camera coordinates."""
        C = self.sample_channels
        # split, not sliced: the backward of a slice fills a zero tensor of the whole sample for each slice
        if samples.shape[2] == C + 1:  # no depth maps: the samples and how much of each lies inside its view
            samples, inside = samples.split([C, 1], dim=2)
            return samples, inside, None
        samples, own_depth, reliable, inside = samples.split([C, 1, 1, 1], dim=2)
        behind, reliability = self._behind(own_depth, reliable, inside, cam)
        hidden = torch.sigmoid(self.log_visibility_sharpness.exp() * (behind - self.visibility_margin))
        visible = 1 - reliability * hidden
        return samples, inside * visible, visible

    @staticmethod
    def _behind(own_depth, reliable, inside, cam):
        """From a view's sampled own log depth and reliability ``[B, M, 1, ...]`` (bilinear samples: weighted by how
        much of each lies ``inside`` the image, so divided by it) and the points in its camera coordinates ``cam``:
        how far (log depth) each point lies behind the surface that view's depth map puts on its line (> 0: behind
        it, < 0: in front, free space) and how reliable the map is there (0 .. 1)."""
        inside_ = inside.clamp(min=1e-6)
        behind = cam[..., 0].clamp(min=1e-4).log().unsqueeze(2) - own_depth / inside_
        return behind, (reliable / inside_).clamp(0, 1)

    @staticmethod
    def _view_stats(samples, seen):
        """How many views see each point ``[B, 1, ...]`` (the sum of ``seen`` ``[B, M, 1, ...]``), and the mean and
        variance over them of ``samples`` ``[B, M, C, ...]`` (already weighted by how much each view sees it)."""
        count = seen.sum(dim=1)
        denom = count.clamp(min=1)
        mean = samples.sum(dim=1) / denom
        var = (samples.pow(2).sum(dim=1) / denom - mean.pow(2)).clamp(min=0)
        return count, mean, var

    def _sweep(self, features, frames, query_poses, size, profile: bool = False, amp: torch.dtype | None = None,
               planes: bool = False, keep: bool = False):
        """The plane sweep at ``size`` x ``size`` query pixels: the depth-weighted summary ``[B, C + 3, s, s]`` and
        the expected disparity ``[B, 1, s, s]`` (1 at ``near``, ``near/far`` at ``far``). ``profile``: the summary
        is followed by every depth's mean RGB and count of seeing views, ``[B, C + 3 + 4 * depths, s, s]``. ``amp``:
        the dtype of the caller's autocast (None: off), under which the depth-scoring network runs (its input is
        statistics of the samples, not coordinates; in bf16 on a CPU with bf16 units 2.2x faster)."""
        B, M = features.shape[:2]
        D, P = self.depths, size * size
        depth = self.plane_depths  # [D]
        _, origin, slope = self._project(frames, query_poses, size)
        cam = origin[:, :, None, None] + slope[:, :, :, None] * depth[None, None, None, :, None]  # [B, M, P, D, 3]
        samples, seen, visible = self._seen(self._sample(features, cam), cam)  # [B, M, C | 1 | 1, P, D]
        if visible is not None:  # the samples already carry how much of them is inside the image
            samples = samples * visible
        count, mean, var = self._view_stats(samples, seen)  # [B, 1 | C | C, P, D]: how many views see each point, ...
        disparity = (self.base_depths[0] / self.base_depths).view(1, 1, 1, D).expand(B, 1, P, D)
        stats = torch.cat([mean, var, count / M, disparity], dim=1).permute(0, 2, 3, 1)  # [B, P, D, 2C + 2]
        agreement = var[:, :3].sum(dim=1) * (count[:, 0] > 1.5)  # [B, P, D]: only where two views see the point
        with torch.autocast(features.device.type, dtype=amp, enabled=amp is not None):
            scores = self.score(stats).squeeze(-1).float()
        logits = scores - self.log_agreement.exp() * agreement
        if self.cost_filter is not None:  # scores, counts and colours per depth plane: [B, 5 * D, s, s]
            volume = torch.cat([logits[:, None], count / M, mean[:, :3]], dim=1).transpose(2, 3)  # [B, 5, D, P]
            with torch.autocast(features.device.type, dtype=amp, enabled=amp is not None):
                refined = self.cost_filter(volume.reshape(B, -1, size, size)).float()  # [B, D, s, s]
            logits = logits + refined.flatten(2).transpose(1, 2)  # [B, P, D]
        if keep:  # for plane_nll
            self._planes = (logits, mean[:, :3], count)
        weights = torch.softmax(logits, dim=-1)[:, None]  # over depths, [B, 1, P, D]
        expected = (weights * disparity).sum(-1)  # [B, 1, P]
        parts = [(weights * mean).sum(-1), expected, weights.amax(-1), (weights * count).sum(-1) / M]
        if profile:  # [B, 4, P, D] -> [B, 4 * D, P]: depth planes of RGB, then of the count
            parts.append(torch.cat([mean[:, :3], count / M], dim=1).transpose(2, 3).flatten(1, 2))
        out = torch.cat(parts, dim=1)
        if planes:  # every point of the sweep: the seeing views' mean RGB, their RGB variance and how many they are
            plane_stats = torch.cat([mean[:, :3], var[:, :3].sum(dim=1, keepdim=True), count], dim=1)
            plane_stats = plane_stats.permute(0, 2, 3, 1)  # [B, P, D, 5]
            return out.view(B, out.shape[1], size, size), expected.view(B, 1, size, size), plane_stats
        return out.view(B, out.shape[1], size, size), expected.view(B, 1, size, size)

    def _gather(self, features, frames, query_poses, depth, nearest=None, projection=None):
        """Every query pixel's point at its ``depth`` ``[B, P]``, seen by the context views: their samples weighted by
        how close each view's ray is to the query ray (a view from the same side sees the same occlusions), and
        the fraction of views that see it: ``[B, C + 1, P]``; with ``occluder_colour`` then the colour every view
        that has the point in its image sees on the line to it, hidden or not, weighted alike: ``[B, C + 4, P]``.
        Second, for the views ``nearest`` ``[B, K]`` (indices; or None): each one's RGB there and how much it sees
        the point, ``[B, K, 4, P]`` (None without). ``projection``: :meth:`_project` at the depth's size, if made."""
        B, M = features.shape[:2]
        rays, origin, slope = projection or self._project(frames, query_poses, int(math.isqrt(depth.shape[1])))
        cam = origin[:, :, None] + slope * depth[:, None, :, None]  # [B, M, P, 3]
        raw = self._sample(features, cam[:, :, :, None])
        samples, seen, _ = self._seen(raw, cam[:, :, :, None])
        samples, seen = samples.squeeze(-1), seen.squeeze(-1)  # [B, M, C, P], [B, M, 1, P]
        # cosine between the query ray and the ray from each context camera to the point
        c_pos = frames[0]
        points = query_poses[:, None, :3] + rays * depth[..., None]  # [B, P, 3]
        to_point = F.normalize(points[:, None] - c_pos[:, :, None], dim=-1)  # [B, M, P, 3]
        cos = (to_point * F.normalize(rays, dim=-1)[:, None]).sum(-1)  # [B, M, P]
        logits = self.log_view_sharpness.exp() * cos[:, :, None] + torch.log(seen.clamp(min=1e-6))
        if self.consensus:  # a view whose sample disagrees with the others' mean is likely occluded there
            plain = (samples * seen).sum(dim=1, keepdim=True) / seen.sum(dim=1, keepdim=True).clamp(min=1)
            logits = logits - self.log_consensus.exp() * (samples[:, :, :3] - plain[:, :, :3]).pow(2).sum(2, True)
        w = torch.softmax(logits, dim=1)  # over views
        colour = (w * samples).sum(dim=1)  # [B, C, P] (samples hold C channels: _seen)
        out = [colour, seen.sum(dim=1) / M]
        if self.occluder_colour:
            inside = raw[:, :, -1:, :, 0]  # [B, M, 1, P]: in the view's image, visible or not
            near = self.log_view_sharpness.exp() * cos[:, :, None] + torch.log(inside.clamp(min=1e-6))
            out.append((torch.softmax(near, dim=1) * samples[:, :, :3]).sum(dim=1))
        views = None
        if nearest is not None:
            pick = nearest[:, :, None, None].expand(-1, -1, 4, samples.shape[-1])
            views = torch.cat([samples[:, :, :3], seen], dim=2).gather(1, pick)  # [B, K, 4, P]
        return torch.cat(out, dim=1), views
