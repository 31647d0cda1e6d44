"""The two models of the recipe: the dual encoder (M_D*) and the cross-encoder (M_C), plus shared plumbing."""

from rocketqa_ray.modeling.cross_encoder import CrossEncoder
from rocketqa_ray.modeling.dual_encoder import DualEncoder

__all__ = ["CrossEncoder", "DualEncoder"]
