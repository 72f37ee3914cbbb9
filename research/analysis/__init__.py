"""Analyses of parameter trees: measurements that read models without changing how they train
(intruder dimensions in fine-tuned weights, ...)."""

from research.analysis.intruders import (count_intruders, intruder_dimensions,
                                         max_similarities, scale_intruders)

__all__ = ["count_intruders", "intruder_dimensions", "max_similarities", "scale_intruders"]
