"""GQN model: representation networks, ConvLSTM cores, DRAW generator, the full GQN."""

from gqn.model.gqn import GQN
from gqn.model.representation import AttentionTower, Pool, Pyramid, Tower

__all__ = ["GQN", "AttentionTower", "Pool", "Pyramid", "Tower"]
