"""Generative Query Network (Eslami et al., Science 2018) as a Hydra + Lightning framework."""

from pathlib import Path

__version__ = "0.1.0"

#: The Hydra config tree shipped with the repository (``conf/`` at the project root).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

from gqn.precision import register_resolver  # noqa: E402  (configs use ${gqn_precision:})

register_resolver()
