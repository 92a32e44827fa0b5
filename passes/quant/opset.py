"""Opset 11/12 -> 13 upgrade, done only where it is exact, so weights can be dequantized per channel.

Per-channel ``DequantizeLinear`` (the ``axis`` attribute) needs opset 13. The upgrade moves ``axes`` and
``split`` attributes of Squeeze/Unsqueeze/ReduceSum/Split to inputs and Dropout's ``ratio`` to an input.
Softmax/LogSoftmax/Hardmax change meaning at 13 (they flatten at ``axis`` before 13, normalize one axis
from 13), so the upgrade happens only when each such axis is the last one, where both agree; otherwise the
opset stays and weights go per-channel through ``DequantizeLinear(q, 1) · s`` (exact, one Mul more).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxshrink.passes.quant.graph import all_nodes, append_input, attr, is_onnx, opset_of


class OpsetUpgrader:
    """The opset 11/12 -> 13 upgrade (see the module docstring)."""

    def _upgrade_opset(self, model: ir.Model) -> bool:
        """Upgrade an opset-11/12 model to 13 in place where that is exact; else note per-tensor."""
        old = opset_of(model)
        if old < 11:
            self._per_channel_ok = False
            self.details["per_channel"] = f"per-tensor activations: opset {old} < 11 is not upgraded"
            return False
        blockers = []
        for node in all_nodes(model):
            if not is_onnx(node):
                continue
            if node.op_type in ("Softmax", "LogSoftmax", "Hardmax"):
                axis = attr(node, "axis", 1)
                rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
                if rank is None or (axis % rank) != rank - 1:
                    blockers.append(f"{node.op_type} {node.name!r} axis {axis}")
        if blockers:
            self._per_channel_ok = False
            self.details["per_channel"] = (f"opset {old} kept: {blockers[0]} changes meaning at opset 13; "
                                               "weights per-channel via DequantizeLinear·scale")
            return False
        for graph in model.graphs():
            for node in list(graph):
                if not is_onnx(node):
                    continue
                op = node.op_type
                if op in ("Softmax", "LogSoftmax", "Hardmax"):
                    node.attributes["axis"] = ir.AttrInt64("axis", -1)
                elif op in ("Squeeze", "Unsqueeze", "ReduceSum") and "axes" in node.attributes:
                    axes = list(node.attributes.pop("axes").value)
                    c = self._new_init(graph, f"{node.name or op}_axes", np.array(axes, np.int64))
                    node.resize_inputs(2) if hasattr(node, "resize_inputs") else None
                    node.replace_input_with(1, c) if len(node.inputs) > 1 else append_input(node, c)
                elif op == "Dropout" and ("ratio" in node.attributes or "is_test" in node.attributes):
                    # Dropout-10 → 12: the ratio attribute became an optional input (inference mode default)
                    ratio = node.attributes.pop("ratio").value if "ratio" in node.attributes else 0.5
                    node.attributes.pop("is_test", None)
                    c = self._new_init(graph, self._short("r"), np.asarray(ratio, np.float32))
                    append_input(node, c)
                elif op == "Split" and "split" in node.attributes:
                    split = list(node.attributes.pop("split").value)
                    c = self._new_init(graph, f"{node.name or op}_split", np.array(split, np.int64))
                    append_input(node, c)
        model.opset_imports[""] = 13
        model.opset_imports.pop("ai.onnx", None)
        self.details["opset_upgraded"] = f"{old} -> 13 (per-channel DequantizeLinear needs opset 13)"
        self.count("opset_upgraded")
        return True
