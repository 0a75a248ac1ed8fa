"""Apollo progressive training: depth samplers, layer maps and the stage schedule."""
from .layer_maps import GROW_METHODS, expansion_sources, layer_map
from .samplers import SAMPLERS, depth_pmf, expected_depth, sample_depth
from .schedule import StageSchedule

__all__ = [
    "SAMPLERS", "GROW_METHODS", "sample_depth", "depth_pmf", "expected_depth",
    "layer_map", "expansion_sources", "StageSchedule",
]
