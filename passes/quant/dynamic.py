"""mode=dynamic: MatMul/Gemm with a constant weight -> DynamicQuantizeLinear + MatMulInteger.

``y = Cast(MatMulInteger(xq, Wq, xz, 0)) · (x_scale · s_W) (+ bias)``, where ``(xq, x_scale, xz) =
DynamicQuantizeLinear(x)`` (uint8, per batch) and ``Wq`` is the symmetric int8 weight (per output column):
the u8s8 form onnxruntime's CPU provider runs and fuses. Gemm needs ``transA = 0``, ``alpha = 1`` and
``beta = 1`` (with a bias) so the rewrite stays exact. Conv is never quantized dynamically: ConvInteger u8s8
has no CPU kernel, and a dynamic Conv is slower than float.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshrink.passes.quant.graph import all_nodes, attr, is_onnx
from onnxshrink.passes.quant.weights import quantize_weight


class DynamicQuantizer:
    """mode=dynamic rewrites (see the module docstring)."""

    def _quantize_dynamic(self, model: ir.Model) -> bool:
        changed = False
        found = self._weight_slots(model, ("MatMul", "Gemm"))
        for weight, uses in found.items():
            w = weight.const_value.numpy()
            for node, slot in uses:
                if node.op_type == "MatMul" and (slot != 1 or w.ndim != 2):
                    self.decline("dynamic MatMul needs a 2-D weight on the right", node)
                    continue
                if node.op_type == "Gemm":
                    if attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0 or (
                            len(node.inputs) > 2 and node.inputs[2] is not None and attr(node, "beta", 1.0) != 1.0):
                        self.decline("Gemm with transA/alpha/beta kept float", node)
                        continue
                self._dynamic_node(node, w)
                changed = True
        self._keep_recurrent_float(model)
        skipped_conv = sum(1 for n in all_nodes(model) if is_onnx(n, "Conv"))
        if skipped_conv:
            self.decline("Conv kept float in dynamic mode (slower than float on CPU)")
            self.count("conv_kept_float", skipped_conv)
        return changed

    def _dynamic_node(self, node: ir.Node, w: np.ndarray) -> None:
        graph = node.graph
        if node.op_type == "Gemm" and attr(node, "transB", 0):
            w = w.T
        q, scale = quantize_weight(w, 1 if self.options.per_channel else None, self._wbits)
        base = node.name or node.op_type
        x = node.inputs[0]
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        qv = self._new_init(graph, f"{base}_W_quantized", q)
        zv = self._new_init(graph, f"{base}_W_zero_point",
                            np.zeros(scale.shape, np.int8) if scale.ndim else np.asarray(0, np.int8))
        sv = self._new_init(graph, f"{base}_W_scale", scale)
        dql = self._node("DynamicQuantizeLinear", [x], name=f"{base}_DynamicQuantizeLinear", num_outputs=3)
        mmi = self._node("MatMulInteger", [dql.outputs[0], qv, dql.outputs[2], zv], name=f"{base}_MatMulInteger")
        cast = self._node("Cast", [mmi.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{base}_Cast")
        sc = self._node("Mul", [dql.outputs[1], sv], name=f"{base}_ScaleProduct")
        out = node.outputs[0]
        mul = self._node("Mul", [cast.outputs[0], sc.outputs[0]], name=f"{base}_Rescale")
        new_nodes = [dql, mmi, cast, sc, mul]
        final = mul.outputs[0]
        if bias is not None:
            add = self._node("Add", [final, bias], name=f"{base}_Bias")
            new_nodes.append(add)
            final = add.outputs[0]
        graph.insert_before(node, new_nodes)
        final.dtype = ir.DataType.FLOAT
        final.shape = out.shape
        name = out.name
        out.replace_all_uses_with(final, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        final.name = name
        self.count("dynamic_matmuls")
        self.count("weights_quantized")
        self.count("weight_bytes_saved", int(w.nbytes - q.nbytes))
