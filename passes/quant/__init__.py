"""DOC"""

from onnxshrink.passes.quant.options import QuantOptions
from onnxshrink.passes.quant.pass_ import QuantPass
from onnxshrink.passes.quant.placement import output_heads
from onnxshrink.passes.quant.ranges import TensorStats, activation_qparams, choose_range
from onnxshrink.passes.quant.weights import dequantize_weight, quantize_weight, weight_absmax

__all__ = ["QuantOptions", "QuantPass", "TensorStats", "activation_qparams", "choose_range", "quantize_weight",
           "dequantize_weight", "weight_absmax", "output_heads"]
