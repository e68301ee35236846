"""Generative Query Network (Eslami et al., Science 2018) as a Hydra + Lightning framework."""

from pathlib import Path

__version__ = "0.1.0"

_PACKAGE = Path(__file__).resolve().parent
#: The Hydra config tree: ``gqn/conf`` in an installed wheel (pyproject.toml packages ``conf/`` there), else
#: ``conf/`` at the root of the source tree (an editable install, or running from a checkout).
CONF_DIR = _PACKAGE / "conf" if (_PACKAGE / "conf" / "train.yaml").is_file() else _PACKAGE.parents[1] / "conf"

from gqn.precision import register_resolver  # noqa: E402  (configs use ${gqn_precision:})

register_resolver()


def config_if(condition, then, otherwise):
    """``${gqn_if:<condition>,<then>,<otherwise>}`` in the configs: ``then`` where ``condition`` is set (not null,
    false or empty), else ``otherwise``; e.g. a schedule value that depends on whether the model has a geometric
    read: ``${gqn_if:${oc.select:model.geometry._target_,null},0.0,1.0}``. A 0 is set (only null, false and "" are
    not)."""
    return otherwise if condition is None or condition is False or condition == "" else then


def _register_if() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("gqn_if"):
        OmegaConf.register_new_resolver("gqn_if", config_if)


_register_if()
