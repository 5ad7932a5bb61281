"""The compression library: torch and `amrc_exp.math` only (no Hydra, no W&B, no files).

Compress your own timm ViT from your own DataLoaders::

    from amrc_exp.compress import AMRCConfig, compress_, compress_model

    report = compress_model(model, calib_loader, heldout_loader, AMRCConfig(ratio=0.5))
    compress_(model, report)

`compress_model` = `calibrate` + `search`; `search` works from precomputed `CalibStats`.
`CompressionReport.state_dict()` saves a search; `partial_finetune`, `quantize_` and `top1`
are the paper's later stages (Sec 4.1 item 5, App. B) and its metric.
"""

from amrc_exp.compress.calibrate import CalibStats, LayerStats, calibrate, collect_stats, find_layers
from amrc_exp.compress.compensate import LayerReport
from amrc_exp.compress.config import (
    DEFAULT_PATTERNS,
    AMRCConfig,
    DecompConfig,
    ScheduleConfig,
    ZConfig,
    ZFitConfig,
)
from amrc_exp.compress.evaluate import Evaluation, evaluate, top1
from amrc_exp.compress.finetune import FinetuneLoss, partial_finetune
from amrc_exp.compress.lowrank import LayerPlan, LowRankLinear, compress_, count_params
from amrc_exp.compress.ptq import model_size_mib, quantize_
from amrc_exp.compress.search import CompressionReport, compress_model, search

__all__ = [
    "AMRCConfig", "DecompConfig", "ScheduleConfig", "ZConfig", "ZFitConfig", "DEFAULT_PATTERNS",
    "CalibStats", "LayerStats", "calibrate", "collect_stats", "find_layers",
    "CompressionReport", "LayerReport", "compress_model", "search",
    "LayerPlan", "LowRankLinear", "compress_", "count_params",
    "partial_finetune", "FinetuneLoss", "quantize_", "model_size_mib", "top1", "evaluate", "Evaluation",
]
