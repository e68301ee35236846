"""Shared helpers of the Hydra entry points: one-line errors, checks of the config, W&B hygiene, run
bookkeeping (the ``latest`` link, finding the checkpoint to resume), strict JSON."""

from __future__ import annotations

import functools
import math
import os
import re
import sys
import tempfile
import types
import typing
from collections.abc import Iterable
from pathlib import Path

from hydra.experimental.callback import Callback as HydraCallback

from data_modules.errors import GQNDataError

os.environ.setdefault("WANDB_SILENT", "true")


class UserError(ValueError):
    """Bad user input to an entry point (missing checkpoint, malformed pose file, ...)."""

    fix: str | None = None


def prog_name() -> str:
    return Path(sys.argv[0]).name or "gqn"


def one_line_errors(prog: str):
    """Turn data/user errors (also when re-raised from a DataLoader worker) into one line and exit 2.

    The line is ``{prog}: error: {message}`` and, where the error knows its remedy (``err.fix``),
    ``; fix: {remedy}``. A Ctrl-C outside training (where gqn-train saves a checkpoint) exits 130.
    """

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                sys.exit(130)
            except Exception as exc:
                err = _user_cause(exc)
                if err is None:
                    raise
                print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
                sys.exit(2)

        return inner

    return wrap


def checked_overrides(config_dir: str | Path, config_name: str, prog: str):
    """Outermost decorator of a ``@hydra.main`` entry point: before Hydra runs, compose this command line's
    config as Hydra will and report a bad override (a typo'd key, an unknown option of a config group, a sweep
    without ``--multirun``, unparsable syntax) on one line with exit 2, instead of Hydra's multi-line report and
    exit 1. With ``-m``/``--multirun`` every job's config is checked before the first job starts (a typo in a
    sweep's last option would otherwise fail after the other jobs ran). Command lines with Hydra's other flags
    (``--cfg``, ``--help``, ``-cn``, ...) are left to Hydra."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if not args and not kwargs:
                _check_overrides(config_dir, config_name, prog, sys.argv[1:])
            return fn(*args, **kwargs)

        return inner

    return wrap


_MULTIRUN_FLAGS = ("-m", "--multirun")


def _check_overrides(config_dir, config_name: str, prog: str, args: list[str]) -> None:
    flags = [a for a in args if a.startswith("-")]
    if any(f not in _MULTIRUN_FLAGS for f in flags):
        return
    overrides = [a for a in args if not a.startswith("-")]
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    if GlobalHydra.instance().is_initialized():  # inside another Hydra app: nothing to pre-check
        return
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            if flags:
                _check_sweep(overrides, config_name)
            else:
                compose(config_name, overrides=overrides, return_hydra_config=True)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except (ConfigCompositionException, MissingConfigException, OverrideParseException) as err:
        message = hydra_message(err)
        if isinstance(err, OverrideParseException):  # its message does not say which override
            message = f"{_unparsable(overrides) or 'an override'}: {message}"
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except Exception:  # anything else (e.g. a sweeper's own syntax): Hydra composes again and reports it itself
        pass
    finally:
        GlobalHydra.instance().clear()


def _check_sweep(overrides: list[str], config_name: str) -> None:
    """Compose the jobs that cover every option of a multirun's sweeps (Hydra's composition errors propagate): the
    first job (each sweep at its first value), then for a swept config group each other option in turn (a group's
    options are files that may be missing; the values of a plain key all compose alike, so its first value stands
    for them). An ``interval(...)``
    for the basic sweeper (it lists values; sampling one needs e.g. ``hparams_search=optuna``) is a ``UserError``;
    other sweeps it cannot list (``glob(...)``, an interval for optuna) raise, and Hydra is left to check them."""
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    intervals = [o for o in parsed if o.is_interval_sweep()]
    if intervals:
        rest = [o.input_line for o in parsed if not o.is_interval_sweep()]
        sweeper = compose(config_name, overrides=rest, return_hydra_config=True).hydra.sweeper._target_
        if sweeper.endswith(".BasicSweeper"):
            raise UserError(f"{intervals[0].input_line!r}: the basic sweeper runs listed values (key=a,b,c or "
                            "range(start,stop,step)); an interval is sampled by a search: add hparams_search=optuna")
    values = [list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.input_line] for o in parsed]
    if any(not v for v in values):
        raise ValueError("an empty sweep")
    first = [f"{o.get_key_element()}={v[0]}" if o.is_sweep_override() else v[0] for o, v in zip(parsed, values)]
    groups = compose(config_name, overrides=first, return_hydra_config=True).hydra.runtime.choices
    for i, (o, v) in enumerate(zip(parsed, values)):
        if o.is_sweep_override() and o.key_or_group in groups:
            for option in v[1:]:
                compose(config_name, overrides=first[:i] + [f"{o.get_key_element()}={option}"] + first[i + 1:],
                        return_hydra_config=True)


def _unparsable(overrides: list[str]) -> str | None:
    """The first override Hydra's grammar rejects, quoted (None if each parses on its own)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except Exception:
            return repr(override)
    return None


def hydra_message(err: BaseException) -> str:
    """Hydra's multi-line composition error as one line: its sentences joined by '; ', a list of available
    options joined by ', ', the config search path and links to the docs left out."""
    parts, options = [], []
    for line in str(err).split("Config search path:")[0].splitlines():
        if not line.strip() or line.startswith("See https://"):
            continue
        if line.startswith(("\t", "    ")) and parts:
            options.append(line.strip())
            continue
        if options:
            parts[-1] += " " + ", ".join(options)
            options = []
        parts.append(line.strip().rstrip("."))
    if options:
        parts[-1] += " " + ", ".join(options)
    cause = str(err.__cause__ or "").strip()
    if cause:
        parts.insert(1, cause.splitlines()[0])
    return "; ".join(parts) or type(err).__name__


def one_line(err: BaseException) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    message = lines[-1] if lines else type(err).__name__
    for prefix in ("data_modules.errors.CorruptRecordError: ", "data_modules.errors.GQNDataError: "):
        message = message.split(prefix, 1)[-1]
    fix = getattr(err, "fix", None)
    return f"{message}; fix: {fix}" if fix else message


def _user_cause(exc: BaseException | None) -> BaseException | None:
    """The user-facing error behind ``exc``, if any: a data or user error, or a ``ValueError`` that a
    constructor raised while Hydra instantiated it from the config (a bad config value, e.g.
    ``model.num_steps=0``; Hydra wraps it in an ``InstantiationException``), Lightning's
    ``MisconfigurationException`` from the Trainer (``trainer.max_steps=-5``) or a ``TypeError`` for a key the
    constructor does not take (``+data.batchsize=4``)."""
    from hydra.errors import InstantiationException

    seen, instantiating = 0, False
    while exc is not None and seen < 10:
        if isinstance(exc, (GQNDataError, UserError)):
            return exc
        if isinstance(exc, InstantiationException):
            instantiating = True
        elif instantiating and (exc.__cause__ or exc.__context__) is None:
            if _is_bad_keyword(exc):
                exc.fix = f"check the key's spelling ({prog_name()} --cfg job prints every option)"
                return exc
            if type(exc).__name__ == "MisconfigurationException":  # Lightning's "bad Trainer argument"
                if re.search(r"\b(gpu|cuda)\b", str(exc), re.I):
                    exc.fix = ("torch sees no usable GPU here (a CPU-only torch build, or no driver): use "
                               "trainer=cpu, or install a CUDA build of torch (README, Installing)")
                return exc
            if isinstance(exc, ValueError):
                return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _is_bad_keyword(exc: BaseException) -> bool:
    """A constructor called with a key it does not take (``+data.batchsize=4``) or without one it needs."""
    return isinstance(exc, TypeError) and bool(re.search(r"unexpected keyword argument|missing \d+ required", str(exc)))


def finish_wandb() -> None:
    """Close the W&B run so that the next multirun job starts a new one."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


# ---------------------------------------------------------------------------------------- run directories
class RunDirCheck(HydraCallback):
    """Hydra callback: fail with one line (exit 2) when the run or sweep directory cannot be written,
    before Hydra's own traceback would (it creates the directory just after this hook)."""

    def on_run_start(self, config, **kwargs) -> None:
        check_writable(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        check_writable(config.hydra.sweep.dir, "hydra.sweep.dir")


def check_writable(directory: str | Path, key: str, what: str = "the run directory", hint: str | None = None) -> None:
    """Create ``directory`` and write a file in it, or one line naming it and ``hint`` (default: set ``key`` or
    paths.output_dir) and exit 2."""
    directory = Path(directory)
    hint = hint or f"set {key}=<a writable directory> or paths.output_dir=<a writable directory>"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        blocker = next((p for p in [directory, *directory.parents] if p.exists()), None)
        why = f"{blocker} is a file" if blocker is not None and not blocker.is_dir() else (err.strerror or str(err))
        print(f"{prog_name()}: error: cannot write {what} {directory} ({why}); {hint}", file=sys.stderr)
        sys.exit(2)


def latest_link(output_dir: str | Path) -> Path:
    return Path(output_dir) / "latest"


def mark_latest(run_dir: str | Path, output_dir: str | Path) -> None:
    """Point ``{output_dir}/latest`` at ``run_dir`` (relative symlink), also for a run outside output_dir."""
    link = latest_link(output_dir)
    run_dir = Path(run_dir).resolve()
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(run_dir, link.parent.resolve()))
    except OSError as err:  # e.g. a file system without symlinks: the run itself is fine
        print(f"note: could not point {link} at {run_dir}: {err}", file=sys.stderr)


LAST = Path("checkpoints") / "last.ckpt"
HPC = "hpc_ckpt_*.ckpt"  # what Lightning's SLURMEnvironment saves in the run directory before a requeue


def find_last_checkpoints(roots: Iterable[str | Path | tuple[str | Path, int]]) -> list[Path]:
    """Every ``checkpoints/last.ckpt`` (or Lightning's SLURM ``hpc_ckpt_N.ckpt``) of a run directory below a
    root, newest first.

    A root is a directory, searched 4 levels deep (runs are ``{output_dir}/{date}/{time}_{name}``, sweep jobs
    ``{multirun_dir}/{date}/{time}_{name}/{job}``), or ``(directory, depth)``; depth 0 is the directory itself.
    A root's ``latest`` link counts too, wherever its run lies.
    """
    found = {}
    for item in roots:
        root, depth = item if isinstance(item, tuple) else (item, 4)
        root = Path(root)
        if not root.is_dir():
            continue
        for level in range(depth + 1):
            for name in (str(LAST), HPC):
                for path in root.glob("/".join(["*"] * level + [name])):
                    if path.is_file():
                        found[path.resolve()] = path.stat().st_mtime
        last = latest_link(root) / LAST
        if last.is_file():
            found[last.resolve()] = last.stat().st_mtime
    return sorted(found, key=lambda p: found[p], reverse=True)


def checkpoint_roots(cfg) -> list[tuple[Path, int]]:
    """Where runs of this config are written, as ``(directory, depth)``: paths.output_dir and
    paths.multirun_dir, the siblings of this run's directory (runs placed with ``hydra.run.dir`` outside
    output_dir), and this run's directory itself (a fixed one, as a requeued SLURM job has)."""
    roots = [(Path(cfg.paths.output_dir), 4)]
    if cfg.paths.get("multirun_dir"):
        roots.append((Path(cfg.paths.multirun_dir), 4))
    try:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        roots += [(run_dir.parent, 1), (run_dir, 0)]
    except ValueError:  # no Hydra run (programmatic use)
        pass
    return roots


def resolve_ckpt(ckpt_path: str | None, roots: str | Path | Iterable[str | Path], announce: str | None = None,
                 key: str = "ckpt_path"):
    """``None`` | a path | ``"auto"`` (the newest ``checkpoints/last.ckpt`` under ``roots``, if any).

    With ``announce`` (the program's name), ``auto`` says on one line what it resumes or that it found nothing.
    ``key``: the option's name in the errors.
    """
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "auto":
        roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
        found = find_last_checkpoints(roots)
        if announce:
            where = ", ".join(dict.fromkeys(str(r[0] if isinstance(r, tuple) else r) for r in roots))
            if found:
                print(f"{announce}: ckpt_path=auto: resuming {found[0]}", file=sys.stderr)
            else:
                print(f"{announce}: ckpt_path=auto: no checkpoints/last.ckpt under {where}; starting from step 0",
                      file=sys.stderr)
        return str(found[0]) if found else None
    path = Path(ckpt_path)
    if path.is_dir():
        raise UserError(f"{key}={ckpt_path} is a directory; give the checkpoint file, e.g. {key}={path / LAST}")
    if not path.is_file():
        raise UserError(f"checkpoint not found: {ckpt_path} (give {key}=<run>/checkpoints/last.ckpt)")
    return str(ckpt_path)


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint as a dict (on the CPU), or a one-line UserError for a file that is not one."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UserError(f"cannot load checkpoint {path}: {type(err).__name__}: {err}".splitlines()[0]) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of gqn-train (no state_dict/hyper_parameters)")
    return ckpt


def non_finite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors of a state dict holding NaN or inf."""
    import torch

    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


# ---------------------------------------------------------------------------------------- config checks
def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def check_resume(ckpt: dict, model_cfg: dict, path: str) -> None:
    """Refuse to resume a checkpoint whose model config differs from this command's, naming the keys."""
    saved = _flatten(ckpt["hyper_parameters"].get("model") or {}, "model")
    given = _flatten(model_cfg, "model")
    # keys the checkpoint lacks (options added since it was written) are left to load_state_dict
    diff = sorted(k for k in saved if saved[k] != given.get(k, "<unset>"))
    if diff:
        parts = [f"{k}={saved[k]} in the checkpoint but {given.get(k, '<unset>')} here" for k in diff]
        raise UserError(
            f"cannot resume {path}: its model differs from this command's: {'; '.join(parts)}; resume with the "
            f"checkpoint's model config ({_keep_overrides(saved, diff)}) or start a new run without ckpt_path"
        )


def resume_differences(saved: dict, current: dict, what: str, keep: str, prefix: str = "") -> str | None:
    """One line naming the settings where this command (``current``) differs from the run that wrote a checkpoint
    (``saved``; settings it lacks, from before they were saved, are not compared), both flattened to override
    paths under ``prefix``, and the overrides that keep the run's own (``what``: e.g. "data settings"; ``keep``:
    what they keep); None where nothing differs. Such a resume is allowed (a researcher may mean it), but it is no
    longer the same run, so it is said."""
    saved, current = _flatten(saved, prefix), _flatten(current, prefix)
    diff = [k for k in current if k in saved and saved[k] != current[k]]
    if not diff:
        return None
    parts = "; ".join(f"{k}={_override_text(current[k])} here but {_override_text(saved[k])} in the checkpoint"
                      for k in diff)
    keys, group = diff, _data_group(saved["data.dataset"]) if "data.dataset" in diff else None
    if group:  # data=<group> resets every data setting to the group's: name them all
        keys = ["data.dataset", *(k for k in current if k in saved and k != "data.dataset")]
    return (f"resuming with other {what} than the run was trained with ({parts}): training goes on with this "
            f"command's; add {_keep_overrides(saved, keys, group)} to continue {keep}")


def lr_line_differs(saved: dict, lr_steps) -> str | None:
    """One line where a checkpoint's LR line (``saved``'s scheduler state: the steps its anneal was planned over) ends
    elsewhere than this command's ``schedule.lr_steps`` (e.g. a run of the 4500-step default before session 32
    resumed under today's 9000): the saved line goes on, as an exact resume must, so the steps past its end train at
    ``lr_final``; None where they agree or the checkpoint has no such line."""
    try:
        steps = float(saved["lr_schedulers"][0]["lr_lambdas"][0]["steps"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    if lr_steps is None or steps == float(lr_steps):
        return None
    return (f"resuming a run whose LR line ends at step {steps:g} with schedule.lr_steps={float(lr_steps):g} here: the "
            f"checkpoint's line goes on (an exact resume), so steps past {steps:g} train at lr_final; add "
            f"trainer.max_steps={steps:g} to stop where that run would have (the schedules anneal over "
            f"trainer.max_steps)")


def _data_group(dataset) -> str | None:
    """``dataset`` where the ``data`` config group has a config of that name (the DeepMind datasets,
    ``synthetic_rooms``), else None (a directory of the user's own)."""
    from gqn import CONF_DIR

    return dataset if isinstance(dataset, str) and (Path(CONF_DIR) / "data" / f"{dataset}.yaml").is_file() else None


def _keep_overrides(saved: dict, keys: list[str], data_group: str | None = None) -> str:
    """The command-line overrides that set ``keys`` to their ``saved`` values (also when a default changed since);
    with ``data_group``, the dataset is named by that group (``data=rooms_ring_camera``: its reader settings)."""
    return " ".join(f"data={data_group}" if k == "data.dataset" and data_group else f"{k}={_override_text(saved[k])}"
                    for k in keys)


#: the loss's settings a resume compares: override path -> its key in GQNModule's flattened hyperparameters
LOSS_SETTINGS = {
    "schedule.prior_mean_weight": "prior_mean_weight", "schedule.prior_mean_start": "prior_mean_start",
    "module.read_weight": "read_weight",
    "module.floor_weight": "floor_weight",
    "module.depth_weight": "depth_weight",
    "module.drawn_weight": "drawn_weight",
    "module.mixture_weight": "mixture_weight", "module.mixture_sigma": "mixture_sigma",
    "module.mixture_gate": "mixture_gate",
    "module.kl_weight": "kl_weight", "module.kl_warmup_steps": "kl_warmup_steps",
    "module.sigma_warmup_steps": "sigma_warmup_steps", "schedule.sigma_init": "schedule.sigma_init",
    "schedule.sigma_final": "schedule.sigma_final", "schedule.sigma_steps": "schedule.sigma_steps",
    "schedule.coarse_steps": "schedule.coarse_steps", "schedule.coarse_factor": "schedule.coarse_factor",
}
#: what a checkpoint written before a schedule setting existed trained with
SCHEDULE_DEFAULTS = {"schedule.coarse_steps": 0, "schedule.coarse_factor": 2}


def loss_settings(hparams: dict, defaults: dict | None = None) -> dict:
    """``LOSS_SETTINGS`` read from a module's hyperparameters (saved, or of the module just built); a setting the
    hyperparameters lack (a checkpoint from before it existed) takes its value from ``defaults`` (what that run
    trained with: :func:`loss_defaults`) where given."""
    flat = {**(defaults or {}), **_flatten(hparams)}
    return {path: flat[key] for path, key in LOSS_SETTINGS.items() if key in flat}


def _override_text(value) -> str:
    """``value`` as a Hydra command-line override writes it (true, null, [3,5], {a.b:0.4})."""
    import json

    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_override_text(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (bool, list, type(None))) else str(value)


def loss_defaults(module_cls) -> dict:
    """What a checkpoint's run trained with where its hyperparameters lack a setting (written before it existed):
    the module's constructor defaults and :data:`SCHEDULE_DEFAULTS`; for :func:`loss_settings`."""
    return {**class_defaults(module_cls), **SCHEDULE_DEFAULTS}


def class_defaults(cls) -> dict:
    """``{argument: default}`` of a class's constructor (the arguments that have one)."""
    import inspect

    return {name: p.default for name, p in inspect.signature(cls).parameters.items()
            if p.default is not inspect.Parameter.empty}


def resume_defaults(ckpt: dict, model_cfg: dict) -> dict:
    """Options of this command's model config that a checkpoint lacks (added to the code since it was written)
    -> the value the run that wrote it had: the default of the class the option configures (the code before the
    option behaved as that default), where it differs from this command's. E.g. ``model.geometry.visibility``
    (true in the YAML since session 7, false in ``PlaneSweep``) for a plane-sweep run from before it existed."""
    from hydra.utils import get_class

    saved = _flatten(ckpt["hyper_parameters"].get("model") or {}, "model")
    out = {}

    def walk(node: dict, prefix: str) -> None:
        defaults = {}
        if isinstance(node.get("_target_"), str):
            try:
                defaults = class_defaults(get_class(node["_target_"]))
            except Exception:  # not a class we can read: leave its options to check_resume / load_state_dict
                defaults = {}
        for key, value in node.items():
            name = f"{prefix}.{key}"
            if isinstance(value, dict):
                walk(value, name)
            elif key != "_target_" and name not in saved and key in defaults:
                default = list(defaults[key]) if isinstance(defaults[key], tuple) else defaults[key]  # YAML lists
                if default != value:
                    out[name] = default

    walk(model_cfg, "model")
    return out


_SIMPLE = {int: "an int", float: "a number", bool: "true or false", str: "a string"}


def _accepts(hint, value) -> bool | None:
    """Whether ``value`` fits the type ``hint`` (None: the hint is too complex to judge)."""
    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return None
    if origin in (typing.Union, types.UnionType):
        verdicts = [_accepts(h, value) for h in typing.get_args(hint)]
        if any(v is True for v in verdicts):
            return True
        return None if any(v is None for v in verdicts) else False
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return None


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return _SIMPLE.get(hint, getattr(hint, "__name__", str(hint)))


def check_config_types(cfg, sections: Iterable[str]) -> None:
    """Check every value of the ``_target_`` nodes under ``sections`` against the type annotations of the
    target's constructor: ``model.num_steps=abc`` fails here, naming the key and the type, instead of deep
    inside the model with a traceback. Values whose annotation is not a plain type are left to the target."""
    from hydra.utils import get_object
    from omegaconf import DictConfig, OmegaConf

    def walk(node, path: str):
        if not isinstance(node, DictConfig):
            return
        hints = {}
        if "_target_" in node:
            try:
                target = get_object(node._target_)
                hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
            except Exception:  # an unknown target fails in instantiate with its own message
                hints = {}
        for key in node:
            if str(key).startswith("_"):
                continue
            sub = f"{path}.{key}"
            value = OmegaConf.select(node, str(key), throw_on_missing=False)
            if isinstance(value, DictConfig):
                walk(value, sub)
                continue
            hint = hints.get(str(key))
            if hint is None or OmegaConf.is_list(value):
                continue
            if _accepts(hint, value) is False:
                raise UserError(f"{sub} must be {_describe(hint)}, got {value!r} ({type(value).__name__})")

    for section in sections:
        node = cfg.get(section)
        walk(node, section)


def finite_number(value) -> bool:
    """An int or float of a config (not a bool), and not NaN or inf."""
    return bool(_accepts(float, value)) and math.isfinite(value)


def require_ckpt_path(cfg) -> None:
    """gqn-eval / gqn-render without ``ckpt_path`` (``???`` in their configs): one line saying what to give."""
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise UserError("give the checkpoint: ckpt_path=<run>/checkpoints/last.ckpt (or ckpt_path=auto for the "
                        "latest run's)")


def check_options(cfg, options: dict) -> None:
    """The top-level options of a command (gqn-eval, gqn-render) against ``{key: (kind, least)}``: kind ``int``,
    ``float`` (any finite number) or ``bool``; ``least`` the smallest value allowed (None: any); a key listed
    with kind ``(int, None)`` may also be null. One line naming the key, else."""
    from omegaconf import OmegaConf

    for key, (kind, least) in options.items():
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        nullable = isinstance(kind, tuple)
        kind = kind[0] if nullable else kind
        if value is None and nullable:
            continue
        if kind is bool:
            if not _accepts(bool, value):
                raise UserError(f"{key} must be true or false, got {value!r}")
            continue
        ok = _accepts(int, value) if kind is int else finite_number(value)
        what = ("an integer" if kind is int else "a number") + (f" >= {least}" if least is not None else "")
        if nullable:
            what += " or null"
        if not ok or (least is not None and value < least):
            raise UserError(f"{key} must be {what}, got {value!r}")


# ---------------------------------------------------------------------------------------- strict JSON
def finite_or_none(obj, path: str = "", bad: list | None = None):
    """A copy of ``obj`` (dicts, lists, numbers) with NaN and inf replaced by None (JSON null); their keys
    are appended to ``bad``."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v, f"{path}.{k}" if path else str(k), bad) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v, f"{path}[{i}]", bad) for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        if bad is not None:
            bad.append(path)
        return None
    return obj
