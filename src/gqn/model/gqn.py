"""The Generative Query Network: representation network + DRAW generator + ELBO."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gqn.model.distributions import fp32, gaussian_nll
from gqn.model.generator import DRAWGenerator, check_mix_widths, grid_coordinates
from gqn.model.representation import GRID_SCALE, _check_image_size, check_widths


def repeat_scenes(x: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, ...]`` -> ``[B * K, ...]``, each scene's rows next to each other (scene-major)."""
    return x.repeat_interleave(k, dim=0)


def map_views(views, fn):
    """Apply ``fn`` to every tensor of ``views`` (None, a tensor, or a dict of tensors and Nones)."""
    if views is None:
        return None
    if isinstance(views, dict):
        return {key: map_views(value, fn) for key, value in views.items()}
    return fn(views)


class GQN(nn.Module):
    """GQN(encoder, ...): scenes in, -ELBO terms out; ``sample`` renders novel views.

    Tensors follow the batch contract: ``context_images`` ``[B, M, 3, H, W]`` in [0, 1],
    ``context_poses`` ``[B, M, 7]``, ``query_images`` ``[B, 3, H, W]``, ``query_poses`` ``[B, 7]``.
    """

    def __init__(
        self,
        encoder: nn.Module,
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
        geometry: nn.Module | None = None,
        geometry_core_channels: int = 32,
        geometry_mix_kernel: int = 1,
        canvas_kernel: int = 4,
        geometry_match: float = 0.0,
        geometry_mix_widths: Sequence[int] = (32,),
        step_kernel_size: int | None = None,
        dilation: int = 1,
    ):
        """``step_kernel_size``, ``dilation``: the generation core's kernel for the inputs that change every DRAW
        step (None: ``kernel_size``) and its dilation (:class:`DRAWGenerator`).
        ``geometry``: a geometric read of the context views for each query view (``model/geometry=plane_sweep``,
        :class:`gqn.model.geometry.PlaneSweep`) that the generator takes beside r; None: the plain GQN.
        ``geometry_core_channels``: the channels of that read per latent-grid position that the cores take;
        ``geometry_mix_kernel``: the kernel of the per-pixel network that blends the read into the image,
        ``geometry_mix_widths`` its hidden layers' channels;
        ``geometry_match``: with it, each colour the read offers weighs more the nearer it is to the colour the canvas
        draws there (the starting weight of the squared distance, learned; 0: off; :class:`DRAWGenerator`).
        ``canvas_kernel``: 4 (the paper: each latent-grid position writes its own 4x4 block of the canvas) or 8
        (overlapping 8x8 blocks, no block edges in the render)."""
        super().__init__()
        check_widths("model", image_channels=image_channels, pose_dim=pose_dim, hidden_channels=hidden_channels,
                     latent_channels=latent_channels, canvas_channels=canvas_channels, kernel_size=kernel_size,
                     head_kernel_size=head_kernel_size, inference_kernel_size=inference_kernel_size,
                     step_kernel_size=step_kernel_size, dilation=dilation,
                     geometry_core_channels=geometry_core_channels, geometry_mix_kernel=geometry_mix_kernel)
        for name, k in (("kernel_size", kernel_size), ("step_kernel_size", step_kernel_size),
                        ("inference_kernel_size", inference_kernel_size)):
            if k is not None and k % 2 != 1:  # an even kernel would shift the grid by half a position
                raise ValueError(f"model.{name} must be odd (3, 5, ...), got {k}")
        check_mix_widths(geometry_mix_widths)  # also without a read, before anything is built
        if getattr(encoder, "image_size", image_size) != image_size:
            raise ValueError(f"encoder built for {encoder.image_size}px images but model.image_size={image_size}")
        if checkpoint_steps and not fast:  # the reference path has no per-step checkpointing
            raise ValueError("model.checkpoint_steps=true needs model.fast=true (activation checkpointing is "
                             "implemented on the fast DRAW path only)")
        self.image_size, self.pose_dim, self.image_channels = image_size, pose_dim, image_channels
        self.encoder = encoder
        self.geometry = geometry
        if geometry is not None and getattr(geometry, "image_size", image_size) != image_size:
            raise ValueError(f"geometry built for {geometry.image_size}px images but model.image_size={image_size}")
        self.generator = DRAWGenerator(
            r_channels=encoder.out_channels,
            image_size=image_size,
            image_channels=image_channels,
            pose_dim=pose_dim,
            hidden_channels=hidden_channels,
            latent_channels=latent_channels,
            canvas_channels=canvas_channels,
            num_steps=num_steps,
            kernel_size=kernel_size,
            step_kernel_size=step_kernel_size,
            dilation=dilation,
            head_kernel_size=head_kernel_size,
            core_sharing=core_sharing,
            fast=fast,
            checkpoint_steps=checkpoint_steps,
            inference_kernel_size=inference_kernel_size,
            grid_coords=grid_coords,
            attention=getattr(encoder, "attention", None),
            patch_channels=getattr(encoder, "patch_channels", None),
            geometry_channels=0 if geometry is None else geometry.out_channels,
            geometry_copies=getattr(geometry, "copy_at", (0,)),
            geometry_copy_logits=getattr(geometry, "copy_logits", None),
            geometry_core_channels=geometry_core_channels,
            geometry_mix_kernel=geometry_mix_kernel,
            canvas_kernel=canvas_kernel,
            geometry_match=geometry_match,
            geometry_mix_widths=list(geometry_mix_widths),
            geometry_resample=getattr(geometry, "resample", None),
        )

    @property
    def num_steps(self) -> int:
        return self.generator.num_steps

    @contextlib.contextmanager
    def at_image_size(self, size: int):
        """Run the model on ``size`` x ``size`` images inside the block (its weights are size-agnostic: convolutions
        and a read in normalised camera coordinates); the built size is restored on exit, also on an error.
        For ``schedule.coarse_steps`` (training steps on downsampled images). Not for the pyramid encoder, whose
        last convolution spans the whole map of one size."""
        if size == self.image_size:
            yield self
            return
        _check_image_size(size)
        if not getattr(self.encoder, "size_agnostic", True):
            raise ValueError(f"{type(self.encoder).__name__} encoder is built for {self.image_size}px images only")
        gen, enc = self.generator, self.encoder
        saved = (self.image_size, gen.image_size, gen.grid, gen.coords, getattr(enc, "image_size", None),
                 getattr(enc, "out_size", None))
        grid = size // GRID_SCALE
        try:
            self.image_size = gen.image_size = size
            gen.grid = grid
            gen.coords = grid_coordinates(grid, like=saved[3])
            if saved[4] is not None:
                enc.image_size = size
            if saved[5] not in (None, 1):
                enc.out_size = grid
            yield self
        finally:
            self.image_size, gen.image_size, gen.grid, gen.coords = saved[:4]
            if saved[4] is not None:
                enc.image_size = saved[4]
            if saved[5] is not None:
                enc.out_size = saved[5]

    # ------------------------------------------------------------------ representation
    @property
    def keeps_views(self) -> bool:
        """Whether the generator also reads the context views one by one (attention GQN)."""
        return self.generator.attention is not None

    def represent(self, context_images: torch.Tensor, context_poses: torch.Tensor) -> torch.Tensor:
        """Scene representation r ``[B, C, s, s]``: the encoder applied per view, summed over views."""
        return self.encode(context_images, context_poses)[0]

    def encode(self, context_images: torch.Tensor, context_poses: torch.Tensor):
        """``(r, views)``: r ``[B, C, s, s]`` summed over the views and, for an attention GQN, the views' own
        encodings ``[B, M, C, s, s]`` (else None). With a geometric read, ``views`` is a dict: ``patches`` (those
        encodings or None), ``features`` ``[B, M, C', H, W]`` (what the plane sweep samples) and ``poses``."""
        if context_images.dim() != 5 or context_poses.dim() != 3:
            raise ValueError(
                "context_images must be [B, M, C, H, W] and context_poses [B, M, pose_dim]; got "
                f"{tuple(context_images.shape)} and {tuple(context_poses.shape)}"
            )
        B, M, C, H, W = context_images.shape
        if context_poses.shape[:2] != (B, M) or context_poses.shape[2] != self.pose_dim:
            raise ValueError(
                f"context_poses must be [{B}, {M}, {self.pose_dim}], got {tuple(context_poses.shape)}"
            )
        if (C, H, W) != (self.image_channels, self.image_size, self.image_size):
            raise ValueError(
                f"context images are {C}x{H}x{W} but the model expects "
                f"{self.image_channels}x{self.image_size}x{self.image_size}; resize the data "
                "(data.image_size) or build the model for this size (model.image_size)"
            )
        per_view = self.encoder(context_images.flatten(0, 1), context_poses.flatten(0, 1)).unflatten(0, (B, M))
        views = None
        if self.keeps_views:
            views = per_view
            if getattr(self.encoder, "pixel_values", False):  # each patch also carries its own pixels
                pixels = F.pixel_unshuffle(context_images.flatten(0, 1), GRID_SCALE).unflatten(0, (B, M))
                views = torch.cat([per_view, pixels.to(per_view.dtype)], dim=2)
        if self.geometry is not None:
            views = {"patches": views, "features": self.geometry.view_features(context_images, context_poses),
                     "poses": context_poses}
        return per_view.sum(dim=1), views

    def read_geometry(self, query_poses, views) -> torch.Tensor | None:
        """The geometric read ``[B, G, H, W]`` of ``query_poses`` from ``encode``'s views (None without one)."""
        if self.geometry is None:
            return None
        return self.geometry(views["features"], views["poses"], query_poses)

    def generate(self, query_poses, representation, views=None, geometry=None, **kwargs) -> dict[str, torch.Tensor]:
        """Run the generator for ``query_poses`` from ``encode``'s ``(representation, views)``; ``geometry``: the
        geometric read of these query poses if already computed (``forward``'s ``geometry``); ``kwargs`` go to
        :class:`DRAWGenerator` (``query_images``, ``sample_prior``, ``generator``, ``return_sequence``)."""
        if self.geometry is not None and geometry is None:
            geometry = self.read_geometry(query_poses, views)
        if isinstance(views, dict):
            views = views["patches"]
        return self.generator(query_poses, representation, views=views, geometry=geometry, **kwargs)

    # ------------------------------------------------------------------ training
    def forward(
        self,
        context_images: torch.Tensor,
        context_poses: torch.Tensor,
        query_images: torch.Tensor,
        query_poses: torch.Tensor,
        sigma: float | torch.Tensor = 0.7,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """-ELBO terms per query view (nats): ``nll`` [B], ``kl`` [B], ``kl_steps`` [B, L], ``elbo`` [B] (=-ELBO),
        ``bits_per_pixel`` [B], ``mse`` [B], the posterior ``mean`` image [B, 3, H, W] and the scene
        ``representation`` [B, C, s, s] and ``views`` (attention GQN, else None), so that callers can render
        from them without encoding again.

        Several query views per scene: ``query_images`` ``[B, K, 3, H, W]`` and ``query_poses`` ``[B, K, 7]``;
        the context is encoded once, and every output has ``B * K`` rows (scene-major).
        """
        r, views = self.encode(context_images, context_poses)
        if query_images.dim() == 5:  # K query views per scene
            k = query_images.shape[1]
            if query_poses.dim() != 3 or query_poses.shape[1] != k:
                raise ValueError(f"query_poses must be [B, {k}, pose_dim] for query_images "
                                 f"{tuple(query_images.shape)}, got {tuple(query_poses.shape)}")
            r, views = repeat_scenes(r, k), map_views(views, lambda t: repeat_scenes(t, k))
            query_images, query_poses = query_images.flatten(0, 1), query_poses.flatten(0, 1)
        geometry = self.read_geometry(query_poses, views)
        out = self.generate(query_poses, r, views, geometry, query_images=query_images, generator=generator)
        nll = gaussian_nll(query_images, out["mean"], sigma)
        kl = out["kl"].sum(dim=1)
        neg_elbo = nll + kl
        pixels = query_images.shape[-1] * query_images.shape[-2]
        return {
            "elbo": neg_elbo,
            "nll": nll,
            "kl": kl,
            "kl_steps": out["kl"],
            "bits_per_pixel": neg_elbo / (pixels * math.log(2)),
            "mse": (fp32(out["mean"]) - query_images).pow(2).flatten(1).mean(dim=1),
            "mean": out["mean"],
            "representation": r,
            "views": views,
            "geometry": geometry,  # the geometric read of these query poses (None without one)
            "drawn": out.get("drawn"),  # with one: the canvas's own colour that the blend weighs against its copies
            "blend": (out["weights"], out["copies"]) if "weights" in out else None,  # with one: the blend's parts
        }

    # ------------------------------------------------------------------ rendering
    @torch.no_grad()
    def reconstruct(self, context_images, context_poses, query_images, query_poses, generator=None):
        """Posterior reconstruction of the query view (latents inferred from the target image)."""
        r, views = self.encode(context_images, context_poses)
        return self.generate(query_poses, r, views, query_images=query_images, generator=generator)["mean"]

    @torch.no_grad()
    def sample(
        self,
        context_images: torch.Tensor,
        context_poses: torch.Tensor,
        query_poses: torch.Tensor,
        mean: bool = False,
        generator: torch.Generator | None = None,
        return_sequence: bool = False,
    ):
        """Render query views from the prior: a sample, or with ``mean=True`` the prior-mean latents.

        Returns ``[B, 3, H, W]``; with ``return_sequence`` also the images after each DRAW step
        ``[B, L, 3, H, W]``.
        """
        r, views = self.encode(context_images, context_poses)
        return self.render(r, query_poses, mean=mean, generator=generator, return_sequence=return_sequence,
                           views=views)

    @torch.no_grad()
    def render(self, representation, query_poses, mean=False, generator=None, return_sequence=False, views=None,
               geometry=None):
        """Render from a precomputed representation (and, for an attention GQN or a geometric read, ``views``):
        encode the context once, render many poses. A representation of one scene serves a batch of poses.
        ``geometry``: the geometric read of exactly these poses, if ``forward`` computed it already."""
        if representation.shape[0] == 1 and query_poses.shape[0] > 1:
            representation = representation.expand(query_poses.shape[0], -1, -1, -1)
            views = map_views(views, lambda t: t.expand(query_poses.shape[0], *t.shape[1:]))
        out = self.generate(query_poses, representation, views, geometry, sample_prior=not mean,
                            generator=generator, return_sequence=return_sequence)
        return (out["mean"], out["sequence"]) if return_sequence else out["mean"]


def compile_model(model: GQN, backend: str = "inductor") -> GQN:
    """``torch.compile`` the encoder and the generator of ``model`` in place (``nn.Module.compile``).

    Everything that runs them -- the training forward, validation, sampling, rendering, the prior-mean
    loss -- then runs compiled, and the state dict keeps the keys of the eager model (no ``_orig_mod``).
    Here, not in the LightningModule's file, so that gqn-bench's child processes time it without importing
    Lightning (~2.5 s of CPU per child).
    """
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        from gqn.cli import UserError  # here, not at import: the model package stays free of the CLI's imports

        raise UserError(f"module.compile={backend!r} is neither true/false nor a torch.compile backend "
                        "(e.g. inductor, aot_eager)")
    model.encoder.compile(backend=backend)
    model.generator.compile(backend=backend)
    if model.geometry is not None:
        model.geometry.compile(backend=backend)
    return model
