"""Static placement: which float activations get a QuantizeLinear → DequantizeLinear pair.

*Anchors* are the ops with integer kernels: Conv, ConvTranspose, Gemm, MatMul (activation x activation
only with ``matmul_act``), Add of two activations, and for cpu/mobile SiLU's ``Mul(x, Sigmoid(x))``
(QLinearSigmoid + QLinearMul keep the Conv before it int8; TensorRT fuses Conv+SiLU itself). *Followers*
(pools, Concat, Resize, data movement, Sigmoid) join when their output reaches an anchor, so int8 flows
through them. Everything else (Softmax, LayerNormalization, GELU/Erf, Div, Pow, reductions) stays float.
Adds between an attention score and its Softmax stay float: masks hold huge negatives or −inf that no 8-bit
range represents.

Heads (``heads=auto``): a weighted node whose output reaches a graph output through no other weighted op,
and whose path scales it by a constant (stride/anchor ``Mul``/``Div``) or takes ``Pow``/``Exp`` — a
YOLO-style in-graph decode — keeps a float input: int8 rounding there becomes pixels of box error. A bias
Add alone is not decoding. ``heads=float`` keeps every output head float, ``int8`` none.

Range groups (union-find): Concat inputs and output share one range (the union) so the Concat moves int8
without requantizing; data-movement ops share their input's range; with ``target=tensorrt`` the two inputs
of a residual Add share one (TensorRT then fuses the Add into the Conv; onnxruntime's QLinearAdd rescales
each input, so cpu/mobile keep the finer separate ranges).
"""

from __future__ import annotations

import onnx_ir as ir

from onnxshrink.passes.quant.graph import is_activation, is_onnx, is_silu, is_weight

# Ops whose float activation inputs get a Q/DQ pair in static mode (input slots that are activations).
STATIC_OPS = {
    "Conv": (0,), "ConvTranspose": (0,), "Gemm": (0,), "MatMul": (0, 1), "Add": (0, 1),
    "Concat": None, "MaxPool": (0,), "AveragePool": (0,), "GlobalAveragePool": (0,),
    "GlobalMaxPool": (0,), "Resize": (0,), "Reshape": (0,), "Flatten": (0,), "Transpose": (0,),
    "Squeeze": (0,), "Unsqueeze": (0,), "Split": (0,), "Sigmoid": (0,), "Mul": (0, 1),
}
# Ops whose output range is their input's (int8 passes through; one shared range).
SAME_RANGE_OPS = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "GlobalMaxPool",
                   "Split"}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Where", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Cast",
                "Identity", "Expand", "Neg", "Max", "Min", "Clip"}


_SCALE_OPS = {"Mul", "Div"}  # by a constant: stride/anchor scaling (a bias Add alone is not decoding)
_PASS_OPS = _ELEMENTWISE | {"Sigmoid", "Softmax", "LogSoftmax", "Tanh", "Relu", "Split", "Slice", "Concat",
                            "Flatten", "Gather", "Exp", "Pow", "Sqrt", "Abs", "Clip"}


class Placement:
    """Activation placement, float heads, range groups, and which inputs need channel means."""

    def _plan(self, model: ir.Model) -> dict[ir.Value, list[tuple[ir.Node, int]]]:
        """Float activations of the main graph to quantize, with the (node, slot) uses that read them."""
        anchors: set[int] = set()
        nodes = list(model.graph)
        masked = softmax_region(model.graph)
        heads = self._float_heads(model)
        for node in nodes:
            if not is_onnx(node) or self._excluded(node) or id(node) in heads:
                continue
            op = node.op_type
            if op in ("Conv", "ConvTranspose", "Gemm"):
                anchors.add(id(node))
            elif op == "MatMul":
                acts = [v for v in node.inputs[:2] if is_activation(v)]
                if len(acts) == 2 and not self.options.matmul_act:
                    self.decline("activation x activation MatMul kept float (matmul_act=false)", node)
                    continue
                anchors.add(id(node))
            elif op == "Mul" and self.options.target != "tensorrt" and is_silu(node):
                # x·σ(x): QLinearSigmoid + QLinearMul keep the Conv before it int8 in onnxruntime;
                # TensorRT fuses Conv+SiLU itself and wants Q/DQ only on the Conv inputs
                anchors.add(id(node))
            elif op == "Add" and all(is_activation(v) for v in node.inputs[:2]):
                if id(node) in masked:
                    self.decline("Add feeding a Softmax (attention mask/bias) kept float", node)
                    continue
                anchors.add(id(node))
        # followers (pools, Concat, Resize, data movement) join when their output reaches an anchor
        included = set(anchors)
        for node in reversed(nodes):
            if id(node) in included or not is_onnx(node) or node.op_type not in STATIC_OPS:
                continue
            if node.op_type == "Mul":
                continue  # only SiLU's Mul, as an anchor
            if self._excluded(node):
                continue
            if any(id(u) in included for out in node.outputs for u, _ in out.uses()):
                included.add(id(node))
        plan: dict[ir.Value, list[tuple[ir.Node, int]]] = {}
        for node in nodes:
            if id(node) not in included:
                continue
            slots = STATIC_OPS[node.op_type]
            slots = range(len(node.inputs)) if slots is None else slots
            for slot in slots:
                v = node.inputs[slot] if slot < len(node.inputs) else None
                if is_activation(v):
                    plan.setdefault(v, []).append((node, slot))
        return plan

    def _float_heads(self, model: ir.Model) -> set[int]:
        """Weighted nodes kept float by ``heads`` (their input activation is not quantized)."""
        if self.options.heads == "int8":
            return set()
        found = output_heads(model.graph, decode_only=self.options.heads == "auto")
        for node in found.values():
            self.decline("detection/regression head kept float (its output is decoded by arithmetic)"
                         if self.options.heads == "auto" else "output head kept float (heads=float)", node)
        if found:
            self.details["heads_float"] = sorted(found)
        return {id(n) for n in found.values()}

    def _range_groups(self, model: ir.Model, plan: dict[ir.Value, list]) -> list[list[ir.Value]]:
        """Tensors that must share one range: Concat inputs with its output, data movement in/out."""
        parent: dict[ir.Value, ir.Value] = {}

        def find(v: ir.Value) -> ir.Value:
            while parent.get(v, v) is not v:
                v = parent[v]
            return v

        def union(a: ir.Value, b: ir.Value) -> None:
            ra, rb = find(a), find(b)
            if ra is not rb:
                parent[ra] = rb

        members = set(plan)
        for node in model.graph:
            if not is_onnx(node):
                continue
            if node.op_type == "Concat" and any(v in plan for v in node.inputs):
                out = node.outputs[0]
                members.add(out)
                for v in node.inputs:
                    if is_activation(v):
                        members.add(v)
                        union(v, out)
            elif (node.op_type == "Add" and self.options.target == "tensorrt"
                  and all(v in plan for v in node.inputs[:2])):
                # TensorRT fuses a residual Add into the Conv when both inputs share one scale
                union(node.inputs[0], node.inputs[1])
            elif node.op_type in SAME_RANGE_OPS and node.inputs and node.inputs[0] in plan:
                for out in node.outputs:
                    if out in plan:
                        union(node.inputs[0], out)
        groups: dict[int, list[ir.Value]] = {}
        for v in members:
            groups.setdefault(id(find(v)), []).append(v)
        return [sorted(g, key=lambda x: x.name or "") for g in groups.values()]

    def _mean_axes(self, plan: dict[ir.Value, list]) -> dict[str, int]:
        axes: dict[str, int] = {}
        for v, uses in plan.items():
            for node, slot in uses:
                if slot == 0 and node.op_type in ("Conv", "Gemm", "MatMul"):
                    rank = len(v.shape) if v.shape is not None else None
                    if node.op_type == "Conv":
                        axes[v.name] = 1
                    elif rank is not None:
                        axes[v.name] = rank - 1
                    break
        return axes


def output_heads(graph: ir.Graph, decode_only: bool) -> dict[str, ir.Node]:
    """Conv/Gemm/MatMul nodes with a constant weight whose output reaches a graph output through no other
    weighted node — the heads. With ``decode_only``, only those whose path to the output scales by a
    constant (stride/anchor ``Mul``/``Div``) or takes a ``Pow``/``Exp``: their outputs are decoded into
    coordinates (or de-standardized values), where int8 rounding of the head's input becomes pixels of
    box error. A bias ``Add`` alone does not count."""
    heads: dict[str, ir.Node] = {}
    for i, node in enumerate(graph):
        if not is_onnx(node, "Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        if len(node.inputs) < 2 or not is_weight(node.inputs[1]):
            continue
        stack, seen = [node.outputs[0]], set()
        reaches, decodes, pure = False, False, True
        while stack and pure:
            v = stack.pop()
            reaches |= v.is_graph_output()
            for user, _slot in v.uses():
                if id(user) in seen:
                    continue
                seen.add(id(user))
                if not is_onnx(user, *_PASS_OPS):
                    pure = False  # another weighted (or unknown) op reads it: not a head
                    break
                if user.op_type in ("Pow", "Exp") or (user.op_type in _SCALE_OPS and any(
                        v2 is not None and v2.const_value is not None and v2.const_value.size > 0
                        for v2 in user.inputs)):
                    decodes = True
                stack.extend(user.outputs)
        if reaches and pure and (decodes or not decode_only):
            heads[node.name or f"#{i}"] = node
    return heads


def softmax_region(graph: ir.Graph) -> set[int]:
    """Nodes between an attention score and its Softmax (mask/bias adds, scaling): numerically
    sensitive — masks hold huge negatives or -inf that no 8-bit range represents."""
    region: set[int] = set()
    stack = [n for n in graph if is_onnx(n, "Softmax", "LogSoftmax")]
    while stack:
        node = stack.pop()
        for v in node.inputs:
            p = v.producer() if v is not None else None
            if p is not None and id(p) not in region and is_onnx(p, *_ELEMENTWISE):
                region.add(id(p))
                stack.append(p)
    return region
