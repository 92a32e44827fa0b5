"""fold: exact graph simplification — constant folding, no-op and dead-code removal, BatchNorm fusion.

Every rewrite here is exact up to float rounding (validated at rel-L2 ≤ 1e-5):

* **Constants to initializers.** ``Constant`` nodes (how Paddle/TF/old exporters store weights) become
  initializers of their graph, so every later pass sees weights the same way.
* **Constant folding** (through onnxscript's public folder, behind :func:`_fold_constants`): a node whose
  inputs are all constant is evaluated and replaced by an initializer **only if the model does not grow**:
  ``bytes(outputs) − bytes(inputs used only by this node) − bytes(the node itself) ≤ max_growth``
  (default 0). Shape subgraphs (``Shape → Gather → Concat → Reshape``) fold where the dims they read are
  static; dynamic axes stay dynamic. Never folded: QuantizeLinear, DequantizeLinear,
  DynamicQuantizeLinear (their int8 weights are the point of quantization), random ops, custom-domain ops
  (opaque; folding continues downstream of them).
* **No-ops removed:** Identity; Dropout (inference, mask unused); Cast/CastLike to the same type;
  Reshape/Flatten/Squeeze/Unsqueeze/Expand whose static output shape equals the input's; identity
  Transpose; Slice covering whole axes; all-zero Pad; single-input Concat; single-output Split;
  ``x+0``, ``x−0``, ``x·1``, ``x/1`` when the constant does not broadcast the output.
* **BatchNorm fusion:** with ``s = γ/√(σ²+ε)``, a Conv/ConvTranspose/Gemm followed by an inference
  BatchNormalization becomes one node with ``W' = W·s`` (along the output-channel axis) and
  ``b' = (b − μ)·s + β``. Preconditions: constant weights and BN parameters, the producer's output used
  only by the BN; new initializers are written, so weights shared elsewhere are never changed.
* **Duplicate initializers** (same dtype, shape and bytes) are merged; **dead code** (nodes and
  initializers nothing uses) is removed.

All of it runs in the main graph and in every If/Loop/Scan body. Initializers that are also graph inputs
(overridable defaults) are not treated as constants.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from onnxshrink.model import constant_tensors, infer_shapes, unique_name
from onnxshrink.registry import ShrinkPass, option, register

__all__ = ["FoldOptions", "FoldPass", "PROTECTED_OPS", "lift_constant"]

logger = logging.getLogger(__name__)

#: Ops that folding and cleanup never evaluate away (the single list, used by every pass).
PROTECTED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
_RANDOM_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)
_ONNX_DOMAINS = ("", "ai.onnx")
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
# Below this many weight bytes, fold measures the serialized size before and after and never grows it.
_EXACT_SIZE_GUARD_BYTES = 64 << 20
# Largest constant (elements) read to decide whether an Add/Mul is a no-op: keeps weights lazy.
_SMALL_CONST = 4096
# Initializers larger than this are compared by sampled slices before being hashed in full (dedup).
_SAMPLE_HASH_BYTES = 1 << 20
_SAMPLE_SLICE = 4096


@dataclasses.dataclass(frozen=True)
class FoldOptions:
    """Options of the fold pass."""

    constants: bool = option(True, "evaluate nodes whose inputs are all constant (never grows the model)")
    noops: bool = option(True, "remove no-op nodes (Identity, Dropout, same-shape Reshape, same-type Cast, ...)")
    fuse_bn: bool = option(True, "fuse BatchNormalization into a preceding Conv/ConvTranspose/Gemm")
    dedup: bool = option(True, "merge initializers with identical dtype, shape and contents")
    max_growth: int = option(0, "bytes one folded node may add to the model (0: folding never grows it)")
    rounds: int = option(4, "maximum rounds of fold → simplify until nothing changes")

    def __post_init__(self) -> None:
        if self.max_growth < 0:
            raise ValueError("max_growth must be >= 0")
        if self.rounds < 1:
            raise ValueError("rounds must be >= 1")


def _is_onnx(node: ir.Node, *ops: str) -> bool:
    return node.domain in _ONNX_DOMAINS and (not ops or node.op_type in ops)


def _const(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The constant tensor behind ``value``: a true initializer (not an overridable input) or None."""
    if value is None or value.is_graph_input():
        return None
    return value.const_value


def _small_array(value: ir.Value | None, limit: int = _SMALL_CONST) -> np.ndarray | None:
    t = _const(value)
    if t is None or t.size > limit:
        return None
    try:
        return t.numpy()
    except Exception:
        return None


def _static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None:
        return None
    dims = tuple(value.shape)
    if all(isinstance(d, int) for d in dims):
        return dims  # type: ignore[return-value]
    return None


def _same_shape(a: ir.Value | None, b: ir.Value | None) -> bool:
    """True if both shapes are known and equal, dim by dim (symbolic dims compared by name)."""
    if a is None or b is None or a.shape is None or b.shape is None:
        return False
    da, db = list(a.shape), list(b.shape)
    if len(da) != len(db):
        return False
    for x, y in zip(da, db):
        if isinstance(x, int) and isinstance(y, int):
            if x != y:
                return False
        elif isinstance(x, int) or isinstance(y, int):
            return False
        elif x.value is None or x.value != y.value:
            return False
    return True


def _tensor_nbytes(value: ir.Value) -> int | None:
    shape = _static_shape(value)
    if shape is None or value.dtype is None:
        return None
    return int(np.prod(shape, dtype=np.int64) * value.dtype.itemsize)


def _node_bytes(node: ir.Node) -> int:
    """A lower estimate of the bytes a NodeProto takes in the file (names and op type)."""
    n = len(node.op_type) + len(node.name or "") + 4
    for v in list(node.inputs) + list(node.outputs):
        n += 2 + (len(v.name) if v is not None and v.name else 0)
    return n


def _new_initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    tensor = ir.tensor(array, dtype=dtype, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


@register("fold", FoldOptions, summary="constant folding, no-op and dead-code removal, BatchNorm fusion (exact)")
class FoldPass(ShrinkPass):
    """Exact simplification of the graph; see the module docstring for the math and preconditions."""

    tolerance = 1e-5

    def run(self, model: ir.Model) -> bool:
        o: FoldOptions = self.options
        self._declined_seen: set[tuple[int, str]] = set()
        guard = o.max_growth == 0 and _weight_bytes(model) <= _EXACT_SIZE_GUARD_BYTES
        snapshot = model.clone() if guard and o.constants else None
        size_before = _size_estimate(model) if guard else 0
        modified = self._rounds(model, fold_constants=o.constants)
        if snapshot is not None and modified and _size_estimate(model) > size_before:
            # Folding traded nodes for bytes somewhere (e.g. a shape computed into a constant that
            # is bigger than the nodes it replaced): redo without the constant folder, which is
            # the only step that can grow the model.
            _restore(model, snapshot)
            self.decline("constant folding would grow the model: redone without it")
            self.counters.clear()
            modified = self._rounds(model, fold_constants=False)
        if modified:
            ir_common.NameFixPass()(model)
        _drop_folder_metadata(model)
        return modified

    def _rounds(self, model: ir.Model, fold_constants: bool) -> bool:
        o: FoldOptions = self.options
        declared = [(g, [(v.type, v.shape) for v in g.outputs]) for g in model.graphs()]
        modified = self._upgrade_old_ir(model)
        modified |= self._lift_constants(model)
        self._infer_shapes(model)
        for round_no in range(o.rounds):
            changed = False
            if fold_constants:
                changed |= self._fold_constants(model)
            if fold_constants:
                changed |= self._fold_shape_reads(model)
                changed |= self._materialize_reshape_shapes(model)
            if o.noops:
                changed |= self._remove_noops(model)
            if o.fuse_bn:
                changed |= self._fuse_batchnorm(model)
            changed |= self._remove_dead(model)
            if o.dedup:
                changed |= self._dedup_initializers(model)
            modified |= changed
            if not changed:
                break
            logger.debug("fold round %d changed the graph", round_no + 1)
        # Inference on opaque ops may drop the declared type of an output: the declaration stands.
        for graph, types in declared:
            for value, (tp, shape) in zip(graph.outputs, types):
                if value.type is None and tp is not None:
                    value.type = tp
                if value.shape is None and shape is not None:
                    value.shape = shape
        return modified

    # -- helpers ---------------------------------------------------------------------------------

    def _decline_once(self, node: ir.Node, reason: str) -> None:
        key = (id(node), reason)
        if key not in self._declined_seen:
            self._declined_seen.add(key)
            self.decline(reason, node)

    def _infer_shapes(self, model: ir.Model) -> None:
        if self.context.cache.pop("shapes_current", False):
            return  # the pipeline inferred shapes on this very graph and nothing changed it since
        try:
            infer_shapes(model)
        except Exception as e:  # custom ops or odd models: fold still works, with fewer shapes known
            self.decline(f"shape inference failed ({type(e).__name__}); shape-based rewrites limited")

    def _bypass(self, graph: ir.Graph, node: ir.Node, src: ir.Value, out: ir.Value) -> bool:
        """Replace ``out`` (an output of ``node``) by ``src`` and remove ``node``. Keeps graph output names."""
        rename = None
        if out.is_graph_output():
            producer = src.producer()
            if (
                src.is_graph_input()
                or src.is_graph_output()
                or src.is_initializer()
                or producer is None
                or producer.graph is not graph
            ):
                self._decline_once(node, f"{node.op_type} feeds a graph output directly from an input or outer scope")
                return False
            rename = out.name
            declared_type, declared_shape = out.type, out.shape
        out.replace_all_uses_with(src, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if rename is not None:
            src.name = rename
            if declared_type is not None:
                src.type = declared_type
            if declared_shape is not None:
                src.shape = declared_shape
        return True

    def _upgrade_old_ir(self, model: ir.Model) -> bool:
        """IR < 4 had to list every initializer as a graph input; runtimes treat them as constants.

        Drop them from the inputs and mark the model IR 4 (which allows that), so they fold like any
        weight. Later IR versions only add features, so the model means the same.
        """
        if model.ir_version is None or model.ir_version >= 4:
            return False
        inputs = model.graph.inputs
        kept = [v for v in inputs if not v.is_initializer()]
        if len(kept) == len(inputs):
            return False
        dropped = len(inputs) - len(kept)
        inputs.clear()
        inputs.extend(kept)
        model.ir_version = 4
        self.count("old_ir_initializer_inputs_dropped", dropped)
        return True

    # -- Constant nodes → initializers -----------------------------------------------------------

    def _lift_constants(self, model: ir.Model) -> bool:
        changed = False
        if model.ir_version is not None and model.ir_version < 4:
            # IR < 4 requires every initializer to be listed as a graph input (an overridable one).
            if any(_is_onnx(n, "Constant") for n in model.graph.all_nodes()):
                self.decline("Constant nodes kept: IR version < 4 would make initializers graph inputs")
            return False
        for graph in model.graphs():
            for node in graph:
                if not _is_onnx(node, "Constant"):
                    continue
                out = node.outputs[0]
                if out.is_graph_output():
                    continue
                if lift_constant(graph, node) is None:
                    self._decline_once(node, "Constant with a sparse or string value kept as a node")
                    continue
                self.count("constants_lifted")
                changed = True
        return changed

    # -- constant folding (adapter over onnxscript's public folder) ------------------------------

    def _should_fold(self, node: ir.Node) -> bool:
        if node.domain not in _ONNX_DOMAINS:
            self._decline_once(node, "custom-domain op is opaque")
            return False
        if node.op_type in PROTECTED_OPS:
            self._decline_once(node, "quantization op kept")
            return False
        if node.op_type in _RANDOM_OPS:
            self._decline_once(node, "random op is not constant")
            return False
        out_bytes = 0
        for out in node.outputs:
            nb = _tensor_nbytes(out)
            if nb is None:
                in_elems = sum(t.size for t in (_const(v) for v in node.inputs) if t is not None)
                if in_elems <= 64:
                    return self._finite_inputs(node)
                self._decline_once(node, "output size unknown: not folded (could grow the model)")
                return False
            out_bytes += nb
        freed = 0
        seen: set[int] = set()
        for v in node.inputs:
            if v is None or id(v) in seen:
                continue
            seen.add(id(v))
            t = _const(v)
            if t is not None and not v.is_graph_output() and all(u.node is node for u in v.uses()):
                freed += t.nbytes
        growth = out_bytes - freed - _node_bytes(node)
        if growth > self.options.max_growth:
            self._decline_once(node, "folding would grow the model")
            return False
        return self._finite_inputs(node)

    def _finite_inputs(self, node: ir.Node) -> bool:
        """False (and a counted decline) if a float constant input holds NaN/Inf: such tensors are left alone.

        Only called for nodes about to be folded, whose inputs the folder reads anyway.
        """
        for v in node.inputs:
            t = _const(v)
            if t is None or t.dtype not in _FLOAT_TYPES:
                continue
            try:
                arr = t.numpy()
                try:
                    finite = bool(np.isfinite(arr).all())
                except TypeError:  # a dtype numpy's isfinite does not take: compare in float32
                    finite = bool(np.isfinite(np.asarray(arr, dtype=np.float32)).all())
            except Exception:
                continue
            if not finite:
                self._decline_once(node, "constant holds NaN/Inf: left alone")
                return False
        return True

    def _fold_constants(self, model: ir.Model) -> bool:
        from onnxscript.optimizer import constant_folding

        before = sum(1 for _ in model.graph.all_nodes())
        opset = model.opset_imports.get("", 0)
        # onnxscript's folder may emit opset-13 forms (Split/Squeeze/Unsqueeze with axes as inputs)
        # when it rewrites sequence ops; at older opsets keep a snapshot to roll back to.
        snapshot = model.clone() if opset < 13 else None
        old_nodes = {id(n) for n in model.graph.all_nodes()}
        folder = constant_folding.FoldConstantsPass(
            shape_inference=False,  # shapes come from one whole-model inference per round (much faster)
            input_size_limit=1 << 62,
            output_size_limit=1 << 62,
            should_fold=self._should_fold,
        )
        try:
            result = folder(model)
        except Exception as e:
            self.decline(f"constant folder error ({type(e).__name__}); folding stopped for this round")
            logger.debug("constant folder failed", exc_info=True)
            if snapshot is not None:
                _restore(model, snapshot)
            return False
        bad = [n for n in model.graph.all_nodes() if id(n) not in old_nodes and not _valid_at_opset(n, model)]
        if bad:
            if snapshot is not None:
                _restore(model, snapshot)
            self.decline(f"constant folder emitted {bad[0].op_type} not valid at opset {opset}; folding undone")
            return False
        after = sum(1 for _ in model.graph.all_nodes())
        if after < before:
            self.count("nodes_folded", before - after)
        return bool(result.modified)

    # -- shape reads on static dims ---------------------------------------------------------------

    def _fold_shape_reads(self, model: ir.Model) -> bool:
        """Replace reads of static dims (Gather/Slice of Shape(x)) by constants; dynamic dims stay."""
        changed = False
        for graph in model.graphs():
            for node in graph:
                if not _is_onnx(node, "Shape") or node.inputs[0] is None or node.inputs[0].shape is None:
                    continue
                dims = list(node.inputs[0].shape)
                start = node.attributes.get_int("start", 0)
                end = node.attributes.get_int("end", len(dims))
                dims = dims[slice(start, end)]
                for use in list(node.outputs[0].uses()):
                    reader = use.node
                    if reader.graph is not graph or not _is_onnx(reader) or use.idx != 0:
                        continue
                    picked = _pick_dims(reader, dims)
                    if picked is None or not all(isinstance(d, int) for d in picked[0]):
                        continue
                    values, scalar = picked
                    out = reader.outputs[0]
                    if out.is_graph_output():
                        continue
                    array = np.array(values[0] if scalar else values, dtype=np.int64)
                    const = _new_initializer(graph, unique_name(f"{out.name}_static", graph.initializers), array)
                    out.replace_all_uses_with(const)
                    graph.remove(reader, safe=True)
                    self.count("shape_reads_folded")
                    changed = True
        return changed

    def _materialize_reshape_shapes(self, model: ir.Model) -> bool:
        """``Reshape(x, Concat(Unsqueeze(Gather(Shape(x), i)), …))`` → ``Reshape(x, const)`` with 0 at i.

        With ``allowzero=0`` a 0 in Reshape's shape copies the input's dim at the same position, so a dim
        read from ``x`` itself at the same index needs no nodes, and dynamic axes stay dynamic.
        """
        changed = False
        for graph in model.graphs():
            for node in graph:
                if not _is_onnx(node, "Reshape") or len(node.inputs) < 2 or node.attributes.get_int("allowzero", 0):
                    continue
                x, shape = node.inputs[0], node.inputs[1]
                concat = shape.producer() if shape is not None else None
                if concat is None or not _is_onnx(concat, "Concat") or concat.graph is not graph:
                    continue
                dims: list[int] = []
                for piece in concat.inputs:
                    const = _small_array(piece, 16)
                    if const is not None and const.ndim == 1:
                        dims.extend(int(d) for d in const)
                        continue
                    index = _copied_dim(piece, x)
                    if index is None or index != len(dims):
                        dims = []
                        break
                    dims.append(0)
                if not dims or dims.count(-1) > 1:
                    continue
                const = _new_initializer(graph, unique_name(f"{shape.name}_static", graph.initializers), np.array(dims, np.int64))
                node.replace_input_with(1, const)
                self.count("reshape_shapes_materialized")
                changed = True
        return changed

    # -- no-op removal ---------------------------------------------------------------------------

    def _remove_noops(self, model: ir.Model) -> bool:
        changed = False
        for graph in model.graphs():
            for node in graph:
                if not _is_onnx(node):
                    continue
                src = self._noop_source(node)
                if src is None:
                    continue
                if self._bypass(graph, node, src, node.outputs[0]):
                    self.count(f"noop_removed.{node.op_type}")
                    changed = True
        return changed

    def _noop_source(self, node: ir.Node) -> ir.Value | None:
        """The input that ``node`` passes through unchanged, or None if it is not a no-op."""
        op = node.op_type
        ins = node.inputs
        if not ins or ins[0] is None:
            return None
        x = ins[0]
        out = node.outputs[0]
        # Extra outputs (Dropout mask, Split parts) must be unused.
        if op != "Split" and any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            return None
        if op == "Identity":
            return x
        if op == "Dropout":
            if len(ins) >= 3 and ins[2] is not None:
                mode = _small_array(ins[2])
                if mode is None or bool(mode):
                    return None
            return x
        if op == "Cast":
            to = node.attributes.get_int("to", -1)
            return x if x.dtype is not None and int(x.dtype) == to else None
        if op == "CastLike":
            return x if len(ins) > 1 and ins[1] is not None and x.dtype is not None and x.dtype == ins[1].dtype else None
        if op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand"):
            if x.dtype == out.dtype and _static_shape(x) is not None and _static_shape(x) == _static_shape(out):
                return x
            if op == "Reshape" and len(ins) > 1:
                target = _small_array(ins[1], 64)
                xs = _static_shape(x)
                if target is not None and xs is not None and tuple(int(t) for t in target) == xs and 0 not in xs:
                    return x
            return None
        if op == "Transpose":
            perm = node.attributes.get_ints("perm", None)
            rank = len(x.shape) if x.shape is not None else None
            if perm is None:
                return x if rank is not None and rank <= 1 else None
            return x if list(perm) == list(range(len(perm))) else None
        if op == "Slice":
            return x if self._slice_is_noop(node) else None
        if op == "Pad":
            if len(ins) > 1:
                pads = _small_array(ins[1], 64)
                return x if pads is not None and not np.any(pads) else None
            pads = node.attributes.get_ints("pads", None)
            return x if pads is not None and not any(pads) else None
        if op == "Concat":
            return x if len([i for i in ins if i is not None]) == 1 else None
        if op == "Split":
            return x if len(node.outputs) == 1 else None
        if op in ("Add", "Sub", "Mul", "Div") and len(ins) == 2:
            neutral = 0.0 if op in ("Add", "Sub") else 1.0
            candidates = [(ins[0], ins[1])]
            if op in ("Add", "Mul"):
                candidates.append((ins[1], ins[0]))
            for keep, const in candidates:
                if keep is None or const is None:
                    continue
                arr = _small_array(const)
                if arr is None or arr.dtype.kind not in "fiu":
                    continue
                if np.all(arr == neutral) and keep.dtype == out.dtype and _same_shape(keep, out):
                    return keep
            return None
        return None

    def _slice_is_noop(self, node: ir.Node) -> bool:
        ins = node.inputs
        shape = _static_shape(ins[0])
        if shape is None or len(ins) < 3:
            return False
        arrays = [_small_array(v, 64) if v is not None else None for v in ins[1:5]]
        starts, ends = arrays[0], arrays[1]
        if starts is None or ends is None:
            return False
        axes = arrays[2] if len(arrays) > 2 and arrays[2] is not None else np.arange(len(starts))
        steps = arrays[3] if len(arrays) > 3 and arrays[3] is not None else np.ones(len(starts), dtype=np.int64)
        if (len(ins) > 3 and ins[3] is not None and arrays[2] is None) or (len(ins) > 4 and ins[4] is not None and arrays[3] is None):
            return False
        for s, e, a, st in zip(starts, ends, axes, steps):
            a = int(a) + (len(shape) if a < 0 else 0)
            if not 0 <= a < len(shape) or int(st) != 1:
                return False
            dim = shape[a]
            s = int(s) + (dim if s < 0 else 0)
            e = int(e) + (dim if e < 0 else 0)
            if max(s, 0) != 0 or min(e, dim) != dim:
                return False
        return True

    # -- BatchNorm fusion ------------------------------------------------------------------------

    def _fuse_batchnorm(self, model: ir.Model) -> bool:
        changed = False
        for graph in model.graphs():
            for bn in graph:
                if not _is_onnx(bn, "BatchNormalization"):
                    continue
                reason = self._try_fuse_bn(graph, bn)
                if reason is None:
                    self.count("batchnorm_fused")
                    changed = True
                elif reason:
                    self._decline_once(bn, f"batchnorm: {reason}")
        return changed

    def _try_fuse_bn(self, graph: ir.Graph, bn: ir.Node) -> str | None:
        """Fuse ``bn`` into its producer; return None on success, else the reason ('' = no candidate)."""
        x = bn.inputs[0]
        prod = x.producer() if x is not None else None
        if prod is None or not _is_onnx(prod, "Conv", "ConvTranspose", "Gemm") or prod.graph is not graph:
            return "not after a Conv/ConvTranspose/Gemm"
        if bn.attributes.get_int("training_mode", 0):
            return "training mode"
        if any(o.uses() or o.is_graph_output() for o in bn.outputs[1:]):
            return "running statistics outputs are used"
        if len(x.uses()) != 1 or x.is_graph_output():
            return f"{prod.op_type} output has other consumers"
        if len(bn.inputs) < 5:
            return "missing parameters"
        params = [_const(v) for v in bn.inputs[1:5]]
        if any(p is None for p in params):
            return "parameters are not constant"
        w_val = prod.inputs[1]
        w = _const(w_val)
        if w is None:
            return f"{prod.op_type} weight is not constant"
        if w.dtype not in _FLOAT_TYPES:
            return f"weight dtype {w.dtype} is not float"
        bias_val = prod.inputs[2] if len(prod.inputs) > 2 else None
        b = _const(bias_val) if bias_val is not None else None
        if bias_val is not None and b is None:
            return "bias is not constant"
        if not all(v.is_graph_output() is False for v in [prod.outputs[0]]):
            return "producer output is a graph output"
        gamma, beta, mean, var = (np.asarray(p.numpy(), dtype=np.float64).reshape(-1) for p in params)
        eps = bn.attributes.get_float("epsilon", 1e-5)
        W = np.asarray(w.numpy(), dtype=np.float64)
        if not all(np.isfinite(a).all() for a in (gamma, beta, mean, var, W)) or (
            b is not None and not np.isfinite(np.asarray(b.numpy(), dtype=np.float64)).all()
        ):
            return "weights hold NaN/Inf: left alone"
        with np.errstate(invalid="ignore", divide="ignore"):
            s = gamma / np.sqrt(var + eps)
        if not np.isfinite(s).all():
            return "variance + epsilon is not positive"
        op = prod.op_type
        if op == "Conv":
            if W.ndim < 3:
                return "unexpected Conv weight rank"
            c_out = W.shape[0]
            if s.size != c_out:
                return "channel count mismatch"
            W2 = W * s.reshape(-1, *([1] * (W.ndim - 1)))
        elif op == "ConvTranspose":
            g = prod.attributes.get_int("group", 1)
            if W.ndim < 3 or W.shape[0] % g:
                return "unexpected ConvTranspose weight shape"
            c_out = W.shape[1] * g
            if s.size != c_out:
                return "channel count mismatch"
            k = W.shape[2:]
            Wg = W.reshape(g, W.shape[0] // g, W.shape[1], *k)
            W2 = (Wg * s.reshape(g, 1, W.shape[1], *([1] * len(k)))).reshape(W.shape)
        else:  # Gemm
            if W.ndim != 2:
                return "Gemm weight is not 2-D"
            if prod.attributes.get_int("transA", 0) not in (0, 1):
                return "bad transA"
            trans_b = prod.attributes.get_int("transB", 0)
            c_out = W.shape[0] if trans_b else W.shape[1]
            if s.size != c_out:
                return "channel count mismatch"
            W2 = W * (s[:, None] if trans_b else s[None, :])
        if b is not None:
            b_arr = np.asarray(b.numpy(), dtype=np.float64)
            if op == "Gemm":
                beta_attr = prod.attributes.get_float("beta", 1.0)
                if b_arr.size == 1:
                    b_arr = np.full(c_out, b_arr.reshape(-1)[0])
                elif b_arr.shape in ((c_out,), (1, c_out)):
                    b_arr = b_arr.reshape(-1)
                else:
                    return "Gemm bias is not per output channel"
                b_arr = b_arr * beta_attr
            elif b_arr.size != c_out:
                return "bias size mismatch"
            b_arr = b_arr.reshape(-1)
        else:
            b_arr = np.zeros(c_out)
        b2 = (b_arr - mean) * s + beta
        np_dtype = w.dtype.numpy()
        new_w = _new_initializer(graph, unique_name(f"{w_val.name}_bn", graph.initializers), W2.astype(np_dtype), w.dtype)
        bias_dtype = b.dtype if b is not None else w.dtype
        base = bias_val.name if bias_val is not None and bias_val.name else f"{w_val.name}_bias"
        new_b = _new_initializer(graph, unique_name(f"{base}_bn", graph.initializers), b2.astype(bias_dtype.numpy()), bias_dtype)
        prod.replace_input_with(1, new_w)
        if len(prod.inputs) < 3:
            prod.resize_inputs(3)
        prod.replace_input_with(2, new_b)
        if op == "Gemm":
            prod.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        if not self._bypass(graph, bn, prod.outputs[0], bn.outputs[0]):
            return "output naming prevents the fusion"
        return None

    # -- dead code and duplicates ----------------------------------------------------------------

    def _remove_dead(self, model: ir.Model) -> bool:
        before_nodes = sum(1 for _ in model.graph.all_nodes())
        result = ir_common.RemoveUnusedNodesPass()(model)
        removed_inits = 0
        for graph in model.graphs():
            if graph is model.graph:
                continue
            for name, value in list(graph.initializers.items()):
                if not value.uses() and not value.is_graph_output():
                    del graph.initializers[name]
                    removed_inits += 1
        after_nodes = sum(1 for _ in model.graph.all_nodes())
        if before_nodes > after_nodes:
            self.count("dead_nodes_removed", before_nodes - after_nodes)
        return bool(result.modified) or removed_inits > 0

    def _dedup_initializers(self, model: ir.Model) -> bool:
        changed = False
        for graph in model.graphs():
            groups: dict[tuple, list[ir.Value]] = {}
            for value in graph.initializers.values():
                t = value.const_value
                if t is None or value.is_graph_input() or value.is_graph_output():
                    continue
                groups.setdefault((t.dtype, tuple(t.shape)), []).append(value)
            for values in groups.values():
                if len(values) < 2:
                    continue
                if values[0].const_value.nbytes > _SAMPLE_HASH_BYTES:
                    # big weights: compare a few sampled slices first, so distinct weights (the usual case)
                    # are never read in full (memory-mapped external data stays unread)
                    by_sample: dict[bytes, list[ir.Value]] = {}
                    for value in values:
                        sample = _sample_digest(value.const_value)
                        by_sample.setdefault(sample if sample is not None else b"", []).append(value)
                    candidates = [vs for vs in by_sample.values() if len(vs) > 1]
                else:
                    candidates = [values]
                for group in candidates:
                    changed |= self._merge_identical(graph, group)
        return changed

    def _merge_identical(self, graph: ir.Graph, values: list[ir.Value]) -> bool:
        """Merge initializers of ``values`` (same dtype and shape) whose bytes are identical."""
        changed = False
        by_digest: dict[bytes, ir.Value] = {}
        for value in values:
            try:
                digest = _full_digest(value.const_value)
            except Exception:
                continue
            keep = by_digest.get(digest)
            if keep is None:
                by_digest[digest] = value
                continue
            value.replace_all_uses_with(keep)
            del graph.initializers[value.name]
            self.count("initializers_merged")
            changed = True
        return changed

    @classmethod
    def applicability(cls, model: ir.Model) -> str:
        consts = bn = noop = 0
        for graph in model.graphs():
            for node in graph:
                if not _is_onnx(node):
                    continue
                if node.op_type == "Constant":
                    consts += 1
                elif node.op_type == "BatchNormalization":
                    p = node.inputs[0].producer() if node.inputs[0] is not None else None
                    if p is not None and _is_onnx(p, "Conv", "ConvTranspose", "Gemm"):
                        bn += 1
                elif node.op_type in ("Identity", "Dropout"):
                    noop += 1
        parts = []
        if consts:
            parts.append(f"{consts} Constant node(s) to lift")
        if bn:
            parts.append(f"{bn} BatchNorm(s) after Conv/Gemm to fuse")
        if noop:
            parts.append(f"{noop} Identity/Dropout to remove")
        return ", ".join(parts) if parts else "constant folding and dead-code checks only"


def _copied_dim(piece: ir.Value | None, x: ir.Value) -> int | None:
    """If ``piece`` is ``Unsqueeze(Gather(Shape(x), i), [0])`` (1 element), return i, else None."""
    unsq = piece.producer() if piece is not None else None
    if unsq is None or not _is_onnx(unsq, "Unsqueeze"):
        return None
    axes = _small_array(unsq.inputs[1], 4) if len(unsq.inputs) > 1 else np.array(unsq.attributes.get_ints("axes", []))
    if axes is None or list(np.reshape(axes, -1)) != [0]:
        return None
    gather = unsq.inputs[0].producer() if unsq.inputs[0] is not None else None
    if gather is None or not _is_onnx(gather, "Gather") or gather.attributes.get_int("axis", 0) != 0:
        return None
    idx = _small_array(gather.inputs[1], 1)
    shape_node = gather.inputs[0].producer() if gather.inputs[0] is not None else None
    if idx is None or idx.ndim != 0 or shape_node is None or not _is_onnx(shape_node, "Shape"):
        return None
    if shape_node.inputs[0] is not x or shape_node.attributes.get_int("start", 0) != 0:
        return None
    i = int(idx)
    return i if i >= 0 else None


def _pick_dims(reader: ir.Node, dims: list) -> tuple[list, bool] | None:
    """The dims a Gather/Slice of a shape vector selects, and whether the result is a scalar."""
    n = len(dims)
    if reader.op_type == "Gather":
        if reader.attributes.get_int("axis", 0) != 0:
            return None
        idx = _small_array(reader.inputs[1], 64)
        if idx is None or idx.ndim > 1:
            return None
        picked = [dims[int(i) + (n if i < 0 else 0)] for i in idx.reshape(-1) if -n <= int(i) < n]
        if len(picked) != idx.size:
            return None
        return picked, idx.ndim == 0
    if reader.op_type == "Slice" and len(reader.inputs) >= 3:
        arrays = [_small_array(v, 8) if v is not None else None for v in reader.inputs[1:5]]
        if arrays[0] is None or arrays[1] is None or arrays[0].size != 1:
            return None
        if len(arrays) > 2 and reader.inputs[3] is not None and (arrays[2] is None or int(arrays[2].reshape(-1)[0]) not in (0, -1)):
            return None
        step = 1
        if len(arrays) > 3 and reader.inputs[4] is not None:
            if arrays[3] is None:
                return None
            step = int(arrays[3].reshape(-1)[0])
        start, end = int(arrays[0].reshape(-1)[0]), int(arrays[1].reshape(-1)[0])
        end = max(min(end, 2**62), -(2**62))
        return list(dims[slice(start, end, step)]), False
    return None


def _drop_folder_metadata(model: ir.Model) -> None:
    """Remove the provenance notes onnxscript's folder attaches to values (they would be saved)."""
    from onnxscript.optimizer import FOLDED_FROM_KEY

    for graph in model.graphs():
        values = list(graph.inputs) + list(graph.initializers.values())
        values += [v for node in graph for v in node.outputs]
        for v in values:
            if FOLDED_FROM_KEY in v.metadata_props:
                del v.metadata_props[FOLDED_FROM_KEY]


def _weight_bytes(model: ir.Model) -> int:
    return sum(t.nbytes for _, t in constant_tensors(model))


def _flat_bytes(tensor: ir.TensorProtocol) -> np.ndarray | None:
    """The tensor's bytes as a flat uint8 view, without a copy where the storage allows (mmap, raw data)."""
    try:
        arr = np.asarray(tensor.numpy())
    except Exception:
        return None
    if not arr.flags.c_contiguous or arr.dtype.kind == "O":
        return None
    try:
        return arr.reshape(-1).view(np.uint8)
    except (ValueError, TypeError):
        return None


def _sample_digest(tensor: ir.TensorProtocol) -> bytes | None:
    """A digest of three slices (start, middle, end) of the tensor's bytes; reads only those pages."""
    flat = _flat_bytes(tensor)
    if flat is None:
        return None
    n, k = flat.size, _SAMPLE_SLICE
    h = hashlib.sha256()
    for start in (0, max(0, n // 2 - k // 2), max(0, n - k)):
        h.update(flat[start: start + k].tobytes())
    return h.digest()


def _full_digest(tensor: ir.TensorProtocol) -> bytes:
    """SHA-256 of all the tensor's bytes, hashed in place when possible (no copy of a big weight)."""
    flat = _flat_bytes(tensor)
    if flat is None:
        return hashlib.sha256(tensor.tobytes()).digest()
    h = hashlib.sha256()
    step = 64 << 20
    for start in range(0, flat.size, step):
        h.update(memoryview(flat[start: start + step]))
    return h.digest()


def _size_estimate(model: ir.Model) -> int:
    """Bytes the model takes as a file, without value_info and node names (which saving strips)."""
    proto = ir.to_proto(model)

    def clean(graph: Any) -> None:
        del graph.value_info[:]
        for node in graph.node:
            node.ClearField("name")
            for attr in node.attribute:
                if attr.HasField("g"):
                    clean(attr.g)
                for g in attr.graphs:
                    clean(g)

    clean(proto.graph)
    return proto.ByteSize()


def _restore(model: ir.Model, snapshot: ir.Model) -> None:
    """Put the graph and functions of ``snapshot`` back into ``model`` (same Model object)."""
    model.graph = snapshot.graph
    model.functions.clear()
    model.functions.update(snapshot.functions)


def _valid_at_opset(node: ir.Node, model: ir.Model) -> bool:
    """True if ``node``'s input/output counts fit its schema at the model's opset (unknown ops: True)."""
    import onnx.defs

    if node.domain not in _ONNX_DOMAINS:
        return True
    version = model.opset_imports.get("", None)
    if version is None:
        return True
    try:
        schema = onnx.defs.get_schema(node.op_type, version, "")
    except Exception:
        return False
    n_in = len(node.inputs)
    while n_in and node.inputs[n_in - 1] is None:
        n_in -= 1
    return schema.min_input <= n_in <= schema.max_input and len(node.outputs) <= schema.max_output


def lift_constant(graph: ir.Graph, node: ir.Node) -> ir.Value | None:
    """Replace a ``Constant`` node of ``graph`` by an initializer holding its tensor (named after its output,
    made unique among the graph's initializers). Returns the initializer, or None (node kept) for sparse or
    string values."""
    tensor = _constant_node_tensor(node)
    if tensor is None:
        return None
    out = node.outputs[0]
    value = ir.Value(name=None, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    out.replace_all_uses_with(value)
    name = out.name or "const"
    graph.remove(node, safe=True)
    value.name = unique_name(name, graph.initializers)
    tensor.name = value.name
    graph.register_initializer(value)
    return value


def _constant_node_tensor(node: ir.Node) -> Any:
    """The tensor of a Constant node (any of its value_* forms), or None for sparse/string values."""
    attrs = node.attributes
    if "value" in attrs:
        t = attrs["value"].as_tensor()
        return None if t.dtype == ir.DataType.STRING else t
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return ir.tensor(np.array(attrs[key].value, dtype=dtype))
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return ir.tensor(np.array(list(attrs[key].value), dtype=dtype))
    return None
