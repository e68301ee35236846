"""DRAW generator with ConvLSTM inference and generation cores (the paper's Fig. S2).

At each of the L steps, with generator state h_g from the previous step:

* prior        pi_l = N(. | head_pi(h_g))
* inference    (h_e, c_e) = C_e([x_q, v_q, r, h_g, down(u)], (h_e, c_e));  q_l = N(. | head_q(h_e))
* latent       z_l ~ q_l (training) or pi_l (sampling)
* generation   (h_g, c_g) = C_g([v_q, r, z_l], (h_g, c_g));  u += up(h_g)

and finally mean = sigmoid(conv1x1(u)). The prior of step l is computed from the same h_g in training and
in sampling. Two numerically equivalent computations exist: the *reference* path (concatenate inputs,
one convolution per core per step, full-resolution canvas) and the *fast* path (step-invariant inputs
convolved once, broadcast codes in closed form, unshared cores batched, the canvas kept at grid
resolution as a running sum of generator states). ``fast`` selects it; tests prove them equal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gqn.model.convlstm import ConvLSTMCell, broadcast_conv
from gqn.model.distributions import kl_gaussian, split_gaussian
from gqn.model.geometry import _autocast_dtype
from gqn.model.representation import GRID_SCALE, _check_image_size

CORE_SHARING = ("unshared", "shared", "shared_inference_generation")
CANVAS_KERNELS = (GRID_SCALE, 2 * GRID_SCALE)  # the canvas write: 4x4 blocks side by side, or 8x8 overlapping


def grid_coordinates(grid: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """``[1, 2, G, G]``: y and x in [-1, 1] over a ``grid`` x ``grid`` latent grid (on ``like``'s device and dtype)."""
    kw = {} if like is None else {"device": like.device, "dtype": like.dtype}
    return torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, grid, **kw)] * 2, indexing="ij"))[None]


class ViewAttention(nn.Module):
    """Attention over the context views' patches (Rosenbaum et al. 2018), read once per DRAW step.

    Every context patch (a position of a view's tower output, which carries that view's pose) gives a key and
    a value, together with its grid position. Every position of the latent grid asks a query made of the query
    pose, its own grid position and the generator state ``h_g`` of the previous step, and reads
    ``value_channels`` channels: multi-head dot-product attention over all ``M x G x G`` patches.
    """

    def __init__(self, patch_channels: int, hidden_channels: int, pose_dim: int, grid: int, key_channels: int = 32,
                 value_channels: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.key_channels, self.value_channels = heads, key_channels, value_channels
        width = max(key_channels, 64)
        # no bias on the last key layer: a constant added to every key leaves the softmax unchanged
        self.key = nn.Sequential(nn.Linear(patch_channels + 2, width), nn.ReLU(),
                                 nn.Linear(width, key_channels, bias=False))
        self.value = nn.Linear(patch_channels + 2, value_channels)
        self.query_pose = nn.Sequential(  # step-invariant part of the query: query pose and grid position
            nn.Conv2d(pose_dim + 2, width, 1), nn.ReLU(), nn.Conv2d(width, key_channels, 1)
        )
        self.query_state = nn.Conv2d(hidden_channels, key_channels, 1, bias=False)  # from h_g, per step

    def memory(self, views: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys ``[B, heads, M*G*G, dk]`` and values ``[B, heads, M*G*G, dv]`` of views ``[B, M, C, G, G]``."""
        B, M, C, G, _ = views.shape
        patches = torch.cat([views, coords[:, None].expand(B, M, -1, -1, -1)], dim=2)  # [B, M, C+2, G, G]
        patches = patches.movedim(2, -1).reshape(B, M * G * G, C + 2)
        keys = self.key(patches).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        values = self.value(patches).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        return keys, values

    def static_query(self, query_poses: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """The step-invariant part of the queries ``[B, dk, G, G]``."""
        B, G = query_poses.shape[0], coords.shape[-1]
        v = query_poses[:, :, None, None].expand(-1, -1, G, G)
        return self.query_pose(torch.cat([v, coords.expand(B, -1, -1, -1)], dim=1))

    def read(self, memory, static_query: torch.Tensor, h_g: torch.Tensor | None) -> torch.Tensor:
        """The attention summary ``[B, dv, G, G]`` for generator state ``h_g`` (None: the zero initial state)."""
        keys, values = memory
        q = static_query if h_g is None else static_query + self.query_state(h_g)
        B, _, G, _ = q.shape
        q = q.flatten(2).transpose(1, 2).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, heads, G*G, dk/h]
        out = F.scaled_dot_product_attention(q, keys, values)  # [B, heads, G*G, dv/h]
        return out.transpose(1, 2).reshape(B, G, G, self.value_channels).movedim(-1, 1)


def check_mix_widths(widths) -> list[int]:
    """``model.geometry_mix_widths`` as a list, or a one-line ValueError: a non-empty list of integers >= 1."""
    if (not isinstance(widths, Sequence) or isinstance(widths, str) or not len(widths)
            or any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths)):
        raise ValueError(f"model.geometry_mix_widths must be a non-empty list of integers >= 1 (the blending "
                         f"network's hidden layers), got {widths}")
    return list(widths)


class DRAWGenerator(nn.Module):
    def __init__(
        self,
        r_channels: int,
        image_size: int = 64,
        image_channels: int = 3,
        pose_dim: int = 7,
        hidden_channels: int = 128,
        latent_channels: int = 3,
        canvas_channels: int = 128,
        num_steps: int = 12,
        kernel_size: int = 5,
        head_kernel_size: int = 5,
        core_sharing: str = "unshared",
        fast: bool = True,
        checkpoint_steps: bool = False,
        inference_kernel_size: int | None = None,
        grid_coords: bool = False,
        attention: dict | None = None,
        patch_channels: int | None = None,
        geometry_channels: int = 0,
        geometry_core_channels: int = 32,
        geometry_mix_kernel: int = 1,
        canvas_kernel: int = GRID_SCALE,
        geometry_copies: Sequence[int] = (0,),
        geometry_copy_logits: Sequence[float] | None = None,
        geometry_match: float = 0.0,
        geometry_mix_widths: Sequence[int] = (32,),
        geometry_resample: Sequence[int] | None = None,
        step_kernel_size: int | None = None,
        dilation: int = 1,
    ):
        """``step_kernel_size``: the generation core's kernel for the inputs that change every DRAW step (its
        state h, the latent z, the attention read); None: ``kernel_size``, which the step-invariant inputs (v, r,
        the geometric read) keep. ``dilation``: the generation core's dilation (every kernel's taps ``dilation``
        grid positions apart; less than the grid). With ``core_sharing="shared_inference_generation"`` the one core
        takes both.
        ``canvas_kernel``: the kernel of the transposed convolution that writes each step's state onto the
        full-resolution canvas (stride 4): 4 (the paper) gives every latent-grid position its own 4x4 block, 8
        overlapping 8x8 blocks (each pixel mixes its 2x2 nearest positions, no block edges).
        ``attention``: ``{key_channels, value_channels, heads}`` to read the context views' patches at every
        step through :class:`ViewAttention` (the encoder's per-view outputs, ``patch_channels`` each; default
        ``r_channels``). ``geometry_channels``: the channels of a full-resolution map of the query view (a
        :class:`gqn.model.geometry.PlaneSweep` read) that both cores take as a step-invariant input (each 4x4
        block of it mapped to ``geometry_core_channels`` channels of the latent grid) and the observation takes
        beside the canvas, through a small network whose first layer has ``geometry_mix_kernel`` x that kernel.
        ``geometry_copies``: the colours of that map the observation may copy per pixel, as the channels where each
        one's RGB starts (:attr:`gqn.model.geometry.PlaneSweep.copy_at`; the first is the found colour, at 0). A
        softmax weighs them against the canvas, from
        ``geometry_copy_logits`` (one per colour; default 0 each, the canvas's logit is 0). ``geometry_match`` (> 0;
        0: off): each colour's logit also falls by this (learned) times its squared distance from the colour the
        canvas draws there, so of the colours the read offers (a depth plane each, with ``plane_views``) the one the
        generator's own guess is closest to weighs most. ``geometry_mix_widths``: the hidden layers of that blending
        network (their channels, each followed by a ReLU; the layers after the first are 1x1).
        ``geometry_resample``: ``(image_at, positions_at, first, depths)``
        (:attr:`gqn.model.geometry.PlaneSweep.resample`): the colours to copy ``first .. first + depths - 1`` are one
        view's samples at each depth plane; the render takes, for their summed weight, one sample of that view (its
        RGB at ``image_at``) at the weighted mean of their positions (``positions_at``, x and y per plane) instead
        of their weighted colours."""
        super().__init__()
        if num_steps < 1:
            raise ValueError(f"num_steps (L) must be >= 1, got {num_steps}")
        if core_sharing not in CORE_SHARING:
            raise ValueError(f"core_sharing must be one of {CORE_SHARING}, got {core_sharing!r}")
        _check_image_size(image_size)
        if canvas_kernel not in CANVAS_KERNELS:
            raise ValueError(f"canvas_kernel must be 4 (the paper's 4x4 blocks) or 8 (overlapping 8x8 blocks), "
                             f"got {canvas_kernel}")
        self.image_size, self.grid = image_size, image_size // GRID_SCALE
        self.num_steps, self.core_sharing = num_steps, core_sharing
        self.hidden_channels, self.latent_channels = hidden_channels, latent_channels
        self.fast, self.checkpoint_steps = fast, checkpoint_steps
        # shared_inference_generation has one core for both, with kernel_size
        inference_kernel_size = kernel_size if inference_kernel_size is None else inference_kernel_size
        self.grid_coords = grid_coords
        # Grid coordinates (CoordConv): two constant channels, y and x in [-1, 1] over the latent grid, so
        # that the cores know where on the image each position is instead of inferring it from padding.
        self.register_buffer("coords", grid_coordinates(self.grid), persistent=False)  # [1, 2, G, G]

        x_channels = image_channels * GRID_SCALE**2  # query image by space-to-depth, no information lost
        inf = {"x": x_channels, "v": pose_dim, "r": r_channels, "h_g": hidden_channels, "u": hidden_channels}
        gen = {"v": pose_dim, "r": r_channels, "z": latent_channels}
        if grid_coords:
            inf["coords"] = gen["coords"] = 2
        self.attention = None
        if attention:
            self.attention = ViewAttention(patch_channels or r_channels, hidden_channels, pose_dim, self.grid,
                                           **attention)
            inf["a"] = gen["a"] = self.attention.value_channels  # the attention read: a per-step input
        self.geometry_channels = geometry_channels
        self.geometry_in = None
        if geometry_channels:  # the read of each 4x4 block of pixels, summarised for the latent grid
            self.geometry_in = nn.Conv2d(geometry_channels, geometry_core_channels, GRID_SCALE, stride=GRID_SCALE)
            inf["g"] = gen["g"] = geometry_core_channels
        n_cores = num_steps if core_sharing == "unshared" else 1
        if dilation >= self.grid:  # every tap but the centre would read only the zero padding
            raise ValueError(f"model.dilation must be less than the {self.grid}x{self.grid} latent grid of "
                             f"{image_size} px images, got {dilation}")
        gen_kernels = None if step_kernel_size is None else dict.fromkeys(("h", "z", "a"), step_kernel_size)
        gen_core = {"kernel_sizes": gen_kernels, "dilation": dilation}
        if core_sharing == "shared_inference_generation":
            cell = ConvLSTMCell({**inf, "z": latent_channels}, hidden_channels, kernel_size, **gen_core)
            self.inference_cores = nn.ModuleList([cell])
            self.generation_cores = nn.ModuleList([cell])  # the very same weights
        else:
            self.inference_cores = nn.ModuleList(
                ConvLSTMCell(inf, hidden_channels, inference_kernel_size) for _ in range(n_cores)
            )
            self.generation_cores = nn.ModuleList(
                ConvLSTMCell(gen, hidden_channels, kernel_size, **gen_core) for _ in range(n_cores)
            )
        pad = head_kernel_size // 2
        self.prior_head = nn.Conv2d(hidden_channels, 2 * latent_channels, head_kernel_size, padding=pad)
        self.posterior_head = nn.Conv2d(hidden_channels, 2 * latent_channels, head_kernel_size, padding=pad)
        self.canvas_up = nn.ConvTranspose2d(hidden_channels, canvas_channels, canvas_kernel, stride=GRID_SCALE,
                                            padding=(canvas_kernel - GRID_SCALE) // 2)
        self.canvas_down = nn.Conv2d(canvas_channels, hidden_channels, GRID_SCALE, stride=GRID_SCALE)
        self.observation = nn.Conv2d(canvas_channels, image_channels, 1)
        self.geometry_skip = None
        if not isinstance(geometry_copies, Sequence) or isinstance(geometry_copies, str | bytes):
            raise ValueError(f"geometry_copies must be the channels where each colour to copy starts (a sequence, "
                             f"the found colour's 0 first), got {geometry_copies!r}")
        geometry_copies = tuple(int(at) for at in geometry_copies)
        if geometry_channels and (not geometry_copies or geometry_copies[0] != 0 or any(
                not 0 <= at <= geometry_channels - image_channels for at in geometry_copies)):
            raise ValueError(f"geometry_copies must name where each colour to copy starts in the geometry's "
                             f"{geometry_channels} channels, the found colour's (0) first, got {geometry_copies}")
        if geometry_match < 0 or (geometry_match and not geometry_channels):
            raise ValueError(f"model.geometry_match must be >= 0 (0: off) and needs a geometric read "
                             f"(model/geometry=plane_sweep), got {geometry_match}")
        #: the learned weight of each copy's squared distance from the drawn colour in its logit (None: off)
        self.log_copy_match = nn.Parameter(torch.tensor(math.log(geometry_match))) if geometry_match else None
        #: where each colour the observation may copy starts in the geometric read
        self.copy_at = geometry_copies
        self.resample = tuple(int(i) for i in geometry_resample) if geometry_resample is not None else None
        if self.resample is not None and (
                len(self.resample) != 4 or self.resample[2] < 1 or self.resample[3] < 2
                or self.resample[2] + self.resample[3] > len(geometry_copies)
                or self.resample[0] + 3 > geometry_channels
                or self.resample[1] + 2 * self.resample[3] > geometry_channels):
            raise ValueError(f"geometry_resample must be (image_at, positions_at, first, depths) with the planes "
                             f"among the {len(geometry_copies)} colours to copy and the channels in the "
                             f"{geometry_channels} of the read, got {geometry_resample}")
        self.geometry_copies = len(geometry_copies)
        # every copy's channels, in order: one index_select reads them all (a slice per copy would, in the backward,
        # fill and add a zero tensor of the whole read for each of them)
        self.register_buffer("_copy_channels", torch.tensor(
            [at + i for at in geometry_copies for i in range(image_channels)], dtype=torch.long), persistent=False)
        if self.resample is not None:  # how much of each resampled plane's sample lies inside the view (after its RGB)
            first, depths = self.resample[2:]
            self.register_buffer("_plane_inside", torch.tensor(
                [geometry_copies[first + d] + image_channels for d in range(depths)], dtype=torch.long),
                persistent=False)
        if geometry_channels:  # per pixel, canvas and geometric read together decide what to copy from the context
            widths = check_mix_widths(geometry_mix_widths)
            k = geometry_mix_kernel
            layers: list[nn.Module] = []
            for i, width in enumerate(widths):  # the first layer's kernel k, then 1x1: checkpoints of one layer load
                layers += [nn.Conv2d(widths[i - 1] if i else canvas_channels + geometry_channels, width,
                                     1 if i else k, padding=0 if i else k // 2), nn.ReLU()]
            self.geometry_skip = nn.Sequential(*layers, nn.Conv2d(widths[-1], self.geometry_copies + image_channels, 1))
            if geometry_copy_logits is not None:
                if len(geometry_copy_logits) != self.geometry_copies:
                    raise ValueError(f"geometry_copy_logits needs one logit per colour to copy "
                                     f"({self.geometry_copies}), got {len(geometry_copy_logits)}")
                with torch.no_grad():
                    self.geometry_skip[-1].bias[:self.geometry_copies] += torch.tensor(geometry_copy_logits)

    # ------------------------------------------------------------------ helpers
    def _core(self, cores: nn.ModuleList, step: int) -> ConvLSTMCell:
        return cores[step if len(cores) > 1 else 0]

    def _noise(self, batch: int, like: torch.Tensor, generator: torch.Generator | None) -> list[torch.Tensor]:
        shape = (batch, self.latent_channels, self.grid, self.grid)
        dtype = torch.promote_types(like.dtype, torch.float32)  # fp32 noise under bf16 autocast: same draws
        # generator=None passed explicitly breaks torch.compile with a dynamic batch size: pass it only if given
        seeded = {"generator": generator} if generator is not None else {}
        return [torch.randn(shape, device=like.device, dtype=dtype, **seeded) for _ in range(self.num_steps)]

    def _check(self, query_images, query_poses, representation) -> None:
        B = query_poses.shape[0]
        if query_poses.dim() != 2:
            raise ValueError(f"query_poses must be [B, pose_dim], got {tuple(query_poses.shape)}")
        if representation.dim() != 4 or representation.shape[0] != B or representation.shape[-1] not in (
            1,
            self.grid,
        ):
            raise ValueError(
                f"representation must be [B={B}, C, s, s] with s in (1, {self.grid}), "
                f"got {tuple(representation.shape)}"
            )
        if query_images is not None and tuple(query_images.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(
                f"query_images are {tuple(query_images.shape[-2:])} but the model renders "
                f"{self.image_size}x{self.image_size}; set data.image_size / model.image_size to match"
            )

    def observe(self, canvas: torch.Tensor, geometry: torch.Tensor | None = None,
                parts: bool = False, read: torch.Tensor | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        """Canvas ``[B, canvas, H, W]`` (and the geometric read ``[B, G, H, W]``) -> mean image ``[B, 3, H, W]``
        in (0, 1); with ``parts``, a dict of ``mean`` and, with a geometric read, ``drawn`` (the canvas's own colour
        that the blend weighs against the copies, ``[B, 3, H, W]``), ``copies`` (the read's colours the blend weighs,
        ``[B, n, 3, H, W]``) and ``weights`` (the copies' then drawn's, ``[B, n + 1, H, W]``, summing to 1).

        With a geometric read, each pixel blends the context colour it found (its first channels) with the
        canvas's own: ``a * found + (1 - a) * sigmoid(obs(canvas) + residual)``, where ``a`` and the residual are
        computed per pixel from the canvas and the read (image-based rendering where the views saw the point,
        the generator's guess where they did not); with more colours to copy (``copy_at``), a per-pixel softmax
        weighs every one of them and the canvas's. ``read``: the same read as the geometry module gave it (fp32),
        where the colours to copy are taken when ``geometry`` is its copy in the autocast's dtype (default: geometry).
        """
        logits = self.observation(canvas)
        if self.geometry_skip is None:
            return {"mean": torch.sigmoid(logits)} if parts else torch.sigmoid(logits)
        c = self.observation.out_channels
        read, geometry = geometry if read is None else read, geometry.to(canvas.dtype)
        # the first layer's conv of the canvas and the read concatenated, as the sum of the convs of its two halves: no
        # copy of the read into a concatenation, forward or backward (session 44, with the single cast of the read in
        # forward: a bf16 step 0.93x the time on an EPYC with bf16 units, fp32 level)
        first, cc = self.geometry_skip[0], canvas.shape[1]
        mix = self.geometry_skip[1:](F.conv2d(canvas, first.weight[:, :cc], first.bias, padding=first.padding)
                                     + F.conv2d(geometry, first.weight[:, cc:], padding=first.padding))
        k = self.geometry_copies
        drawn = torch.sigmoid(logits + mix[:, k:])
        copy = mix[:, :k]
        colours = read.index_select(1, self._copy_channels).unflatten(1, (k, c))  # [B, k, c, H, W]
        if self.log_copy_match is not None:  # the colours nearest the drawn one weigh more
            copy = copy - self.log_copy_match.exp() * (colours - drawn[:, None]).pow(2).sum(dim=2)
        if k == 1:  # one copy: its weight a sigmoid, the canvas's the rest
            alpha = torch.sigmoid(copy)
            w = torch.cat([alpha, 1 - alpha], dim=1)
        else:  # the found colour, the others (the nearest view's, ...), the canvas: softmax over (mix_0 .. mix_k-1, 0)
            w = torch.softmax(torch.cat([copy, torch.zeros_like(mix[:, :1])], dim=1), dim=1)
            if self.resample is not None:  # that view's planes: one sample between them, not their colours
                colours = torch.cat([colours[:, :self.resample[2]], self._resample(read, w).to(colours.dtype)[:, None],
                                     colours[:, sum(self.resample[2:]):]], dim=1)
                first, depths = self.resample[2:]
                w = torch.cat([w[:, :first], w[:, first:first + depths].sum(1, keepdim=True), w[:, first + depths:]], 1)
                k = k - depths + 1
        mean = (w[:, :k, None] * colours).sum(dim=1) + w[:, k:] * drawn
        if not parts:
            return mean
        return {"mean": mean, "drawn": drawn, "weights": w, "copies": colours}

    def _resample(self, read: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``geometry_resample``: the view's RGB ``[B, 3, H, W]`` sampled at the mean of its planes' positions in the
        read ``[B, G, H, W]`` weighted by their blend weights (of ``w`` ``[B, k + 1, H, W]``) times how much of each
        plane's sample lies inside the view, and scaled by that share of their weight (a plane outside the image adds
        black, as its copy does, not a far-off position to the mean); in fp32."""
        image_at, at, first, depths = self.resample
        planes = w[:, first:first + depths].float()  # [B, D, H, W]
        inside = planes * read.index_select(1, self._plane_inside).float()
        share = inside.sum(1, keepdim=True)
        positions = read[:, at:at + 2 * depths].float().unflatten(1, (depths, 2))  # [B, D, 2, H, W]
        grid = (inside[:, :, None] * positions).sum(1) / share.clamp(min=1e-12)  # [B, 2, H, W]
        image = read[:, image_at:image_at + 3].float()
        with torch.autocast(read.device.type, enabled=False):  # RGB and how much of the sample lies inside
            sample = F.grid_sample(torch.cat([image, torch.ones_like(image[:, :1])], dim=1), grid.permute(0, 2, 3, 1),
                                   mode="bilinear", padding_mode="zeros", align_corners=False)
        rgb, inside = sample.split([3, 1], dim=1)
        # the colour inside, times the share of the planes' weight inside: as the planes' copies, black outside
        return rgb / inside.clamp(min=1e-6) * share / planes.sum(1, keepdim=True).clamp(min=1e-12)

    # ------------------------------------------------------------------ API
    def forward(
        self,
        query_poses: torch.Tensor,
        representation: torch.Tensor,
        query_images: torch.Tensor | None = None,
        sample_prior: bool = True,
        generator: torch.Generator | None = None,
        return_sequence: bool = False,
        views: torch.Tensor | None = None,
        geometry: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the L DRAW steps.

        ``views`` ``[B, M, C, G, G]``: the context views' encoder outputs, which an attention generator reads.
        ``geometry`` ``[B, geometry_channels, H, W]``: the geometric read of the query view, for a generator
        built with ``geometry_channels``.

        With ``query_images`` the latents come from the posterior and ``kl`` ``[B, L]`` is returned;
        without, from the prior (a sample, or its mean when ``sample_prior`` is False). Returns
        ``mean`` ``[B, 3, H, W]``, optionally ``kl`` and ``sequence`` ``[B, L, 3, H, W]`` (the image after
        each step); with a geometric read also ``drawn`` ``[B, 3, H, W]``, the canvas's own colour in the blend, and
        the blend's ``copies`` ``[B, n, 3, H, W]`` and ``weights`` ``[B, n + 1, H, W]`` (:meth:`observe`).
        """
        self._check(query_images, query_poses, representation)
        if (self.attention is not None) != (views is not None):
            raise ValueError("an attention generator needs the context views (views=[B, M, C, G, G]) and only it "
                             "takes them; encode with GQN.encode")
        if bool(self.geometry_channels) != (geometry is not None):
            raise ValueError("a generator built with geometry_channels needs the geometric read (geometry=[B, G, H, "
                             "W]) and only it takes one; render through GQN")
        if geometry is not None and (geometry.shape[0] != query_poses.shape[0]
                                     or tuple(geometry.shape[1:]) != (self.geometry_channels, *(self.image_size,) * 2)):
            raise ValueError(f"geometry must be [{query_poses.shape[0]}, {self.geometry_channels}, {self.image_size}, "
                             f"{self.image_size}], got {tuple(geometry.shape)}")
        read = geometry
        if geometry is not None:
            # the read in the autocast's dtype (if any) once, for the convs that take it: else each casts its own copy,
            # forward and backward. With the weights channels-last (module.channels_last) in that layout too, in the
            # same copy. The colours to copy come from the read as it is (fp32; observe)
            dtype = _autocast_dtype(geometry.device.type) or geometry.dtype
            channels_last = self.geometry_in.weight.is_contiguous(memory_format=torch.channels_last)
            geometry = geometry.to(dtype, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        noise = self._noise(query_poses.shape[0], representation, generator)
        attend = self._attention_reader(query_poses, views)
        run = self._run_fast if self.fast else self._run_reference
        return run(query_poses, representation, query_images, noise, sample_prior, return_sequence, attend, geometry,
                   read)

    def _attention_reader(self, query_poses, views):
        """``h_g -> [B, dv, G, G]`` (None for the zero initial state), or None without attention."""
        if self.attention is None:
            return None
        memory = self.attention.memory(views, self.coords)  # keys and values once per forward
        static = self.attention.static_query(query_poses, self.coords)
        return lambda h_g: self.attention.read(memory, static, h_g)

    def _latent(self, params, noise, use_sample):
        mean, std = split_gaussian(params)
        return (mean + std * noise if use_sample else mean), mean, std

    # ------------------------------------------------------------------ reference path
    def _run_reference(self, v, r, x, noise, sample_prior, return_sequence, attend=None, geo=None, read=None):
        B, G = v.shape[0], self.grid
        v_grid = v[:, :, None, None].expand(-1, -1, G, G)
        r_grid = r.expand(-1, -1, G, G) if r.shape[-1] == 1 else r
        x_s2d = F.pixel_unshuffle(x, GRID_SCALE) if x is not None else None
        coords = self.coords.expand(B, -1, -1, -1)
        g = {} if geo is None else {"g": self.geometry_in(geo.to(r.dtype))}
        zeros = r.new_zeros(B, self.hidden_channels, G, G)
        h_g, c_g, h_e, c_e = zeros, zeros, zeros, zeros
        u = r.new_zeros(B, self.canvas_up.out_channels, self.image_size, self.image_size)
        kls, seq = [], []

        def fill(cell, inputs):  # groups a shared inference/generation cell does not get are zero
            return {
                n: inputs[n] if n in inputs else r.new_zeros(B, c, G, G) for n, c in cell.input_channels.items()
            }

        for step in range(self.num_steps):
            p_mean, p_std = split_gaussian(self.prior_head(h_g))
            a = {} if attend is None else {"a": attend(h_g)}
            if x is not None:
                cell = self._core(self.inference_cores, step)
                inputs = {"x": x_s2d, "v": v_grid, "r": r_grid, "h_g": h_g, "u": self.canvas_down(u), "coords": coords,
                          **a, **g}
                h_e, c_e = cell(fill(cell, inputs), (h_e, c_e))
                z, q_mean, q_std = self._latent(self.posterior_head(h_e), noise[step], True)
                kls.append(kl_gaussian(q_mean, q_std, p_mean, p_std).flatten(1).sum(1))
            else:
                z = p_mean + p_std * noise[step] if sample_prior else p_mean
            cell = self._core(self.generation_cores, step)
            h_g, c_g = cell(fill(cell, {"v": v_grid, "r": r_grid, "z": z, "coords": coords, **a, **g}), (h_g, c_g))
            u = u + self.canvas_up(h_g)
            if return_sequence:
                seq.append(self.observe(u, geo, read=read))
        return self._outputs(self.observe(u, geo, parts=True, read=read), kls, seq)

    def _outputs(self, parts, kls, seq):
        out = dict(parts)
        if kls:
            out["kl"] = torch.stack(kls, dim=1)
        if seq:
            out["sequence"] = torch.stack(seq, dim=1)
        return out

    # ------------------------------------------------------------------ fast path
    def _static_gates(self, cores: nn.ModuleList, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Gate contributions of step-invariant inputs, one tensor per core, computed once per forward.

        ``inputs`` maps a group name to ``[B, C]`` (a code constant over the grid: closed form) or
        ``[B, C, G, G]``. Codes of unshared cores are batched in one matrix product; grid inputs of
        unshared cores are convolved per core (stacking their weights measured slower on CPU).
        """
        per_core = [None] * len(cores)
        for name, value in inputs.items():
            if value.dim() == 2:
                w = torch.cat([c.weight[name] for c in cores]) if len(cores) > 1 else cores[0].weight[name]
                parts = broadcast_conv(value, w, self.grid, cores[0].dilation).chunk(len(cores), dim=1)
            else:
                parts = [c.conv(value, [name]) for c in cores]
            per_core = [p if acc is None else acc + p for acc, p in zip(per_core, parts)]
        return per_core

    def _canvas_maps(self):
        """down(up(h)) is a linear map of the grid: return its kernel (1x1 for the paper's non-overlapping 4x4
        blocks, 3x3 for overlapping 8x8 ones; applied with zero padding) and the per-step bias."""
        w_down, w_up = self.canvas_down.weight, self.canvas_up.weight  # [h, c, 4, 4], [h, c, k, k]
        step_bias = torch.einsum("ocab,c->o", w_down, self.canvas_up.bias)  # added once per step
        if w_up.shape[-1] == GRID_SCALE:
            return torch.einsum("ocab,kcab->ok", w_down, w_up)[:, :, None, None], step_bias  # [h_out, h_in, 1, 1]
        # Overlapping blocks: push a unit impulse per input channel, at the centre of a 3x3 grid, through up()
        # and down() without biases; the response at grid offset e is the kernel at 2 - e (a correlation).
        n = w_up.shape[0]
        impulse = w_up.new_zeros(n, n, 3, 3)
        impulse[torch.arange(n), torch.arange(n), 1, 1] = 1
        up = F.conv_transpose2d(impulse, w_up, stride=GRID_SCALE, padding=self.canvas_up.padding)
        response = F.conv2d(up, w_down, stride=GRID_SCALE)  # [h_in, h_out, 3, 3]
        return response.transpose(0, 1).flip(-1, -2), step_bias

    def _run_fast(self, v, r, x, noise, sample_prior, return_sequence, attend=None, geo=None, read=None):
        B, G = v.shape[0], self.grid
        r_in = r.flatten(1) if r.shape[-1] == 1 else r  # [B, C] codes take the closed form
        extra = {"coords": self.coords} if self.grid_coords else {}  # batch 1: broadcast in the sum
        if geo is not None:
            extra["g"] = self.geometry_in(geo.to(r.dtype))
        gen_static = self._static_gates(self.generation_cores, {"v": v, "r": r_in, **extra})
        zeros = r.new_zeros(B, self.hidden_channels, G, G)
        h_g, c_g, h_e, c_e = zeros, zeros, zeros, zeros
        h_sum = zeros  # sum of generator states so far: the canvas is up(h_sum) + steps * up.bias
        kls, seq = [], []
        if x is not None:
            inf_static = self._static_gates(
                self.inference_cores, {"x": F.pixel_unshuffle(x, GRID_SCALE), "v": v, "r": r_in, **extra}
            )
            canvas_matrix, canvas_step_bias = self._canvas_maps()

        def step_fn(step, h_g, c_g, h_e, c_e, h_sum, eps):
            p_mean, p_std = split_gaussian(self.prior_head(h_g))
            kl = None
            # the attention read of this step (from the previous generator state), an input of both cores
            a = [] if attend is None else [attend(h_g if step else None)]
            a_name = ["a"] if a else []
            if x is not None:
                cell = self._core(self.inference_cores, step)
                static = inf_static[step if len(inf_static) > 1 else 0]
                if step == 0:  # zero states; the empty canvas seen through down() is its bias (closed form)
                    bias = self.canvas_down.bias[None].expand(B, -1)
                    gates = static + cell.conv_broadcast(bias, "u", self.grid)
                    if a:
                        gates = gates + cell.conv(a[0], a_name)
                else:
                    u_down = F.conv2d(h_sum, canvas_matrix, padding=canvas_matrix.shape[-1] // 2) + (
                        step * canvas_step_bias + self.canvas_down.bias
                    )[None, :, None, None]
                    gates = static + cell.conv(torch.cat([h_g, u_down, h_e, *a], dim=1), ["h_g", "u", "h", *a_name])
                h_e, c_e = cell.update(gates, c_e)
                z, q_mean, q_std = self._latent(self.posterior_head(h_e), eps, True)
                kl = kl_gaussian(q_mean, q_std, p_mean, p_std).flatten(1).sum(1)
            else:
                z = p_mean + p_std * eps if sample_prior else p_mean
            cell = self._core(self.generation_cores, step)
            if step == 0:  # the initial generator state is zero: convolve the latent alone
                gates = gen_static[0] + cell.conv(torch.cat([z, *a], dim=1), ["z", *a_name])
            else:
                gates = gen_static[step if len(gen_static) > 1 else 0] + cell.conv(
                    torch.cat([z, h_g, *a], dim=1), ["z", "h", *a_name]
                )
            h_g, c_g = cell.update(gates, c_g)
            return h_g, c_g, h_e, c_e, h_sum + h_g, kl

        for step in range(self.num_steps):
            if self.checkpoint_steps and torch.is_grad_enabled():
                h_g, c_g, h_e, c_e, h_sum, kl = checkpoint(
                    step_fn, step, h_g, c_g, h_e, c_e, h_sum, noise[step], use_reentrant=False
                )
            else:
                h_g, c_g, h_e, c_e, h_sum, kl = step_fn(step, h_g, c_g, h_e, c_e, h_sum, noise[step])
            if kl is not None:
                kls.append(kl)
            if return_sequence:
                seq.append(self.observe(self._canvas(h_sum, step + 1), geo, read=read))
        return self._outputs(self.observe(self._canvas(h_sum, self.num_steps), geo, parts=True, read=read), kls, seq)

    def _canvas(self, h_sum: torch.Tensor, steps: int) -> torch.Tensor:
        """The full-resolution canvas after ``steps`` steps, built from the running state sum."""
        return F.conv_transpose2d(h_sum, self.canvas_up.weight, steps * self.canvas_up.bias, stride=GRID_SCALE,
                                  padding=self.canvas_up.padding)
