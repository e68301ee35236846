"""Procedural 3-D scenes written in the exact DeepMind GQN TFRecord format (`gqn-data synth`)."""

from gqn.synthetic.scenes import FAMILIES, make_scene
from gqn.synthetic.writer import synthesize

__all__ = ["FAMILIES", "make_scene", "synthesize"]
