"""Graph building for the quant pass: initializers, nodes and names.

Names are short (``w3``, ``a17s``) because on small models names are a large part of the file; they are
made unique against every name of every graph, so subgraph bodies never shadow them. New nodes get no name
(the graph names them on insertion, and the pass clears those names afterwards: saved files need none).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from onnxshrink.model import unique_name
from onnxshrink.passes.quant.graph import WEIGHT_OPS, is_onnx


class GraphBuilder:
    """Initializers, nodes, names and dead-Q/DQ cleanup shared by every rewrite of the pass."""

    def _excluded(self, node: ir.Node) -> bool:
        return self._exclude(node.name)

    def _lift_constants(self, model: ir.Model) -> bool:
        """Constant nodes feeding weight slots become initializers (Paddle/TF exports store weights so)."""
        from onnxshrink.passes.fold import lift_constant

        changed = False
        for graph in model.graphs():
            for node in list(graph):
                if not is_onnx(node, "Constant") or node.outputs[0].is_graph_output():
                    continue
                if not any(is_onnx(u, *WEIGHT_OPS) for u, _ in node.outputs[0].uses()):
                    continue
                value = lift_constant(graph, node)
                if value is None:
                    continue
                self._taken.add(value.name)
                self.count("constant_weights_lifted")
                changed = True
        return changed

    def _new_init(self, graph: ir.Graph, base: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
        name = unique_name(base, self._taken)
        tensor = ir.tensor(array, dtype=dtype, name=name)
        value = ir.Value(name=name, shape=ir.Shape(np.shape(array)), type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        graph.register_initializer(value)
        return value

    def _short(self, kind: str) -> str:
        """A short unique base name (``w3``, ``a17``): on small models names are a large part of the file."""
        while True:
            self._counter += 1
            name = f"{kind}{self._counter}"
            if not any(n.startswith(name) for n in (name, name + "s", name + "z", name + "q", name + "d")
                       if n in self._taken):
                return name

    def _node(self, op: str, inputs: list[ir.Value | None], attrs: dict[str, Any] | None = None,
              *, domain: str = "", name: str | None = None, num_outputs: int = 1,
              outputs: list[ir.Value] | None = None) -> ir.Node:
        attributes = ir.convenience.convert_attributes(
            {k: int(v) if isinstance(v, np.integer) else v for k, v in (attrs or {}).items()})
        node = ir.Node(domain, op, inputs, attributes, outputs=outputs,
                       num_outputs=None if outputs is not None else num_outputs,
                       name=unique_name(name, self._taken) if name else None)
        if not name:
            self._unnamed.append(node)  # the graph names nodes on insertion; saved files need no names
        return node

    def _remove_unused(self, model: ir.Model) -> None:
        for graph in model.graphs():
            for node in reversed(list(graph)):
                if is_onnx(node, "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear") and all(
                        not o.uses() and not o.is_graph_output() for o in node.outputs):
                    graph.remove(node, safe=True)
            used = {v.name for n in graph.all_nodes() for v in n.inputs if v is not None}
            for name in list(graph.initializers):
                v = graph.initializers[name]
                if name not in used and not v.is_graph_input() and not v.is_graph_output() and not v.uses():
                    del graph.initializers[name]
