"""GQN model: representation networks, ConvLSTM cores, DRAW generator, the full GQN."""

from gqn.model.gqn import GQN
from gqn.model.representation import Pool, Pyramid, Tower

__all__ = ["GQN", "Pool", "Pyramid", "Tower"]
