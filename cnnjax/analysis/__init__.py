"""Analyses of whole models, by tracing (nothing is compiled): the layer table with parameter and
multiply-add counts, receptive fields, and BatchNorm folding for inference.

    from cnnjax import models
    from cnnjax.analysis import summary, receptive_field, fold_batchnorm
    print(summary(models.create('resnet50'), (224, 224, 3)))
"""

from cnnjax.analysis.folding import FoldedModel, fold_batchnorm
from cnnjax.analysis.receptive_field import (
    Geometry,
    RFRow,
    empirical_receptive_field,
    format_receptive_field,
    receptive_field,
    stacked_receptive_field,
)
from cnnjax.analysis.summary import (
    MACS_NOTE,
    LayerRow,
    Summary,
    count_params,
    format_summary,
    parameter_count,
    summary,
)

__all__ = [
    "MACS_NOTE",
    "FoldedModel",
    "Geometry",
    "LayerRow",
    "RFRow",
    "Summary",
    "count_params",
    "empirical_receptive_field",
    "fold_batchnorm",
    "format_receptive_field",
    "format_summary",
    "parameter_count",
    "receptive_field",
    "stacked_receptive_field",
    "summary",
]
