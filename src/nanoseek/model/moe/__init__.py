"""DeepSeekMoE: the router, the routed experts and the layer that combines them."""

from nanoseek.model.moe.experts import RoutedExperts
from nanoseek.model.moe.moe import MoE
from nanoseek.model.moe.router import Router

__all__ = ["MoE", "Router", "RoutedExperts"]
