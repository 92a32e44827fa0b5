"""Op tables and read-only graph predicates shared by the quant modules.

Nothing here edits a graph. The weight axis is the output-channel axis of each weight layout (Conv ``[O, I/g,
k...]``: 0; ConvTranspose ``[I, O/g, k...]``: 1, per-tensor when grouped because its output channels are not
contiguous along one axis; Gemm: 0 if ``transB`` else 1; MatMul ``[K, N]``: 1; LSTM/GRU/RNN
``[dirs, gates*hidden, in]``: 1, one scale per gate row). A value is an *activation* when it is a float tensor
computed at run time: neither a constant nor the output of a DequantizeLinear (already quantized).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx_ir as ir

logger = logging.getLogger(__name__)

ONNX_DOMAINS = ("", "ai.onnx")
MS_DOMAIN = "com.microsoft"
WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "LSTM": 1, "GRU": 1, "RNN": 1}
RECURRENT_OPS = ("LSTM", "GRU", "RNN")  # W and R weights: weight-only (DequantizeLinear feeding the float op)
FAST_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # static mode: integer kernels exist

def is_onnx(node: ir.Node, *ops: str) -> bool:
    return node.domain in ONNX_DOMAINS and (not ops or node.op_type in ops)


def const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def is_weight(value: ir.Value | None) -> bool:
    """A constant float tensor that is not an overridable graph input."""
    if value is None or value.const_value is None or value.is_graph_input():
        return False
    return value.const_value.dtype == ir.DataType.FLOAT


def is_depthwise(node: ir.Node, slot: int) -> bool:
    """A Conv weight with one input and one output channel per group (depthwise, multiplier 1)."""
    if slot != 1 or not is_onnx(node, "Conv") or node.inputs[1] is None:
        return False
    w = node.inputs[1]
    shape = w.const_value.shape if w.const_value is not None else w.shape
    if shape is None or len(shape) < 3 or not isinstance(shape[0], int):
        return False
    return shape[1] == 1 and attr(node, "group", 1) == shape[0]


def attr(node: ir.Node, name: str, default: Any) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def opset_of(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def weight_axis(node: ir.Node, slot: int, rank: int) -> int | None:
    """The output-channel axis of the weight in ``slot`` of ``node`` (None: per tensor only)."""
    op = node.op_type
    if op == "Conv" and slot == 1:
        return 0
    if op == "ConvTranspose" and slot == 1:
        return 1 if attr(node, "group", 1) == 1 else None
    if op == "Gemm" and slot == 1:
        return 0 if attr(node, "transB", 0) else 1
    if op == "Gemm" and slot == 0:
        return None
    if op == "MatMul" and slot == 1 and rank == 2:
        return 1
    if op in RECURRENT_OPS and slot in (1, 2) and rank == 3:
        return 1  # [directions, gates·hidden, input]: one scale per gate row
    return None


def all_nodes(model: ir.Model) -> Iterable[ir.Node]:
    for graph in model.graphs():
        yield from list(graph)


def is_activation(v: ir.Value | None) -> bool:
    """A float tensor computed at run time (not a constant)."""
    if v is None or v.const_value is not None:
        return False
    if v.is_graph_input():
        return v.dtype == ir.DataType.FLOAT
    p = v.producer()
    if p is not None and is_onnx(p, "DequantizeLinear", "Constant"):
        return False
    return v.dtype == ir.DataType.FLOAT


def clip_bound(node: ir.Node) -> float | None:
    """M for a ``Clip(x, 0, M)`` with constant inputs (opset ≥ 11 form), else None."""
    if "min" in node.attributes or "max" in node.attributes or len(node.inputs) < 3:
        return None
    lo, hi = const_array(node.inputs[1]), const_array(node.inputs[2])
    if lo is None or hi is None or lo.size != 1 or hi.size != 1 or float(lo) != 0.0:
        return None
    m = float(hi)
    return m if m > 0 and math.isfinite(m) else None


def is_silu(node: ir.Node) -> bool:
    """``Mul(x, Sigmoid(x))`` (SiLU/Swish as exported), either operand order."""
    if len(node.inputs) != 2 or not all(is_activation(v) for v in node.inputs):
        return False
    for a, b in (node.inputs, node.inputs[::-1]):
        p = b.producer()
        if p is not None and is_onnx(p, "Sigmoid") and p.inputs[0] is a:
            return True
    return False


def sole_consumer(v: ir.Value) -> ir.Node | None:
    uses = v.uses()
    if len(uses) != 1 or v.is_graph_output():
        return None
    return uses[0][0]


def dq_parts(v: ir.Value | None) -> tuple[ir.Value, ir.Value, ir.Value] | None:
    """(quantized, scale, zero point) of the DequantizeLinear producing ``v``."""
    p = v.producer() if v is not None else None
    if p is None or not is_onnx(p, "DequantizeLinear") or "block_size" in p.attributes:
        return None
    return p.inputs[0], p.inputs[1], (p.inputs[2] if len(p.inputs) > 2 else None)


def dq_scale(v: ir.Value | None) -> np.ndarray | None:
    parts = dq_parts(v)
    return None if parts is None else const_array(parts[1])


def same_qparams(dq: ir.Node, q: ir.Node) -> bool:
    a = [const_array(x) for x in dq.inputs[1:3]]
    b = [const_array(x) for x in q.inputs[1:3]]
    if any(x is None for x in a + b):
        return False
    return a[0].shape == b[0].shape and np.array_equal(a[0], b[0]) and a[1].dtype == b[1].dtype and np.array_equal(
        a[1], b[1])



def _infer_shapes(model: ir.Model, context: Any) -> None:
    if context is not None and context.cache.get("shapes_current"):
        return
    from onnxshrink.model import infer_shapes

    try:
        infer_shapes(model)
    except Exception as e:  # noqa: BLE001 - inference is best effort; capture refuses untyped values
        logger.debug("shape inference failed: %s", e)



def append_input(node: ir.Node, value: ir.Value) -> None:
    node.resize_inputs(len(node.inputs) + 1)
    node.replace_input_with(len(node.inputs) - 1, value)
