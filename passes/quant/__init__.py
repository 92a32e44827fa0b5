"""quant: int8/int4 quantization to QDQ (or QLinear ops) that keeps accuracy and loads on its target.

The registered pass is :class:`~onnxshrink.passes.quant.pass_.QuantPass` (``quant``); it composes one
module per concern, each a mixin holding the pass's methods for that concern or plain functions:

* ``options``    -- :class:`QuantOptions` (the pass spec's options, defaults and help texts).
* ``graph``      -- op tables and read-only graph predicates shared by the others.
* ``build``      -- new initializers and nodes with short unique names; dead Q/DQ removal.
* ``opset``      -- the exact opset 11/12 -> 13 upgrade per-channel DequantizeLinear needs.
* ``weights``    -- symmetric per-channel int8, 7-bit (reduce_range), int4 MatMulNBits / blocked int4.
* ``dynamic``    -- DynamicQuantizeLinear -> MatMulInteger rewrites (mode=dynamic).
* ``placement``  -- which activations get a Q/DQ pair, which heads stay float, which tensors share a range.
* ``calibrate``  -- streamed min/max, channel means and histograms through ``PassContext.capture``.
* ``ranges``     -- range estimators (minmax, percentile, entropy, mse) and activation scale / zero point.
* ``equalize``   -- cross-layer equalization (CLE) of Conv -> Relu/Clip -> Conv pairs.
* ``correct``    -- bias correction of the weight-rounding mean shift.
* ``qdq``        -- static-mode rewrites: Q/DQ insertion, int32 biases, Relu/Clip folding, shared qparams.
* ``qop``        -- ``format=qop``: QLinearConv / QLinearMatMul / QLinearAdd.
* ``recover``    -- ``max_drop``: score against float, fall the most sensitive layers back to float.

The modes, options and measured figures are described in ``docs/passes/quant.md``.
"""

from onnxshrink.passes.quant.options import QuantOptions
from onnxshrink.passes.quant.pass_ import QuantPass
from onnxshrink.passes.quant.placement import output_heads
from onnxshrink.passes.quant.ranges import TensorStats, activation_qparams, choose_range
from onnxshrink.passes.quant.weights import dequantize_weight, quantize_weight, weight_absmax

__all__ = ["QuantOptions", "QuantPass", "TensorStats", "activation_qparams", "choose_range", "quantize_weight",
           "dequantize_weight", "weight_absmax", "output_heads"]
