"""``format=qop``: ``DQ → Conv/MatMul/Add (→ Relu|Clip) → Q`` patterns become QLinear ops.

``QLinearConv`` (int32 bias ``s_b = s_x · s_W``), ``QLinearMatMul`` (per-tensor B scale only) and
``com.microsoft::QLinearAdd`` (scalar scales). A Relu / ``Clip(0, M)`` between the op and the Q is absorbed
when the Q's uint8 zero point is 0 and ``255·s ≤ M``: the Q already clamps there. Afterwards
``Q(DQ(x))`` pairs with equal scale and zero point are dropped (they are the identity on ``x``). QLinear ops
need explicit zero points; symmetric weights share one scalar zero per dtype.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshrink.passes.quant.graph import MS_DOMAIN, const_array, dq_parts, is_onnx, same_qparams, sole_consumer


class QOpWriter:
    """QLinear-op rewriting for format=qop (see the module docstring)."""

    def _to_qop(self, model: ir.Model) -> None:
        graph = model.graph
        for node in list(graph):
            if not is_onnx(node, "Conv", "MatMul", "Add"):
                continue
            out = node.outputs[0]
            consumer = sole_consumer(out)
            relu = None
            if consumer is not None and is_onnx(consumer, "Relu", "Clip") and not out.is_graph_output():
                relu, consumer = consumer, sole_consumer(consumer.outputs[0])
            if consumer is None or not is_onnx(consumer, "QuantizeLinear") or out.is_graph_output():
                continue
            if relu is not None:
                zp = const_array(consumer.inputs[2])
                if zp is None or zp.dtype != np.uint8 or int(zp) != 0:
                    continue  # the Q saturates at 0 only when its zero point is the minimum
                if relu.op_type == "Clip":
                    lo = const_array(relu.inputs[1]) if len(relu.inputs) > 1 and relu.inputs[1] is not None else None
                    hi = const_array(relu.inputs[2]) if len(relu.inputs) > 2 and relu.inputs[2] is not None else None
                    qs = const_array(consumer.inputs[1])
                    if lo is None or float(lo) != 0.0 or hi is None or qs is None or float(qs) * 255 > float(hi) + 1e-6:
                        continue
            ins = [dq_parts(v) for v in node.inputs[:2]]
            if any(p is None for p in ins):
                continue
            ins = [(q, sc, zp if zp is not None else self._zero(graph, q.dtype)) for q, sc, zp in ins]
            yq = consumer.outputs[0]
            ys, yz = consumer.inputs[1], consumer.inputs[2]
            (aq, as_, az), (bq, bs, bz) = ins
            if node.op_type == "Conv":
                bias = None
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    bp = dq_parts(node.inputs[2])
                    if bp is None:
                        continue
                    bias = bp[0]
                new = self._node("QLinearConv", [aq, as_, az, bq, bs, bz, ys, yz] + ([bias] if bias is not None else []),
                                 dict(node.attributes), name=f"{node.name}_quant",
                                 outputs=[ir.Value(name=None)])
            elif node.op_type == "MatMul":
                if bs.shape is not None and len(bs.shape) > 1:
                    continue
                new = self._node("QLinearMatMul", [aq, as_, az, bq, bs, bz, ys, yz], name=f"{node.name}_quant",
                                 outputs=[ir.Value(name=None)])
            else:
                if (as_.shape is not None and len(as_.shape) > 0) or (bs.shape is not None and len(bs.shape) > 0):
                    continue
                new = self._node("QLinearAdd", [aq, as_, az, bq, bs, bz, ys, yz], domain=MS_DOMAIN,
                                 name=f"{node.name}_quant", outputs=[ir.Value(name=None)])
                model.opset_imports.setdefault(MS_DOMAIN, 1)
            graph.insert_before(node, [new])
            new.outputs[0].dtype = yq.dtype
            new.outputs[0].shape = yq.shape
            name = yq.name
            yq.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
            graph.remove(consumer, safe=True)
            if relu is not None:
                graph.remove(relu, safe=True)
            graph.remove(node, safe=True)
            new.outputs[0].name = name
            self.count(f"qop_{new.op_type}")
        # Q(DQ(x)) with equal parameters is x
        for node in list(graph):
            if not is_onnx(node, "QuantizeLinear"):
                continue
            src = node.inputs[0].producer() if node.inputs[0] is not None else None
            if src is None or not is_onnx(src, "DequantizeLinear"):
                continue
            if same_qparams(src, node):
                node.outputs[0].replace_all_uses_with(src.inputs[0], replace_graph_outputs=False)
                if not node.outputs[0].is_graph_output():
                    graph.remove(node, safe=True)
        self._remove_unused(model)

    def _zero(self, graph: ir.Graph, dtype: ir.DataType) -> ir.Value:
        """A shared scalar zero point of ``dtype`` (QLinear ops require one; 0 for symmetric weights)."""
        if dtype not in self._zeros:
            self._zeros[dtype] = self._new_init(graph, f"zero_{dtype.name.lower()}",
                                                np.zeros((), dtype.numpy()))
        return self._zeros[dtype]
