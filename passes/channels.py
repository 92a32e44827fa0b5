"""Channel-group analysis on an ONNX graph: which channels must be cut together.

A *channel space* is one axis of a tensor (axis 1 of an NCHW activation, the last axis of a ``[N, K]``
or ``[B, T, K]`` activation). Every tracked value gets a :class:`Layout`: its channel axis is the
concatenation of *segments*, each a contiguous range of one atomic :class:`Group`, and each channel may
span ``inner`` consecutive indices (a ``Flatten`` of ``[N, C, H, W]`` gives ``inner = H·W``: channel ×
spatial blocks). Atomic groups are merged with union–find when two layouts must index the same channels
(residual ``Add``/``Sub``/``Mul``, elementwise ops); ``Concat`` on the channel axis concatenates segment
lists (channel offsets), ``Split`` takes sub-ranges of them.

Walking the main graph once in topological order, every node is classified:

* **producer** (Conv/ConvTranspose with group 1, Gemm, MatMul with a constant 2-D weight): its output
  channels start a fresh group; the weight's output axis and the bias are *cuts* following that group;
* **consumer** (the same ops, on their input): the weight's input axis is a cut following the input's
  layout (and the op is a candidate for least-squares reconstruction);
* **pass-through** (BatchNormalization, InstanceNormalization, unary elementwise ops, Clip, pooling, Pad
  with zero channel padding, Resize with channel scale 1, Q/DQ, Dropout, Identity, Cast, depthwise and
  grouped Conv/ConvTranspose with as many outputs as inputs per group): the output has the input's
  layout; per-channel parameters are cuts; group counts are fixed after the cut;
* **merge** (Add, Sub, Mul, Div, Max, Min, Sum, Mean, PRelu, Pow; Concat on another axis): input layouts
  are unified; constants broadcast along the channel axis are cut;
* **anything else** that reads a tracked value blocks the groups it reads, with the reason
  (``used by Transpose``, ``reaches a graph output``, ...).

Weights are read by shape only here (house rule 3); nothing is changed. A group also blocks when one of
its parameters is shared with another node (house rule 4: pruning it would change that node too).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["Seg", "Layout", "Group", "Cut", "Fix", "MacNode", "Consumer", "ChannelGraph", "analyze"]

_ONNX = ("", "ai.onnx")

UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Softplus",
    "Softsign", "Mish", "Gelu", "Erf", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil",
    "Round", "Sign", "Sin", "Cos", "ThresholdedRelu", "Identity", "Cast", "Clip", "Dropout",
})
MERGE = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "PRelu", "Pow"})
POOL = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})


@dataclasses.dataclass(frozen=True)
class Seg:
    """Channels ``[start, start+length)`` of atomic group ``group``."""

    group: int
    start: int
    length: int


@dataclasses.dataclass
class Layout:
    """How the channel axis ``axis`` of a value maps to groups (see the module docstring)."""

    axis: int
    segs: list[Seg]
    inner: int = 1

    @property
    def channels(self) -> int:
        return sum(s.length for s in self.segs)


@dataclasses.dataclass
class Group:
    """An atomic channel group (a union–find root holds the merged facts)."""

    size: int
    reasons: list[str] = dataclasses.field(default_factory=list)
    unit: int = 1
    label: str = ""
    # ranges (start, length) that must keep at least one channel (Split outputs)
    min_ranges: list[tuple[int, int]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Cut:
    """Input ``index`` of ``node`` (a constant) loses entries along ``axis`` following ``layout``.

    ``role`` is ``out`` (a producer's output channels or a pass-through parameter) or ``in`` (a consumer's
    input channels)."""

    node: ir.Node
    index: int
    axis: int
    layout: Layout
    role: str


@dataclasses.dataclass
class Fix:
    """A non-weight edit after the cut: ``kind`` is ``group`` (Conv group count), ``split`` (sizes of a
    channel Split; ``layouts`` are its outputs') or ``reshape`` (shape constant of a flattening Reshape)."""

    kind: str
    node: ir.Node
    layouts: list[Layout]
    unit: int = 1


@dataclasses.dataclass
class MacNode:
    """A node with MACs and the layouts of its input and output channels (None: not tracked)."""

    node: ir.Node
    macs: int
    in_layout: Layout | None
    out_layout: Layout | None
    passthrough: bool = False  # depthwise: the MACs scale with one kept fraction, not two


@dataclasses.dataclass
class Consumer:
    """A Conv (group 1)/Gemm/MatMul reading a tracked value through its weight (for ``act`` importance
    and least-squares reconstruction). ``out_layout`` is its own output layout."""

    node: ir.Node
    value: ir.Value
    layout: Layout
    weight_axis: int
    out_layout: Layout | None


def _is_onnx(node: ir.Node) -> bool:
    return node.domain in _ONNX


def const_of(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The constant behind ``value`` (an initializer that is not an overridable graph input)."""
    if value is None or value.is_graph_input():
        return None
    return value.const_value


def _const_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    t = const_of(value)
    if t is None:
        return None
    return tuple(int(d) for d in t.shape.numpy())


def _rank(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return len(value.shape)


def _dim(value: ir.Value | None, axis: int) -> int | None:
    if value is None or value.shape is None or axis >= len(value.shape) or axis < -len(value.shape):
        return None
    d = value.shape[axis]
    return d if isinstance(d, int) else None


def _small_ints(value: ir.Value | None, limit: int = 64) -> list[int] | None:
    t = const_of(value)
    if t is None or t.size > limit:
        return None
    try:
        return [int(x) for x in np.asarray(t.numpy()).reshape(-1)]
    except Exception:
        return None


def _small_floats(value: ir.Value | None, limit: int = 64) -> list[float] | None:
    t = const_of(value)
    if t is None or t.size > limit:
        return None
    try:
        return [float(x) for x in np.asarray(t.numpy()).reshape(-1)]
    except Exception:
        return None


class ChannelGraph:
    """The result of :func:`analyze`: groups, layouts, cuts, fixes, MAC nodes and consumers."""

    def __init__(self, model: ir.Model, excluded: Callable[[ir.Node], bool] | None = None) -> None:
        self.model = model
        self.graph = model.graph
        self.excluded = excluded or (lambda n: False)
        self.groups: list[Group] = []
        self.parent: list[int] = []
        self.layouts: dict[ir.Value, Layout] = {}
        self.cuts: list[Cut] = []
        self.fixes: list[Fix] = []
        self.mac_nodes: list[MacNode] = []
        self.consumers: list[Consumer] = []

    # ---- union–find -------------------------------------------------------------------------------
    def new_group(self, size: int, label: str, reason: str | None = None) -> int:
        gid = len(self.groups)
        self.groups.append(Group(size=size, label=label))
        self.parent.append(gid)
        if reason:
            self.groups[gid].reasons.append(reason)
        return gid

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        ga, gb = self.groups[ra], self.groups[rb]
        self.parent[rb] = ra
        ga.reasons += [r for r in gb.reasons if r not in ga.reasons]
        ga.unit = ga.unit * gb.unit // math.gcd(ga.unit, gb.unit)
        ga.min_ranges += gb.min_ranges
        return ra

    def group(self, g: int) -> Group:
        return self.groups[self.find(g)]

    def block(self, layout: Layout | None, reason: str) -> None:
        if layout is None:
            return
        for s in layout.segs:
            g = self.group(s.group)
            if reason not in g.reasons:
                g.reasons.append(reason)

    def roots(self) -> list[int]:
        return [g for g in range(len(self.groups)) if self.find(g) == g]

    def segs(self, layout: Layout) -> list[Seg]:
        """The layout's segments with groups resolved to their roots."""
        return [Seg(self.find(s.group), s.start, s.length) for s in layout.segs]

    def full_layout(self, gid: int, axis: int) -> Layout:
        return Layout(axis, [Seg(gid, 0, self.groups[gid].size)])

    # ---- helpers -------------------------------------------------------------------------------------
    def _unify(self, a: Layout, b: Layout) -> Layout | None:
        if a.inner != b.inner:
            return None
        sa, sb = self.segs(a), self.segs(b)
        if [(s.group, s.start, s.length) for s in sa] == [(s.group, s.start, s.length) for s in sb]:
            return a
        if len(sa) != len(sb):
            return None
        for x, y in zip(sa, sb):
            gx, gy = self.groups[x.group], self.groups[y.group]
            if not (x.start == y.start == 0 and x.length == y.length == gx.size == gy.size):
                return None
        for x, y in zip(sa, sb):
            self.union(x.group, y.group)
        return a

    def _cut_param(self, node: ir.Node, slot: int, axis: int, lay: Layout, blocked: Layout | None = None) -> None:
        """Cut the per-channel parameter in ``slot`` of ``node`` along ``axis`` with ``lay``, or block the
        group (``blocked``, default ``lay``) with the reason it cannot be cut."""
        why = self._param_ok(node, slot)
        if why:
            self.block(blocked if blocked is not None else lay, why)
        else:
            self.cuts.append(Cut(node, slot, axis, lay, "out"))

    def _param_ok(self, node: ir.Node, index: int) -> str | None:
        """None if input ``index`` of ``node`` is a constant only ``node`` uses, else the reason."""
        v = node.inputs[index] if index < len(node.inputs) else None
        if v is None:
            return None
        if const_of(v) is None:
            return f"{node.op_type} parameter is not constant"
        if v.is_graph_output():
            return "parameter is a graph output"
        users = {id(u.node) for u in v.uses()}
        if len(users) > 1:
            return "weight shared with another node"
        return None

    def _weight_cuts(self, node: ir.Node, index: int, axis: int) -> tuple[list[tuple[ir.Node, int, int]], str | None]:
        """Where cutting ``axis`` of input ``index`` lands: the constant itself, or through a
        DequantizeLinear of a constant its quantized tensor (and a per-axis scale/zero point)."""
        v = node.inputs[index]
        reason = self._param_ok(node, index)
        if reason is None:
            return [(node, index, axis)], None
        prod = v.producer() if v is not None else None
        if (prod is not None and _is_onnx(prod) and prod.op_type == "DequantizeLinear" and const_of(v) is None
                and prod.graph is self.graph and len(v.uses()) == 1 and not v.is_graph_output()):
            sub = [(prod, 0, axis)]
            why = self._param_ok(prod, 0)
            if why:
                return [], why
            qaxis = prod.attributes.get_int("axis", 1)
            rank = len(_const_shape(prod.inputs[0]) or ())
            qaxis = qaxis + rank if qaxis < 0 else qaxis
            for j in (1, 2):
                if j < len(prod.inputs) and prod.inputs[j] is not None:
                    shp = _const_shape(prod.inputs[j])
                    if shp is None:
                        return [], "DequantizeLinear scale is not constant"
                    if int(np.prod(shp)) > 1:
                        if len(shp) != 1 or qaxis != axis:
                            if qaxis == axis:
                                return [], "blocked DequantizeLinear weight"
                            continue
                        why = self._param_ok(prod, j)
                        if why:
                            return [], why
                        sub.append((prod, j, 0))
            return sub, None
        return [], reason

    def _cut_weight(self, node: ir.Node, axis: int, layout: Layout, role: str) -> None:
        """Cut ``axis`` of the node's weight (input 1) with ``layout``, or block the layout's groups."""
        places, why = self._weight_cuts(node, 1, axis)
        if why:
            self.block(layout, why)
            return
        for n, i, ax in places:
            self.cuts.append(Cut(n, i, ax, layout, role))

    def _fresh(self, node: ir.Node, size: int, axis: int, reason: str | None = None) -> Layout:
        if reason is None and self.excluded(node):
            reason = "excluded by option"
        if reason is None and size <= 1:
            reason = "a single channel"
        gid = self.new_group(size, node.name or node.op_type, reason)
        return self.full_layout(gid, axis)

    def _block_inputs(self, node: ir.Node, reason: str) -> None:
        for v in node.inputs:
            if v is not None and v in self.layouts:
                self.block(self.layouts[v], reason)

    def _node_macs(self, node: ir.Node) -> int:
        from onnxshrink.model import _node_macs  # MACs are counted the way model_stats counts them

        try:
            return int(_node_macs(node) or 0)
        except Exception:
            return 0

    # ---- the walk --------------------------------------------------------------------------------------
    def run(self) -> ChannelGraph:
        for node in self.graph:
            if not _is_onnx(node):
                self._block_inputs(node, f"used by custom op {node.domain}::{node.op_type}")
                continue
            handler = getattr(self, f"_op_{node.op_type}", None)
            if handler is None:
                if node.op_type in UNARY:
                    handler = self._unary
                elif node.op_type in MERGE:
                    handler = self._merge
                elif node.op_type in POOL:
                    handler = self._pool
            if handler is None:
                self._block_inputs(node, f"used by {node.op_type}")
                continue
            handler(node)
            if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
                self._block_inputs(node, f"used by {node.op_type} with subgraphs")
        for v, layout in self.layouts.items():
            if v.is_graph_output():
                self.block(layout, "reaches a graph output")
            for use in v.uses():
                if use.node.graph is not self.graph:
                    self.block(layout, "used inside a subgraph")
        return self

    def _unary(self, node: ir.Node) -> None:
        x = node.inputs[0] if node.inputs else None
        if x is None or x not in self.layouts:
            return
        for extra in node.inputs[1:]:
            if extra is None:
                continue
            c = const_of(extra)
            scalar = (c.size <= 1) if c is not None else (
                extra.shape is not None and all(isinstance(d, int) and d == 1 for d in extra.shape))
            if not scalar:
                self.block(self.layouts[x], f"{node.op_type} with a non-scalar extra input")
                break
        if node.op_type == "Dropout" and len(node.outputs) > 1 and node.outputs[1].uses():
            self.block(self.layouts[x], "Dropout mask is used")
        self.layouts[node.outputs[0]] = self.layouts[x]

    def _pool(self, node: ir.Node) -> None:
        x = node.inputs[0]
        if x is None or x not in self.layouts:
            return
        lay = self.layouts[x]
        if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
            self.block(lay, f"{node.op_type} indices are used")
        if lay.axis != 1 or lay.inner != 1:
            self.block(lay, f"{node.op_type} over a non-channel axis")
        self.layouts[node.outputs[0]] = lay

    def _merge(self, node: ir.Node) -> None:
        out = node.outputs[0]
        R = _rank(out)
        tracked = [(i, v) for i, v in enumerate(node.inputs) if v is not None and v in self.layouts]
        if not tracked:
            return
        if R is None:
            for _, v in tracked:
                self.block(self.layouts[v], f"{node.op_type} with unknown rank")
            return
        layouts = []
        axes = set()
        for i, v in tracked:
            lay = self.layouts[v]
            r = _rank(v)
            axes.add(None if r is None else lay.axis + (R - r))
            layouts.append(lay)
        result: Layout | None = layouts[0]
        if len(axes) != 1 or None in axes:
            result = None
        else:
            for lay in layouts[1:]:
                result = self._unify(result, lay) if result is not None else None
        if result is None:
            for lay in layouts:
                self.block(lay, f"{node.op_type} over misaligned channel ranges")
            self.layouts[out] = layouts[0]
            return
        out_axis = axes.pop()
        out_layout = Layout(out_axis, result.segs, result.inner)
        C = out_layout.channels * out_layout.inner
        for i, v in enumerate(node.inputs):
            if v is None or v in self.layouts:
                continue
            r = _rank(v)
            shp = _const_shape(v)
            if shp is not None:
                r = len(shp)
            if r is None:
                self.block(out_layout, f"{node.op_type} with an operand of unknown rank")
                continue
            ax = out_axis - (R - r)
            if ax < 0:
                continue  # broadcast along the channel axis
            d = shp[ax] if shp is not None else _dim(v, ax)
            if d == 1:
                continue
            if shp is not None and d == C:
                self._cut_param(node, i, ax, Layout(ax, out_layout.segs, out_layout.inner), blocked=out_layout)
                continue
            self.block(out_layout, f"{node.op_type} with an untracked full-channel operand")
        self.layouts[out] = out_layout

    def _op_BatchNormalization(self, node: ir.Node) -> None:
        x = node.inputs[0]
        if x is None or x not in self.layouts:
            return
        lay = self.layouts[x]
        if lay.axis != 1 or lay.inner != 1:
            self.block(lay, "BatchNormalization over another axis")
        if node.attributes.get_int("training_mode", 0) or any(o.uses() for o in node.outputs[1:]):
            self.block(lay, "BatchNormalization in training mode")
        for i in range(1, min(5, len(node.inputs))):
            self._cut_param(node, i, 0, lay)
        self.layouts[node.outputs[0]] = lay

    def _op_InstanceNormalization(self, node: ir.Node) -> None:
        x = node.inputs[0]
        if x is None or x not in self.layouts:
            return
        lay = self.layouts[x]
        for i in (1, 2):
            self._cut_param(node, i, 0, lay)
        self.layouts[node.outputs[0]] = lay

    def _qdq(self, node: ir.Node) -> None:
        x = node.inputs[0]
        if x is None or x not in self.layouts:
            return
        lay = self.layouts[x]
        R = _rank(x)
        qaxis = node.attributes.get_int("axis", 1)
        if R is not None and qaxis < 0:
            qaxis += R
        for j in (1, 2):
            if j < len(node.inputs) and node.inputs[j] is not None:
                shp = _const_shape(node.inputs[j])
                if shp is None:
                    self.block(lay, f"{node.op_type} scale is not constant")
                elif int(np.prod(shp)) > 1:
                    if qaxis != lay.axis or len(shp) != 1:
                        self.block(lay, f"{node.op_type} blocked over a non-channel axis")
                        continue
                    self._cut_param(node, j, 0, lay)
        self.layouts[node.outputs[0]] = lay

    _op_QuantizeLinear = _qdq
    _op_DequantizeLinear = _qdq

    def _op_Pad(self, node: ir.Node) -> None:
        x = node.inputs[0]
        if x is None or x not in self.layouts:
            return
        lay = self.layouts[x]
        R = _rank(x)
        pads = _small_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        if pads is None and len(node.inputs) <= 1:
            pads = list(node.attributes.get_ints("pads", []) or [])
        axes = _small_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        if pads is None or R is None:
            self.block(lay, "Pad with non-constant pads")
        else:
            axes = list(range(R)) if axes is None else [a + R if a < 0 else a for a in axes]
            n = len(axes)
            for k, a in enumerate(axes):
                if a == lay.axis and (pads[k] != 0 or pads[k + n] != 0):
                    self.block(lay, "Pad on the channel axis")
        self.layouts[node.outputs[0]] = lay

    def _op_Resize(self, node: ir.Node) -> None:
        x = node.inputs[0]
        if x is None or x not in self.layouts:
            return
        lay = self.layouts[x]
        scales = _small_floats(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        sizes_given = len(node.inputs) > 3 and node.inputs[3] is not None
        if sizes_given or scales is None or lay.axis >= len(scales) or scales[lay.axis] != 1.0:
            self.block(lay, "Resize with sizes or a channel scale")
        self.layouts[node.outputs[0]] = lay

    def _op_Upsample(self, node: ir.Node) -> None:
        x = node.inputs[0]
        if x is None or x not in self.layouts:
            return
        lay = self.layouts[x]
        scales = _small_floats(node.inputs[1]) if len(node.inputs) > 1 else None
        if scales is None or lay.axis >= len(scales) or scales[lay.axis] != 1.0:
            self.block(lay, "Upsample with a channel scale")
        self.layouts[node.outputs[0]] = lay

    def _op_Conv(self, node: ir.Node) -> None:
        self._conv(node, transpose=False)

    def _op_ConvTranspose(self, node: ir.Node) -> None:
        self._conv(node, transpose=True)

    def _conv(self, node: ir.Node, transpose: bool) -> None:
        x = node.inputs[0]
        in_lay = self.layouts.get(x) if x is not None else None
        wshape = _const_shape(node.inputs[1]) if len(node.inputs) > 1 else None
        wv = node.inputs[1] if len(node.inputs) > 1 else None
        if wshape is None and wv is not None and wv.producer() is not None and wv.producer().op_type == "DequantizeLinear":
            wshape = _const_shape(wv.producer().inputs[0])
        g = node.attributes.get_int("group", 1)
        op = node.op_type
        if wshape is None or len(wshape) < 3:
            self.block(in_lay, f"{op} weight is not constant")
            if wshape is None:
                return
        if transpose:
            C_in, M = wshape[0], wshape[1] * g
            in_axis, out_axis_w = 0, 1
        else:
            C_in, M = wshape[1] * g, wshape[0]
            in_axis, out_axis_w = 1, 0
        if in_lay is not None and (in_lay.axis != 1 or in_lay.inner != 1 or in_lay.channels != C_in):
            self.block(in_lay, f"{op} input channels do not match")
            in_lay = None
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        macs = self._node_macs(node)
        if g == 1:
            if in_lay is not None:
                self._cut_weight(node, in_axis, in_lay, "in")
            out_lay = self._fresh(node, M, 1)
            self._cut_weight(node, out_axis_w, out_lay, "out")
            if has_bias:
                self._cut_param(node, 2, 0, out_lay)
            self.layouts[node.outputs[0]] = out_lay
            self.mac_nodes.append(MacNode(node, macs, in_lay, out_lay))
            if in_lay is not None and not transpose:
                self.consumers.append(Consumer(node, x, in_lay, in_axis, out_lay))
            return
        # grouped: keep whole conv groups when every group has as many outputs as inputs
        k = C_in // g
        m = M // g
        if in_lay is None or k != m:
            reason = f"grouped {op} (group={g}) with {k} inputs and {m} outputs per group" if in_lay is not None \
                else f"grouped {op} over an untracked input"
            self.block(in_lay, reason)
            self.layouts[node.outputs[0]] = self._fresh(node, M, 1, reason)
            self.mac_nodes.append(MacNode(node, macs, None, self.layouts[node.outputs[0]]))
            return
        if self.excluded(node):
            self.block(in_lay, "excluded by option")
        if k > 1:
            for s in self.segs(in_lay):
                if s.start % k or s.length % k:
                    self.block(in_lay, f"grouped {op} over channel ranges not aligned to its groups")
                    break
                grp = self.groups[s.group]
                grp.unit = grp.unit * k // math.gcd(grp.unit, k)
        self._cut_weight(node, 0, in_lay, "out")
        if has_bias:
            self._cut_param(node, 2, 0, in_lay)
        self.fixes.append(Fix("group", node, [in_lay], unit=k))
        self.layouts[node.outputs[0]] = in_lay
        self.mac_nodes.append(MacNode(node, macs, in_lay, in_lay, passthrough=True))

    def _op_Gemm(self, node: ir.Node) -> None:
        a = node.inputs[0]
        in_lay = self.layouts.get(a) if a is not None else None
        wv = node.inputs[1]
        wshape = _const_shape(wv)
        if wshape is None and wv is not None and wv.producer() is not None and wv.producer().op_type == "DequantizeLinear":
            wshape = _const_shape(wv.producer().inputs[0])
        transA = node.attributes.get_int("transA", 0)
        transB = node.attributes.get_int("transB", 0)
        if wshape is None or len(wshape) != 2 or transA:
            self.block(in_lay, "Gemm with transA or a non-constant weight")
            return
        K, N = (wshape[1], wshape[0]) if transB else (wshape[0], wshape[1])
        in_axis_w, out_axis_w = (1, 0) if transB else (0, 1)
        if in_lay is not None and (in_lay.axis != 1 or in_lay.channels * in_lay.inner != K):
            self.block(in_lay, "Gemm input channels do not match")
            in_lay = None
        if in_lay is not None:
            self._cut_weight(node, in_axis_w, in_lay, "in")
        out_lay = self._fresh(node, N, 1)
        self._cut_weight(node, out_axis_w, out_lay, "out")
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is not None:
            cshape = _const_shape(c)
            if cshape is None:
                self.block(out_lay, "Gemm bias is not constant")
            elif cshape and cshape[-1] == N and N > 1:
                self._cut_param(node, 2, len(cshape) - 1, out_lay)
        self.layouts[node.outputs[0]] = out_lay
        self.mac_nodes.append(MacNode(node, self._node_macs(node), in_lay, out_lay))
        if in_lay is not None:
            self.consumers.append(Consumer(node, a, in_lay, in_axis_w, out_lay))

    def _op_MatMul(self, node: ir.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        in_lay = self.layouts.get(a) if a is not None else None
        bshape = _const_shape(b)
        R = _rank(a)
        if b is not None and b in self.layouts:
            self.block(self.layouts[b], "MatMul with a non-constant right operand")
        if bshape is None or len(bshape) != 2 or R is None or R < 2:
            self.block(in_lay, "MatMul with a non-constant or batched weight")
            return
        K, N = bshape
        if in_lay is not None and (in_lay.axis != R - 1 or in_lay.channels * in_lay.inner != K):
            self.block(in_lay, "MatMul input channels do not match")
            in_lay = None
        if in_lay is not None:
            self._cut_weight(node, 0, in_lay, "in")
        out_lay = self._fresh(node, N, R - 1)
        self._cut_weight(node, 1, out_lay, "out")
        self.layouts[node.outputs[0]] = out_lay
        self.mac_nodes.append(MacNode(node, self._node_macs(node), in_lay, out_lay))
        if in_lay is not None:
            self.consumers.append(Consumer(node, a, in_lay, 0, out_lay))

    def _op_Flatten(self, node: ir.Node) -> None:
        x = node.inputs[0]
        if x is None or x not in self.layouts:
            return
        lay = self.layouts[x]
        R = _rank(x)
        axis = node.attributes.get_int("axis", 1)
        if R is not None and axis < 0:
            axis += R
        self._flatten(node, lay, axis, R)

    def _flatten(self, node: ir.Node, lay: Layout, axis: int, R: int | None) -> bool:
        x = node.inputs[0]
        if R is None or axis != lay.axis:
            self.block(lay, f"{node.op_type} that does not start at the channel axis")
            return False
        rest = [_dim(x, i) for i in range(axis + 1, R)]
        if any(d is None for d in rest):
            self.block(lay, f"{node.op_type} over dynamic spatial dims")
            return False
        inner = lay.inner * int(np.prod(rest, dtype=np.int64))
        self.layouts[node.outputs[0]] = Layout(1, lay.segs, inner)
        return True

    def _op_Reshape(self, node: ir.Node) -> None:
        x = node.inputs[0]
        if x is None or x not in self.layouts:
            return
        lay = self.layouts[x]
        shape = _small_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        R = _rank(x)
        out = node.outputs[0]
        if shape is None or len(shape) != 2 or R is None or lay.axis != 1:
            self.block(lay, "Reshape other than a flatten from the channel axis")
            return
        rest = [_dim(x, i) for i in range(2, R)]
        if any(d is None for d in rest):
            self.block(lay, "Reshape over dynamic spatial dims")
            return
        K = lay.channels * lay.inner * int(np.prod(rest, dtype=np.int64))
        d0 = _dim(x, 0)
        ok = (shape[1] in (-1, K)) and (shape[0] in (0,) or (d0 is not None and shape[0] == d0) or
                                        (shape[0] == -1 and shape[1] == K))
        if not ok or _dim(out, 1) not in (None, K):
            self.block(lay, "Reshape other than a flatten from the channel axis")
            return
        if shape[1] == K or shape[0] == -1:
            why = self._param_ok(node, 1)
            if why:
                self.block(lay, why)
                return
        if self._flatten(node, lay, 1, R):
            if shape[1] == K:
                self.fixes.append(Fix("reshape", node, [self.layouts[out]]))

    def _op_Concat(self, node: ir.Node) -> None:
        out = node.outputs[0]
        R = _rank(out)
        axis = node.attributes.get_int("axis", 0)
        if R is not None and axis < 0:
            axis += R
        tracked = [v for v in node.inputs if v is not None and v in self.layouts]
        if not tracked:
            return
        lays = [self.layouts[v] for v in tracked]
        if R is None or any(_rank(v) != R for v in node.inputs if v is not None):
            for lay in lays:
                self.block(lay, "Concat with unknown ranks")
            return
        if all(lay.axis == axis for lay in lays):
            segs: list[Seg] = []
            for v in node.inputs:
                if v is None:
                    continue
                lay = self.layouts.get(v)
                if lay is None or lay.inner != 1:
                    d = _dim(v, axis)
                    if d is None:
                        for lay2 in lays:
                            self.block(lay2, "Concat with an input of unknown channel count")
                        return
                    if lay is not None:
                        self.block(lay, "Concat of flattened channels")
                    lay = self._fresh(node, d, axis, "Concat with an untracked input")
                segs += lay.segs
            self.layouts[out] = Layout(axis, segs, 1)
            return
        if any(lay.axis == axis for lay in lays):
            for lay in lays:
                self.block(lay, "Concat mixing channel and other axes")
            return
        self._merge_like(node, lays)

    def _merge_like(self, node: ir.Node, lays: list[Layout]) -> None:
        result: Layout | None = lays[0]
        for lay in lays[1:]:
            result = self._unify(result, lay) if result is not None and result.axis == lay.axis else None
        if result is None or any(v not in self.layouts for v in node.inputs if v is not None):
            for lay in lays:
                self.block(lay, f"{node.op_type} over misaligned channels")
            return
        self.layouts[node.outputs[0]] = result

    def _op_Split(self, node: ir.Node) -> None:
        x = node.inputs[0]
        if x is None or x not in self.layouts:
            return
        lay = self.layouts[x]
        R = _rank(x)
        axis = node.attributes.get_int("axis", 0)
        if R is not None and axis < 0:
            axis += R
        if axis != lay.axis:
            for o in node.outputs:
                self.layouts[o] = lay
            return
        if lay.inner != 1:
            self.block(lay, "Split of flattened channels")
            return
        C = lay.channels
        sizes = None
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            sizes = _small_ints(node.inputs[1])
        elif node.attributes.get("split") is not None:
            sizes = list(node.attributes.get_ints("split"))
        else:
            n = len(node.outputs)
            if C % n == 0:
                sizes = [C // n] * n
        if sizes is None or sum(sizes) != C or len(sizes) != len(node.outputs):
            self.block(lay, "Split with unknown sizes")
            return
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            why = self._param_ok(node, 1)
            if why:
                self.block(lay, why)
                return
        out_lays = []
        start = 0
        for o, size in zip(node.outputs, sizes):
            sub = self._slice_segs(lay.segs, start, size)
            out_lays.append(Layout(axis, sub, 1))
            self.layouts[o] = out_lays[-1]
            for s in sub:
                self.groups[s.group].min_ranges.append((s.start, s.length))
            start += size
        self.fixes.append(Fix("split", node, out_lays))

    @staticmethod
    def _slice_segs(segs: list[Seg], start: int, size: int) -> list[Seg]:
        out = []
        pos = 0
        end = start + size
        for s in segs:
            a, b = pos, pos + s.length
            lo, hi = max(a, start), min(b, end)
            if lo < hi:
                out.append(Seg(s.group, s.start + lo - a, hi - lo))
            pos = b
        return out

    def _op_Slice(self, node: ir.Node) -> None:
        x = node.inputs[0]
        if x is None or x not in self.layouts:
            return
        lay = self.layouts[x]
        R = _rank(x)
        axes = _small_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        if axes is None and len(node.inputs) > 1:
            starts = _small_ints(node.inputs[1])
            axes = list(range(len(starts))) if starts is not None else None
        if axes is None or R is None or lay.axis in [a + R if a < 0 else a for a in axes]:
            self.block(lay, "Slice on the channel axis")
            return
        self.layouts[node.outputs[0]] = lay

    # ---- queries ------------------------------------------------------------------------------------------
    def group_reasons(self) -> dict[int, list[str]]:
        return {g: list(self.groups[g].reasons) for g in self.roots()}

    def values_of(self, root: int) -> list[ir.Value]:
        return [v for v, lay in self.layouts.items() if any(self.find(s.group) == root for s in lay.segs)]


def analyze(model: ir.Model, excluded: Callable[[ir.Node], bool] | None = None) -> ChannelGraph:
    """Channel groups of ``model``'s main graph (value shapes must be inferred)."""
    return ChannelGraph(model, excluded).run()


def layout_indices(cg: ChannelGraph, layout: Layout, keep: dict[int, np.ndarray]) -> np.ndarray:
    """Indices kept along ``layout``'s axis, given kept channels per root group (absent: all kept)."""
    idx = []
    offset = 0
    for s in cg.segs(layout):
        k = keep.get(s.group)
        if k is None:
            sel = np.arange(s.length)
        else:
            sel = k[(k >= s.start) & (k < s.start + s.length)] - s.start
        idx.append(sel + offset)
        offset += s.length
    ch = np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)
    if layout.inner == 1:
        return ch.astype(np.int64)
    return (ch[:, None] * layout.inner + np.arange(layout.inner)[None, :]).reshape(-1).astype(np.int64)


def kept_count(cg: ChannelGraph, layout: Layout, keep_n: dict[int, Any]) -> float:
    """Fraction of the layout's channels kept, for MAC estimates (``keep_n``: root → kept count or
    index array)."""
    tot = 0.0
    for s in cg.segs(layout):
        k = keep_n.get(s.group)
        if k is None:
            tot += s.length
        elif isinstance(k, np.ndarray):
            tot += int(((k >= s.start) & (k < s.start + s.length)).sum())
        else:
            tot += s.length * k / cg.groups[s.group].size
    return tot / max(layout.channels, 1)


def _iter_unique(items: Iterable[Any]) -> list[Any]:
    seen = set()
    out = []
    for x in items:
        if id(x) not in seen:
            seen.add(id(x))
            out.append(x)
    return out
