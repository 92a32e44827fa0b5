"""Bias correction: remove the output mean shift that weight rounding adds.

For a Conv/Gemm ``y = W x + b`` with quantized weight ``Ŵ``, ``E[Ŵx] − E[Wx] = (Ŵ − W) E[x]``, so
``Δb_o = Σ_c E[x_c] · Σ_k (Ŵ − W)[o, c, k]`` (Conv: channel ``c`` within the group of output ``o``; Gemm:
``α/β · E[x] (Ŵ − W)`` with the weight as ``[K, N]``) is subtracted from the bias, with ``E[x]`` the per-channel mean from calibration.
The same ``Ŵ`` the pass writes is used (same axis and bits). Preconditions: main-graph node, weight used
only there, bias a constant of the output shape used only there (else a counted decline); a Gemm without a
bias is skipped (adding C would need beta semantics).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshrink.passes.quant.graph import attr, is_weight, weight_axis
from onnxshrink.passes.quant.ranges import TensorStats
from onnxshrink.passes.quant.weights import dequantize_weight, quantize_weight


class BiasCorrector:
    """Bias correction (see the module docstring)."""

    def _bias_correction(self, model: ir.Model, found: dict[ir.Value, list], stats: dict[str, TensorStats],
                         plan: dict[ir.Value, list]) -> None:
        for weight, uses in found.items():
            for node, slot in uses:
                if slot != 1 or node.graph is not model.graph or node.op_type not in ("Conv", "Gemm"):
                    continue
                x = node.inputs[0]
                st = stats.get(x.name) if x is not None else None
                mean = st.channel_mean() if st is not None else None
                if mean is None:
                    continue
                if len(weight.uses()) != 1:
                    continue
                w = weight.const_value.numpy()
                axis = weight_axis(node, 1, w.ndim) if self.options.per_channel else None
                q, scale = quantize_weight(w, axis, self._weight_bits(uses))
                dw = dequantize_weight(q, scale, axis) - w
                if node.op_type == "Conv":
                    group = attr(node, "group", 1)
                    cout, cpg = w.shape[0], w.shape[1]
                    if mean.shape[0] != cpg * group:
                        continue
                    per_oc = dw.reshape(cout, cpg, -1).sum(axis=2)  # [cout, cpg]
                    opg = cout // group
                    m = np.stack([mean[(o // opg) * cpg:(o // opg + 1) * cpg] for o in range(cout)])
                    delta = (per_oc * m).sum(axis=1)
                else:
                    if attr(node, "transA", 0):
                        continue
                    dwt = dw.T if attr(node, "transB", 0) else dw  # [K, N]
                    if mean.shape[0] != dwt.shape[0]:
                        continue
                    delta = mean @ dwt * attr(node, "alpha", 1.0)
                    if len(node.inputs) > 2 and node.inputs[2] is not None:
                        delta = delta / attr(node, "beta", 1.0)
                if not np.any(np.abs(delta) > 0):
                    continue
                b = node.inputs[2] if len(node.inputs) > 2 else None
                if b is not None and (not is_weight(b) or len(b.uses()) != 1 or b.const_value.numpy().shape != delta.shape):
                    self.decline("bias shared, not constant or broadcast: no bias correction", node)
                    continue
                old = b.const_value.numpy() if b is not None else np.zeros(delta.shape, np.float32)
                new = (old - delta).astype(np.float32)
                graph = node.graph
                nb = self._new_init(graph, self._short("c"), new)
                if b is None:
                    if node.op_type == "Gemm":
                        continue  # a Gemm without C would need beta semantics: skip
                    if len(node.inputs) == 2:
                        node.resize_inputs(3)
                self._replace(node, 2, nb)
                self.count("bias_corrected")
