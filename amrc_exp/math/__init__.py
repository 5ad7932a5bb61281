"""Pure math of AMRC: decompositions (Sec 3.1), rank allocation (Sec 3.2), error compensation
(Sec 3.3) and RTN quantization (App. B). Tensors in, tensors out; paper convention W: in x out.

The dispatcher is `amrc_exp.math.decompose.decompose`; it is not re-exported here so that
`amrc_exp.math.decompose` stays the module."""

from .allocate import LayerSpec, allocate_greedy, allocate_uniform, max_removable, schedule, total_params
from .compensate import (
    Z_TYPES,
    ZParams,
    fit_closed_form,
    fit_gd,
    residual,
    residual_error,
    z_dense,
    z_param_count,
)
from .decompose import (
    METHODS,
    Spectrum,
    asvd_mean_spectrum,
    asvd_whiten_spectrum,
    svd_spectrum,
)
from .error import normalized_error
from .quant import dequantize, fake_quantize, quantize_rtn, quantized_tensor_bytes, stored_bytes

__all__ = [
    "LayerSpec",
    "allocate_greedy",
    "allocate_uniform",
    "max_removable",
    "schedule",
    "total_params",
    "Z_TYPES",
    "ZParams",
    "fit_closed_form",
    "fit_gd",
    "residual",
    "residual_error",
    "z_dense",
    "z_param_count",
    "METHODS",
    "Spectrum",
    "asvd_mean_spectrum",
    "asvd_whiten_spectrum",
    "normalized_error",
    "svd_spectrum",
    "dequantize",
    "fake_quantize",
    "quantize_rtn",
    "quantized_tensor_bytes",
    "stored_bytes",
]
