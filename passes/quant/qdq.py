"""Static-mode QDQ rewrites: activation Q/DQ pairs, int32 biases, activation folding, shared qparams.

* Each planned activation gets one ``QuantizeLinear → DequantizeLinear`` right after its producer; every
  planned use reads the DequantizeLinear (recorded for ``max_drop`` fallback).
* Biases: ``b_q = round(b / (s_x · s_W))`` as int32 behind DequantizeLinear (axis 0), where input and weight
  are dequantized: all Conv/Gemm for ``format=qop`` (QLinearConv requires it); only Gemm in QDQ for
  cpu/mobile (onnxruntime forms QGemm for an un-requantized Gemm only with it; Conv fuses with a float bias).
* A Relu / ``Clip(0, M)`` whose only consumer is a uint8 QuantizeLinear with ``z = 0`` (and ``255·s ≤ M``)
  is dropped: the Q already saturates to ``[0, 255·s]``, so ``Q(relu(x)) = Q(x)`` bit for bit (onnxruntime
  does the same fusion on load). Symmetric int8 (tensorrt) is left alone.
* Equal scalar initializers of the main graph become one (a smaller file, the same numbers); zero points
  stay spelled out even when 0, because onnxruntime matches Q/DQ pairs around MaxPool/Flatten/Reshape and
  forms QGemm only with them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshrink.model import unique_name
from onnxshrink.passes.quant.graph import attr, const_array, dq_scale, is_onnx, is_weight, sole_consumer


class QDQWriter:
    """Static QDQ rewrites (see the module docstring)."""

    def _insert_qdq(self, model: ir.Model, value: ir.Value, uses: list[tuple[ir.Node, int]],
                    scale: np.ndarray, zp: np.ndarray) -> None:
        graph = model.graph
        base = self._short("a")
        sv = self._new_init(graph, f"{base}s", scale)
        zv = self._new_init(graph, f"{base}z", zp)
        q = self._node("QuantizeLinear", [value, sv, zv])
        q.outputs[0].name = unique_name(f"{base}q", self._taken)
        q.outputs[0].dtype = ir.DataType.UINT8 if zp.dtype == np.uint8 else ir.DataType.INT8
        q.outputs[0].shape = value.shape
        dq = self._node("DequantizeLinear", [q.outputs[0], sv, zv])
        dq.outputs[0].name = unique_name(f"{base}d", self._taken)
        dq.outputs[0].dtype = ir.DataType.FLOAT
        dq.outputs[0].shape = value.shape
        producer = value.producer()
        if producer is None:
            first = next(iter(graph), None)
            if first is None:
                graph.extend([q, dq])
            else:
                graph.insert_before(first, [q, dq])
        else:
            graph.insert_after(producer, [q, dq])
        for node, slot in uses:
            self._replace(node, slot, dq.outputs[0])

    def _quantize_biases(self, model: ir.Model, ops: tuple[str, ...] = ("Conv", "Gemm")) -> None:
        """Conv/Gemm biases to int32 with scale s_x·s_W, where input and weight are dequantized."""
        for node in list(model.graph):
            if not is_onnx(node, *ops) or len(node.inputs) < 3 or node.inputs[2] is None:
                continue
            if node.op_type == "Gemm" and attr(node, "beta", 1.0) != 1.0:
                continue
            b = node.inputs[2]
            xs = dq_scale(node.inputs[0])
            ws = dq_scale(node.inputs[1])
            if xs is None or ws is None or not is_weight(b) or len(b.uses()) != 1:
                continue
            barr = b.const_value.numpy()
            if barr.ndim != 1:
                continue
            bscale = (xs * ws).astype(np.float32)
            if bscale.ndim == 0:
                bscale = np.full(barr.shape, bscale, np.float32)
            if bscale.shape != barr.shape or np.any(bscale <= 0):
                continue
            bq = np.clip(np.rint(barr / bscale), -(2 ** 31) + 1, 2 ** 31 - 1).astype(np.int32)
            graph = model.graph
            base = self._short("b")
            qv = self._new_init(graph, base, bq)
            sv = self._new_init(graph, f"{base}s", bscale)
            dq = self._node("DequantizeLinear", [qv, sv], {"axis": 0})
            dq.outputs[0].name = unique_name(f"{base}d", self._taken)
            dq.outputs[0].dtype = ir.DataType.FLOAT
            dq.outputs[0].shape = ir.Shape(list(barr.shape))
            graph.insert_before(node, [dq])
            self._replace(node, 2, dq.outputs[0])
            self.count("biases_int32")

    def _compact_qparams(self, model: ir.Model) -> None:
        """Equal scalar initializers of the main graph (activation scales and zero points, mostly) become
        one: a smaller file, the same numbers. (onnx_ir's DeduplicateInitializersPass does this too, but
        logs a warning per initializer of an IR < 4 model, which reaches API users' stderr.) Zero points
        stay spelled out even when they are the default 0: onnxruntime matches Q/DQ pairs around
        MaxPool/Flatten/Reshape and forms QGemm only with them (measured: leaving them out left 3
        DequantizeLinear in the optimized digits CNN)."""
        graph = model.graph
        seen: dict[tuple, ir.Value] = {}
        for v in list(graph.initializers.values()):
            arr = const_array(v)
            if arr is None or arr.size != 1 or v.is_graph_input() or v.is_graph_output():
                continue
            first = seen.setdefault((v.dtype, arr.shape, arr.tobytes()), v)
            if first is not v:
                v.replace_all_uses_with(first)
                del graph.initializers[v.name]
                self.count("qparams_shared")

    def _fold_activations_into_q(self, model: ir.Model) -> None:
        """Drop a Relu/Clip(0, M) whose only consumer is a QuantizeLinear that already clamps to it.

        Exact for the quantized model: ``Q(x)`` saturates to ``[s·(0 − z), s·(255 − z)]``; with ``z = 0``
        (uint8) the lower clamp is the Relu, and when ``255·s ≤ M`` the upper one is inside the Clip, so
        ``Q(relu(x)) = Q(x)`` and ``Q(clip(x, 0, M)) = Q(x)`` bit for bit (onnxruntime does the same fusion
        when it loads the model). Symmetric int8 (tensorrt) is left alone.
        """
        graph = model.graph
        for node in list(graph):
            if not is_onnx(node, "Relu", "Clip"):
                continue
            q = sole_consumer(node.outputs[0])
            if q is None or not is_onnx(q, "QuantizeLinear") or node.outputs[0].is_graph_output():
                continue
            zp = const_array(q.inputs[2]) if len(q.inputs) > 2 else None
            scale = const_array(q.inputs[1])
            if zp is None or zp.dtype != np.uint8 or zp.size != 1 or int(zp) != 0 or scale is None or scale.size != 1:
                continue
            if node.op_type == "Clip":
                lo = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
                hi = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
                if "min" in node.attributes or "max" in node.attributes:
                    continue  # opset < 11 form
                if lo is None or float(lo) != 0.0 or hi is None or float(scale) * 255 > float(hi) * (1 + 1e-6):
                    continue
            src = node.inputs[0]
            if src is None or src.dtype != ir.DataType.FLOAT:
                continue
            q.replace_input_with(0, src)
            graph.remove(node, safe=True)
            self.count(f"{node.op_type.lower()}_folded_into_q")
