"""Generative Query Network (Eslami et al., Science 2018) as a Hydra + Lightning framework."""

from pathlib import Path

__version__ = "0.1.0"

_PACKAGE = Path(__file__).resolve().parent
#: The Hydra config tree: ``gqn/conf`` in an installed wheel (pyproject.toml packages ``conf/`` there), else
#: ``conf/`` at the root of the source tree (an editable install, or running from a checkout).
CONF_DIR = _PACKAGE / "conf" if (_PACKAGE / "conf" / "train.yaml").is_file() else _PACKAGE.parents[1] / "conf"

from gqn.precision import register_resolver  # noqa: E402  (configs use ${gqn_precision:})

register_resolver()
