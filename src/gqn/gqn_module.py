"""The LightningModule: -ELBO training with annealed pixel sigma and LR, metrics, sample/render API."""

from __future__ import annotations

import math
import time
from typing import Any

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from gqn import metrics
from gqn.cli import UserError, finite_number
from gqn.model import GQN
from gqn.model.distributions import fp32, gaussian_nll, mixture_nll
from gqn.model.gqn import compile_model
from gqn.model.representation import GRID_SCALE
from gqn.schedules import LinearAnneal, max_time_left


def _plain(cfg):
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def check_schedule(schedule, lines: bool = True) -> None:
    """A ValueError (one line from the CLI) for an LR or pixel sigma that cannot train: LR and sigma must be
    positive numbers (0 would divide by zero in the LR line or the likelihood; a negative LR ascends); with
    ``lines``, the LR line's length (``lr_steps`` >= 1) and sigma's (>= 0), which only training reads (a checkpoint
    loaded for evaluation is not refused for them)."""
    for key, least in (("lr_init", "> 0"), ("lr_final", ">= 0"), ("sigma_init", "> 0"), ("sigma_final", "> 0")):
        value = schedule.get(key)
        if value is None:
            continue
        if not finite_number(value) or (value <= 0 if least == "> 0" else value < 0):
            raise ValueError(f"schedule.{key} must be a number {least}, got {value!r}")
    if not lines:
        return
    steps = schedule.get("lr_steps")  # schedule=fast: ${trainer.max_steps}, which may be -1 (no limit)
    if steps is not None and (not finite_number(steps) or steps < 1):
        raise ValueError(f"schedule.lr_steps must be a number >= 1 (the steps the LR line takes from lr_init to "
                         f"lr_final), got {steps!r}; with trainer.max_steps=-1 (no limit) set schedule.lr_steps=N")
    for key, what in (("sigma_steps", ""), ("lr_warmup_steps", " (the steps the LR warms up over; 0: none)")):
        steps = schedule.get(key)
        if steps is not None and (not finite_number(steps) or steps < 0):
            raise ValueError(f"schedule.{key} must be a number >= 0{what}, got {steps!r}")


def check_coarse(schedule, model) -> None:
    """A ValueError (one line from the CLI) for ``schedule.coarse_steps`` / ``coarse_factor`` the model cannot train
    with: whole numbers, the downsampled size a multiple of the latent grid's 4, a size-agnostic model."""
    steps, factor = schedule.get("coarse_steps", 0), schedule.get("coarse_factor", 2)
    steps = 0 if steps is None else steps
    for key, value, least in (("coarse_steps", steps, 0), ("coarse_factor", factor, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"schedule.{key} must be a whole number >= {least}, got {value!r}")
    if not steps or factor == 1:
        return
    size = model.image_size
    if size % factor or (size // factor) % GRID_SCALE:
        raise ValueError(f"schedule.coarse_factor={factor} cannot downsample {size}px images: {size}/{factor} must be "
                         f"a whole multiple of {GRID_SCALE} (the latent grid's cell); e.g. schedule.coarse_factor=2")
    if not getattr(model.encoder, "size_agnostic", True):
        raise ValueError("schedule.coarse_steps needs a size-agnostic encoder: model/encoder=pyramid ends in a "
                         "convolution over the whole map of one image size (use tower, pool or attention, or "
                         "schedule.coarse_steps=0)")
    if model.generator.checkpoint_steps:
        raise ValueError("schedule.coarse_steps with model.checkpoint_steps=true: the recomputed steps would run at "
                         "the full size; turn one of them off")


def downsample_batch(batch: dict, factor: int) -> dict:
    """A batch with its context and query images averaged over ``factor`` x ``factor`` pixel blocks (a box-filter
    resize; the reader's is PIL's bilinear); poses and everything else as they are."""
    out = dict(batch)
    for key in ("context_images", "query_images"):
        x = batch[key]
        out[key] = F.avg_pool2d(x.flatten(0, -4), factor).unflatten(0, x.shape[:-3])
    return out


def check_loss_weights(weights: dict, model, parts: bool = True, schedule=None) -> None:
    """A ValueError (one line from the CLI) for a loss weight that is not a number >= 0, or (``parts``) one set for
    a part the model lacks (it would be ignored silently: a run that trains something other than what its config
    says). A weight the ``schedule`` group holds (conf/train.yaml reads it from there) is named by that key."""
    def same(a, b) -> bool:  # nan as a value the schedule holds is the same nan
        return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)

    name = {key: f"schedule.{key}" if schedule is not None and schedule.get(key) is not None
            and same(schedule.get(key), value) else f"module.{key}" for key, value in weights.items()}
    for key, value in weights.items():
        if not finite_number(value) or value < 0:
            raise ValueError(f"{name[key]} must be a number >= 0, got {value!r}")
    if not parts:
        return
    geometry = getattr(model, "geometry", None)
    for key, what in (("read_weight", "the geometric read"), ("depth_weight", "the read's depth search"),
                      ("drawn_weight", "the colour the canvas draws beside the read's copies"),
                      ("mixture_weight", "the blend of the read's copies")):
        if weights.get(key) and geometry is None:
            raise ValueError(f"{name[key]}={weights[key]} trains {what}, but the model has none: add "
                             f"model/geometry=plane_sweep or set {name[key]}=0")
    if weights.get("floor_weight") and not getattr(geometry, "floor_grid", 0):
        raise ValueError(f"{name['floor_weight']}={weights['floor_weight']} trains the floor map, but the model has "
                         f"none: set model.geometry.floor_grid (e.g. 16) or "
                         f"{name['floor_weight']}=0")


class GQNModule(L.LightningModule):
    """Holds a :class:`gqn.model.GQN` built from its config (so checkpoints rebuild it on their own).

    Args:
        model: a Hydra config of the GQN (``_target_: gqn.model.GQN`` with a nested encoder).
        optimizer: a partial optimizer config (``_partial_: true``); the module binds the parameters.
        schedule: ``sigma_init, sigma_final, sigma_steps``: pixel sigma as a function of the global step
            (the group's ``lr_*`` keys feed ``optimizer`` and ``lr_scheduler`` in the config, not the module).
        lr_scheduler: a partial LR scheduler config (``_partial_: true``), called with the optimizer and
            stepped after every optimizer step; ``None``: a constant LR.
        sigma_warmup_steps: hold sigma at ``sigma_init`` this long before annealing starts.
        kl_warmup_steps: scale the KL term of the loss from 0 to ``kl_weight`` over this many steps.
        kl_weight: the weight (beta) of the KL term in the training loss; 1 is the ELBO. Metrics always
            report the true -ELBO.
        prior_mean_weight: weight of an auxiliary loss, the pixel NLL (at the same sigma) of the render
            from the prior-mean latents, i.e. of the deterministic render that evaluation scores. 0 trains
            on the ELBO alone (the paper); above 0 each step also runs the generator once from the prior.
        prior_mean_start: the step from which that auxiliary loss applies (before it costs nothing).
        read_weight: weight of an auxiliary loss on the geometric read (``model.geometry``): the squared error
            over 2 sigma^2 (the pixel NLL without its constant) of the colour the plane sweep found for each
            query pixel, where at least half a context view sees that point. It trains the depth scores, the
            visibility test and the lens from every such pixel, not only through the pixels where the generator
            chose to copy that colour. 0: off.
        floor_weight: weight of an auxiliary loss on the floor read (``model.geometry.floor_grid``): the pixel NLL
            (at the same sigma) of the colour it rendered for every query pixel. 0: off.
        depth_weight: weight of an auxiliary loss on the read's depth search (``model.geometry``): how little of its
            depth softmax lies on the planes whose colour, as the context views see it, matches the query image
            (:meth:`gqn.model.geometry.PlaneSweep.plane_nll`, nats summed over the sweep's pixels). 0: off.
        drawn_weight: weight of an auxiliary loss on the colour the generator's canvas draws on its own, which the
            blend weighs against the geometric read's copies (``model.geometry``): its pixel NLL (at the same sigma)
            from the same latents as the ELBO's render. Trained only through the blend, that colour is worth little
            where the blend leans on the copies; this trains it to render the view by itself. 0: off.
        mixture_weight: weight of an auxiliary loss on the blend (``model.geometry``): the NLL of the query image
            under the per-pixel mixture whose components are the read's copies the blend weighs (detached: only their
            weights learn from it), each a Gaussian of ``mixture_sigma``, weighted by their shares of the copies'
            weight (the canvas's own colour and its weight are left to the render's loss). Its gradient on a pixel's
            shares is the shares minus each copy's share of the likelihood there (which copy is nearest the truth),
            where the squared error of the blended render gives a copy's weight a gradient as small as its difference
            from the render. 0: off.
        mixture_sigma: the standard deviation of those components (in pixel values 0..1; small: the copy nearest the
            truth takes the share).
        mixture_gate: count that loss only at pixels where the copies disagree: where the root of their
            share-weighted squared RGB distance from their share-weighted mean exceeds this (pixel values 0..1;
            e.g. 0.1). Where they agree within it (flat walls seen alike by every view), a hedge between them costs
            the render little and the blend's weights are left to the render's loss. 0: every pixel.
        compile: ``torch.compile`` the encoder and the generator in place (``True``: the inductor backend; a
            string names another backend, e.g. ``aot_eager`` traces without generating code). The first
            step of each new input shape pays the compile time; the checkpoint's keys are those of eager.
        channels_last: keep the model's 4-D weights channels-last (NHWC), so that its convolutions take and give
            channels-last tensors (the loader's images already are); the same values, another memory layout. A
            checkpoint loads either way.
        lr_scales: ``{name prefix: factor}``: the parameters whose name (``model.named_parameters()``, e.g.
            ``generator.generation_cores``, ``encoder``, ``geometry``) starts with a prefix train at the optimizer's
            LR times its factor (the longest matching prefix wins; the LR schedule scales every group alike).
            None or empty: one LR for all.
    """

    def __init__(
        self,
        model: Any,
        optimizer: Any,
        schedule: Any,
        lr_scheduler: Any = None,
        sigma_warmup_steps: int = 0,
        kl_warmup_steps: int = 0,
        kl_weight: float = 1.0,
        prior_mean_weight: float = 0.0,
        prior_mean_start: int = 0,
        read_weight: float = 0.0,
        floor_weight: float = 0.0,
        depth_weight: float = 0.0,
        drawn_weight: float = 0.0,
        mixture_weight: float = 0.0,
        mixture_sigma: float = 0.1,
        mixture_gate: float = 0.0,
        compile: bool | str = False,
        channels_last: bool = False,
        lr_scales: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters({"model": _plain(model), "optimizer": _plain(optimizer),
                                   "schedule": _plain(schedule), "lr_scheduler": _plain(lr_scheduler),
                                   "sigma_warmup_steps": sigma_warmup_steps,
                                   "kl_warmup_steps": kl_warmup_steps, "kl_weight": kl_weight,
                                   "prior_mean_weight": prior_mean_weight, "prior_mean_start": prior_mean_start,
                                   "read_weight": read_weight, "floor_weight": floor_weight,
                                   "depth_weight": depth_weight, "drawn_weight": drawn_weight,
                                   "mixture_weight": mixture_weight, "mixture_sigma": mixture_sigma,
                                   "mixture_gate": mixture_gate, "compile": compile,
                                   "channels_last": channels_last, "lr_scales": _plain(lr_scales)})
        self.model: GQN = hydra.utils.instantiate(self.hparams.model)
        check_loss_weights({"kl_weight": kl_weight, "prior_mean_weight": prior_mean_weight,
                            "read_weight": read_weight, "floor_weight": floor_weight,
                            "depth_weight": depth_weight, "drawn_weight": drawn_weight,
                            "mixture_weight": mixture_weight}, self.model,
                           parts=not GQNModule._loading, schedule=self.hparams.schedule)
        if not finite_number(mixture_sigma) or mixture_sigma <= 0:
            raise ValueError(f"module.mixture_sigma must be a number > 0 (a standard deviation in pixel values, e.g. "
                             f"0.1), got {mixture_sigma!r}")
        if not finite_number(mixture_gate) or mixture_gate < 0:
            raise ValueError(f"module.mixture_gate must be a number >= 0 (a colour distance in pixel values, e.g. 0.1; "
                             f"0: every pixel), got {mixture_gate!r}")
        if mixture_gate and not mixture_weight:
            raise ValueError(f"module.mixture_gate={mixture_gate} gates the mixture loss, but it is off: set "
                             f"module.mixture_weight (e.g. 0.1) or module.mixture_gate=0")
        for key, value in (("sigma_warmup_steps", sigma_warmup_steps), ("kl_warmup_steps", kl_warmup_steps)):
            if not GQNModule._loading and (not finite_number(value) or value < 0):
                raise ValueError(f"module.{key} must be a number of steps >= 0, got {value!r}")
        s = self.hparams.schedule
        check_schedule(s, lines=not GQNModule._loading)
        check_coarse(s, self.model)
        self.sigma_schedule = LinearAnneal(s["sigma_init"], s["sigma_final"], s["sigma_steps"], sigma_warmup_steps)
        self.kl_weight = LinearAnneal(0.0, kl_weight, kl_warmup_steps) if kl_warmup_steps else (lambda step: kl_weight)
        self.prior_mean_weight = LinearAnneal(0.0, prior_mean_weight, 0, delay=prior_mean_start)
        if not GQNModule._loading:  # module.lr_scales checked now, not when training starts (evaluation needs none)
            self.param_groups(lr=1.0)
        if channels_last:  # 4-D weights NHWC: the convolutions take and give channels-last tensors
            self.model.to(memory_format=torch.channels_last)
        if compile:
            compile_model(self.model, "inductor" if compile is True else str(compile))
        self._step_kind: tuple | None = None  # (train?, B, M, auxiliary loss on?) of the last step
        self._clock: list[tuple[int, float]] = []  # (step, time) every LR_FIT_EVERY steps: the pace of training
        #: model.geometry.depth_from_cameras: whether the depth scale still waits for its start (None: not yet read
        #: from the geometry's buffer, which a resume restores; read once, not a device sync every step)
        self._depth_pending: bool | None = None
        self._flops: dict[tuple, int] = {}

    #: True while :meth:`load_from_checkpoint` rebuilds a module: a checkpoint written before the loss weights were
    #: checked (a weight for a part its model lacks, which its run ignored) still loads for evaluation and rendering
    _loading = False

    @classmethod
    def load_from_checkpoint(cls, *args, **kwargs):
        loading, GQNModule._loading = GQNModule._loading, True
        try:
            return super().load_from_checkpoint(*args, **kwargs)
        finally:
            GQNModule._loading = loading

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lightning's hook (also on ``load_from_checkpoint``): remember the step the checkpoint was written at, and
        the data module's validation settings of the run that wrote it (None for checkpoints from before them)."""
        self.global_step_loaded = int(checkpoint.get("global_step", 0))
        self.data_state_loaded = checkpoint.get("GQNDataModule")

    # ------------------------------------------------------------------ schedules
    def sigma(self, step: int | None = None) -> float:
        return self.sigma_schedule(self.global_step if step is None else step)

    def param_groups(self, lr: float) -> list[dict]:
        """The optimizer's parameter groups under ``lr_scales`` (one group when it is empty), each with its LR."""
        scales = self.hparams.get("lr_scales") or {}
        if not isinstance(scales, dict) or not all(isinstance(k, str) and k.strip(".") for k in scales):
            raise ValueError(f"module.lr_scales must be {{parameter-name prefix: factor}}, e.g. "
                             f"'module.lr_scales={{generator.generation_cores:0.4}}', got {scales!r}")
        scales = {k.strip("."): v for k, v in scales.items()}
        for prefix, factor in scales.items():
            if not finite_number(factor) or factor <= 0:
                raise ValueError(f"module.lr_scales.{prefix} must be a number > 0 (a factor on the LR), got {factor!r}")
        # every name of every parameter: a shared module's weights go by each of its names (model/core=
        # shared_inference_generation: the generation cores are the inference cores), the longest match wins
        aliases: dict[torch.nn.Parameter, list[str]] = {}  # a tensor hashes by identity
        for n, p in self.named_parameters(remove_duplicate=False):
            aliases.setdefault(p, []).append(n.removeprefix("model."))
        groups: dict[str, list] = {}
        for p, names in aliases.items():
            match = max((k for k in scales for n in names if n == k or n.startswith(k + ".")), key=len, default="")
            groups.setdefault(match, []).append(p)
        # a scale on a part this model is configured without (e.g. experiment=default's geometry under ~model/geometry:
        # the attribute is None) has nothing to scale; a name the model has no such part for stays an error
        unmatched = sorted(k for k in set(scales) - set(groups) if not self._switched_off(k))
        if unmatched:
            tops = sorted({n.split(".")[0] for names in aliases.values() for n in names})
            raise ValueError(f"module.lr_scales: {unmatched[0]!r} names no parameter of the model; names start with "
                             f"{', '.join(tops)} (e.g. generator.generation_cores)")
        # "name": LearningRateMonitor logs each group's LR as lr-Adam/<prefix> (the unscaled rest: lr-Adam/other)
        return [{"params": ps, "lr": lr * scales.get(k, 1.0), "lr_scale": scales.get(k, 1.0), "name": k or "other"}
                for k, ps in groups.items()]

    def _switched_off(self, prefix: str) -> bool:
        """Whether ``prefix`` (dotted, below ``model``) runs into a part set to None, as ``model.geometry`` without
        ``model/geometry``."""
        part = self.model
        for name in prefix.split("."):
            if not hasattr(part, name):
                return False
            part = getattr(part, name)
            if part is None:
                return True
        return False

    def configure_optimizers(self):
        try:
            params = self.parameters()
            if self.hparams.get("lr_scales"):
                if "lr" not in self.hparams.optimizer:
                    raise UserError("module.lr_scales scales module.optimizer.lr, which is not set: set it (e.g. "
                                    "module.optimizer.lr=1e-3) or module.lr_scales=null")
                params = self.param_groups(self.hparams.optimizer["lr"])
            opt = hydra.utils.instantiate(self.hparams.optimizer)(params=params)
        except TypeError as err:  # e.g. another optimizer than Adam with Adam's fused / betas options left set
            raise UserError(f"module.optimizer: {err}; remove what it does not take, e.g. ~module.optimizer.fused "
                            f"(and ~module.optimizer.betas for an optimizer without betas)") from None
        if self.hparams.lr_scheduler is None:
            return opt
        sched = hydra.utils.instantiate(self.hparams.lr_scheduler)(opt)
        lines = getattr(sched, "lr_lambdas", [])
        if any(line is not lines[0] for line in lines):  # _fit_lr_to_max_time bends lines[0] for every group
            raise UserError("module.lr_scheduler gave each parameter group a line of its own; with module.lr_scales "
                            "give it one line (LambdaLR with one function), which scales every group alike")
        # a scheduler that sets every group's LR from one number (OneCycleLR's max_lr, CyclicLR's base_lr) drops the
        # scales: each group's LR over its scale must stay one LR
        unscaled = [g["lr"] / g.get("lr_scale", 1.0) for g in opt.param_groups]
        if not all(math.isclose(u, unscaled[0], rel_tol=1e-6) for u in unscaled):
            raise UserError(f"module.lr_scheduler ({type(sched).__name__}) reset the parameter groups' LRs and "
                            f"dropped module.lr_scales {dict(self.hparams.lr_scales)}: use one that multiplies the LR "
                            f"(LambdaLR; the default gqn.schedules.linear_lr) or set module.lr_scales=null")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    #: with ``schedule.lr_fit_max_time``: bend the LR line every this many steps, to end where the cap stops the run
    LR_FIT_EVERY = 25
    #: ... from the pace over about this many steps (a validation every 500 steps is part of the pace)
    LR_FIT_WINDOW = 500

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # before the step, not after: the checkpoint a callback writes at this step's end holds the bent line
        if self.hparams.schedule.get("lr_fit_max_time") and self.global_step % self.LR_FIT_EVERY == 0:
            self._fit_lr_to_max_time()

    def _fit_lr_to_max_time(self) -> None:
        """``schedule.lr_fit_max_time``: when ``trainer.max_time`` will stop training before the LR line ends
        (a slower CPU, a slower variant at an equal wall-clock budget), end the line where the cap will stop
        it: the steps left are the pace of the last ~``LR_FIT_WINDOW`` steps times the time left on Lightning's
        ``Timer``. Rank 0's horizon is broadcast, so DDP ranks keep one LR."""
        left = max_time_left(self.trainer)
        sched = self.lr_schedulers()
        line = getattr(sched, "lr_lambdas", [None])[0]
        if left is None or not hasattr(line, "retarget"):
            return
        step, now = self.global_step, time.monotonic()
        # the pace of steps at the current size only: coarse steps (schedule.coarse_steps) are faster
        size = self.coarse_factor(step)
        self._clock = [(s, t) for s, t in self._clock
                       if s >= step - self.LR_FIT_WINDOW and self.coarse_factor(s) == size] + [(step, now)]
        first, then = self._clock[0]
        if step - first < 4 * self.LR_FIT_EVERY or now <= then:  # no pace of 100 steps yet (a start, a resume)
            return
        horizon = sched.last_epoch + (step - first) / (now - then) * left
        horizon = min(self.trainer.strategy.broadcast(horizon, src=0), line.steps)
        if horizon < line.steps or line.horizon < line.steps:  # a run the cap does not stop keeps its line exactly
            line.retarget(sched.last_epoch, horizon)
        self.log("train/lr_steps", line.horizon, rank_zero_only=True)

    # ------------------------------------------------------------------ throughput
    @property
    def flops_per_batch(self) -> int | None:
        """FLOPs of the last step, read by Lightning's ``ThroughputMonitor`` after every batch (train: forward,
        auxiliary render and backward; validation: forward and the prior-mean render). Counted once per batch
        shape with ``measure_flops`` on a meta-device copy of the model (nothing is computed)."""
        if self._step_kind is None:
            return None
        if self._step_kind not in self._flops:
            self._flops[self._step_kind] = self._count_flops(*self._step_kind)
        return self._flops[self._step_kind]

    def _count_flops(self, train: bool, B: int, M: int, aux: bool, size: int | None = None) -> int:
        from lightning.fabric.utilities.throughput import measure_flops

        # the copy's initialisation, its random batch and its latents draw from a fork of the CPU RNG: counting (at
        # the first batch of every shape, in the model summary) leaves a seeded run's random stream as it was
        with torch.random.fork_rng(devices=[]):
            size = size or self.model.image_size
            # on the meta device nothing is computed; a geometric read samples images (grid_sample has no meta
            # kernel), so that model is counted on a real CPU batch (once per batch shape, well under a second)
            device = "meta" if self.model.geometry is None else "cpu"
            with torch.inference_mode(False), torch.device(device):
                model = hydra.utils.instantiate(self.hparams.model)
                ci, cp = torch.rand(B, M, 3, size, size), torch.rand(B, M, model.pose_dim)
                qi, qp = torch.rand(B, 3, size, size), torch.rand(B, model.pose_dim)

            def step():
                out = model(ci, cp, qi, qp, sigma=1.0)
                if not train:
                    model.render(out["representation"], qp, mean=True, views=out["views"], geometry=out["geometry"])
                elif aux:
                    return out["elbo"].sum() + model.generate(qp, out["representation"], out["views"], out["geometry"],
                                                              sample_prior=False)["mean"].sum()
                return out["elbo"].sum()

            # ThroughputMonitor asks in inference mode
            with torch.inference_mode(False), torch.enable_grad(), model.at_image_size(size):
                return measure_flops(model, step, loss_fn=torch.Tensor.sum if train else None)

    # ------------------------------------------------------------------ steps
    def forward(self, batch: dict[str, torch.Tensor], sigma: float | None = None):
        return self.model(batch["context_images"], batch["context_poses"], batch["query_images"],
                             batch["query_poses"], sigma=self.sigma() if sigma is None else sigma)

    def _log_terms(self, prefix: str, out: dict, batch_size: int, **kw) -> None:
        for key in ("elbo", "nll", "kl", "bits_per_pixel", "mse"):
            self.log(f"{prefix}/{key}", out[key].mean(), batch_size=batch_size, **kw)

    def coarse_factor(self, step: int | None = None) -> int:
        """``schedule.coarse_steps``: the first that many training steps see images downsampled by
        ``schedule.coarse_factor`` (1 from then on, and for validation, test and rendering)."""
        s = self.hparams.schedule
        step = self.global_step if step is None else step
        return int(s.get("coarse_factor", 2)) if step < int(s.get("coarse_steps") or 0) else 1

    def training_step(self, batch, batch_idx):
        if self._depth_pending is None:
            geometry = self.model.geometry
            self._depth_pending = getattr(geometry, "depth_from_cameras", False) and not bool(geometry.cameras_measured)
        if self._depth_pending:
            self._depth_pending = not self._start_depth_scale(batch["context_poses"])
        factor = self.coarse_factor()
        if factor == 1:
            return self._training_step(batch)
        batch = downsample_batch(batch, factor)
        with self.model.at_image_size(batch["query_images"].shape[-1]):
            # the pixel terms summed over factor^2 fewer pixels: scaled back to the full image's count. The KL, summed
            # over a latent grid factor^2 smaller, is not: per latent cell it weighs 1/factor^2 as much (as measured)
            return self._training_step(batch, pixel_scale=factor ** 2)

    def _start_depth_scale(self, context_poses: torch.Tensor) -> bool:
        """``model.geometry.depth_from_cameras``: start the read's depth scale at the context cameras' spread in the
        first training batch whose spread says something; under DDP every process at the mean of all processes'
        (one model everywhere). Returns whether it did."""
        geometry = self.model.geometry
        spread = geometry.camera_spread(context_poses)
        if self._trainer is not None and self.trainer.world_size > 1:
            spread = self.all_gather(spread).float().mean()
        return geometry.start_depth_scale(spread)

    def _training_step(self, batch, pixel_scale: float = 1.0):
        depth_weight = self.hparams.get("depth_weight", 0.0)
        if self.model.geometry is not None:  # the read keeps what plane_nll scores only when the loss takes it
            self.model.geometry.keep_planes = bool(depth_weight)
        out = self(batch)
        loss = (pixel_scale * out["nll"] + self.kl_weight(self.global_step) * out["kl"]).mean()
        B = batch["query_images"].shape[0]
        images, poses = batch["query_images"], batch["query_poses"]
        if images.dim() == 5:  # several query views per scene: [B, K, ...] -> [B * K, ...] like the ELBO terms
            images, poses = images.flatten(0, 1), poses.flatten(0, 1)
        weight = self.prior_mean_weight(self.global_step)
        if weight:
            prior_mean = self.model.generate(poses, out["representation"], out["views"], out["geometry"],
                                             sample_prior=False)["mean"]
            prior_nll = gaussian_nll(images, prior_mean, self.sigma())
            loss = loss + weight * pixel_scale * prior_nll.mean()
            self.log("train/prior_mean_nll", prior_nll.mean(), batch_size=B)
        read_weight = self.hparams.get("read_weight", 0.0)
        if read_weight and out["geometry"] is not None:
            found, seen = self.model.geometry.found_colour(out["geometry"])
            # pixels that at least half a context view sees (seen is the fraction of the M views: bilinear sampling
            # and the soft visibility test leave it above 0 almost everywhere)
            where = (seen.detach() * batch["context_images"].shape[1] >= 0.5).to(found.dtype)
            read_nll = (where * (found - images).pow(2)).flatten(1).sum(1) / (2 * self.sigma() ** 2)
            loss = loss + read_weight * pixel_scale * read_nll.mean()
            self.log("train/read_nll", read_nll.mean(), batch_size=B)
        if depth_weight and out["geometry"] is not None:
            plane_nll = self.model.geometry.plane_nll(images)
            loss = loss + depth_weight * plane_nll.mean()
            self.log("train/plane_nll", plane_nll.mean(), batch_size=B)
        drawn_weight = self.hparams.get("drawn_weight", 0.0)
        if drawn_weight and out.get("drawn") is not None:
            drawn_nll = gaussian_nll(images, out["drawn"], self.sigma())
            loss = loss + drawn_weight * pixel_scale * drawn_nll.mean()
            self.log("train/drawn_nll", drawn_nll.mean(), batch_size=B)
        mixture_weight = self.hparams.get("mixture_weight", 0.0)
        if mixture_weight and out.get("blend") is not None:
            mix_nll = self.mixture_nll(images, *out["blend"])
            loss = loss + mixture_weight * pixel_scale * mix_nll.mean()
            self.log("train/mixture_nll", mix_nll.mean(), batch_size=B)
        floor_weight = self.hparams.get("floor_weight", 0.0)
        if floor_weight and out["geometry"] is not None and getattr(self.model.geometry, "floor_grid", 0):
            drawn = self.model.geometry.floor_colour(out["geometry"])
            floor_nll = gaussian_nll(images, drawn, self.sigma())  # every pixel: the prior-mean loss's NLL
            loss = loss + floor_weight * pixel_scale * floor_nll.mean()
            self.log("train/floor_nll", floor_nll.mean(), batch_size=B)
        self._step_kind = (True, B, batch["context_images"].shape[1], bool(weight), images.shape[-1])
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self._log_terms("train", out, B)
        self.log("train/sigma", self.sigma(), batch_size=B)
        self.log("train/context_size", float(batch["context_images"].shape[1]), batch_size=B)
        self.log("train/image_size", float(images.shape[-1]), batch_size=B)
        if self.model.geometry is not None:  # the learned lens and depth scale (no device sync until the logger writes)
            self.log("train/fov_degrees", self.model.geometry.fov_degrees.detach(), batch_size=B)
            self.log("train/depth_scale", self.model.geometry.log_depth_scale.detach().exp(), batch_size=B)
        return loss

    def mixture_nll(self, images: torch.Tensor, weights: torch.Tensor, copies: torch.Tensor) -> torch.Tensor:
        """``module.mixture_weight``'s term ``[B]``: the NLL of ``images`` under the per-pixel mixture of the blend's
        ``copies`` ``[B, n, 3, H, W]`` (detached), Gaussians of ``mixture_sigma``, weighted by their shares of the
        copies' weight (``weights`` ``[B, n + 1, H, W]``; the last, the canvas's, is left out); with
        ``mixture_gate``, only at pixels where the copies' share-weighted spread exceeds it."""
        shares = weights[:, :-1] / weights[:, :-1].sum(dim=1, keepdim=True).clamp(min=1e-12)
        copies = copies.detach()
        gate, mask = self.hparams.get("mixture_gate", 0.0), None
        if gate:
            with torch.no_grad():
                s, c = fp32(shares)[:, :, None], fp32(copies)
                spread = (s * (c - (s * c).sum(dim=1, keepdim=True)) ** 2).sum(dim=(1, 2))  # [B, H, W]
                mask = (spread > gate ** 2).float()
        return mixture_nll(images, shares, copies, self.hparams.get("mixture_sigma", 0.1), mask)

    @torch.no_grad()
    def evaluation_metrics(self, batch: dict[str, torch.Tensor], out: dict | None = None) -> dict[str, torch.Tensor]:
        """Per-scene ``[B]`` metrics of a batch: the -ELBO terms, and PSNR/SSIM of the prior-mean render next to
        two baselines (the context view nearest in pose, the mean of the context views). When the batch has
        object masks (``query_object_mask``, ``query_empty_room``), also PSNR on object pixels of those three
        and of the exact empty-room render; NaN for scenes whose query view shows no object pixel."""
        out = self(batch) if out is None else out
        ctx, ctx_poses, target = batch["context_images"], batch["context_poses"], batch["query_images"]
        renders = {
            "model": self.model.render(out["representation"], batch["query_poses"], mean=True,  # encoded once
                                       views=out["views"], geometry=out["geometry"]),
            "nearest_view": metrics.nearest_context_view(ctx, ctx_poses, batch["query_poses"]),
            "mean_view": metrics.mean_context_view(ctx),
        }
        values = {key: out[key].float() for key in ("elbo", "nll", "kl", "bits_per_pixel", "mse")}
        renders = {name: img.float() for name, img in renders.items()}  # bf16 under autocast: score in fp32
        # image metrics in fp32 whatever trainer.precision is (SSIM's convolutions under bf16 autocast are garbage)
        with torch.autocast(target.device.type, enabled=False):
            for name, img in renders.items():
                values[f"psnr_{name}"] = metrics.psnr(img, target)
                values[f"ssim_{name}"] = metrics.ssim(img, target)
            if "query_object_mask" in batch:
                mask = metrics.object_pixels(batch["query_object_mask"])
                values["object_fraction"] = mask.float().flatten(1).mean(dim=1)
                for name, img in {**renders, "empty_room": batch["query_empty_room"]}.items():
                    values[f"object_psnr_{name}"] = metrics.masked_psnr(img, target, mask)
        return values

    def _eval_step(self, prefix: str, batch):
        out = self(batch)
        self._step_kind = (False, batch["query_images"].shape[0], batch["context_images"].shape[1], False)
        for key, value in self.evaluation_metrics(batch, out).items():
            finite = ~value.isnan()  # object metrics: only the scenes whose query view shows an object
            if finite.any():
                self.log(f"{prefix}/{key}", value[finite].mean(), batch_size=int(finite.sum()), sync_dist=True,
                         prog_bar=(key == "psnr_model" and prefix == "val"))
        return out

    def validation_step(self, batch, batch_idx):
        return self._eval_step("val", batch)

    def test_step(self, batch, batch_idx):
        return self._eval_step("test", batch)

    # ------------------------------------------------------------------ public rendering API (callbacks)
    @torch.no_grad()
    def reconstruct(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.reconstruct(batch["context_images"], batch["context_poses"], batch["query_images"],
                                      batch["query_poses"])

    @torch.no_grad()
    def sample(self, batch: dict[str, torch.Tensor], mean: bool = False, seed: int | None = None,
               return_sequence: bool = False):
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        return self.model.sample(batch["context_images"], batch["context_poses"], batch["query_poses"],
                                 mean=mean, generator=gen, return_sequence=return_sequence)

    @torch.no_grad()
    def render_views(self, context_images: torch.Tensor, context_poses: torch.Tensor, query_poses: torch.Tensor,
                     batch_size: int = 16, mean: bool = True, seed: int = 0) -> torch.Tensor:
        """Render many poses ``[N, 7]`` of ONE scene (context ``[M, 3, H, W]``, ``[M, 7]``): the context is
        encoded once, the poses rendered in batches. Returns ``[N, 3, H, W]``."""
        r, views = self.model.encode(context_images[None].to(self.device), context_poses[None].to(self.device))
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out = [self.model.render(r, q.to(self.device), mean=mean, generator=gen, views=views)
               for q in query_poses.split(batch_size)]
        return torch.cat(out)

