"""Weight quantization: symmetric per-channel int8 (optionally 7-bit) and int4 MatMul weights.

int8: ``s_c = max|W_c| / (2^(b-1) − 1)``, ``q = clip(round(W / s_c), −q_max, q_max)`` along the output-channel
axis (``graph.weight_axis``); symmetric because integer kernels want a zero weight zero point. ``b = 7``
(``reduce_range``) where an integer kernel multiplies: onnxruntime's u8s8 kernels on x86 without VNNI add
pairs of products in int16 and saturate; depthwise Conv sums in int32 and keeps all 8 bits; a weight read
only by float ops (heads, excluded paths) keeps all 8 bits too. Large weights are read and quantized slice by
slice (16 MiB), so memory stays near the int8 result.

int4 (``bits=4``, MatMul ``[K, N]`` weights): per block of ``block_size`` rows of K, ``s = max|W_blk| / 7``,
``q = clip(round(W / s), −8, 7)``. ``target=cpu`` writes onnxruntime's ``com.microsoft::MatMulNBits``
(uint4 = q + 8, the implicit zero point 8, low nibble first, B as ``[N, blocks, block_size/2]``); other
targets an opset-21 blocked ``DequantizeLinear`` of int4 (below opset 21: 8 bits, with a decline).

Preconditions: float32 weights; a weight shared with a node that is not quantized, smaller than 16 values,
or holding NaN/Inf is left float with a counted reason. LSTM/GRU/RNN weights are quantized only in
``mode=weights``: onnxruntime does not fold a DequantizeLinear of a constant, so in the speed modes it
would run at every inference.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from onnxshrink.model import unique_name
from onnxshrink.passes.quant.graph import (
    FAST_WEIGHT_OPS,
    MS_DOMAIN,
    RECURRENT_OPS,
    WEIGHT_OPS,
    all_nodes,
    is_depthwise,
    is_onnx,
    opset_of,
    weight_axis,
)

_CHUNK_BYTES = 16 << 20  # weights are quantized in slices of this size: big models stay within ~1x memory


def _row_chunks(w: np.ndarray) -> Iterable[slice]:
    rows = w.shape[0] if w.ndim else 1
    per_row = max(1, w.nbytes // max(rows, 1))
    step = max(1, _CHUNK_BYTES // per_row)
    for i in range(0, rows, step):
        yield slice(i, min(rows, i + step))


def weight_absmax(w: np.ndarray, axis: int | None) -> np.ndarray:
    """max |w| per channel along ``axis`` (or over everything), reading ``w`` slice by slice."""
    if w.ndim == 0:
        return np.asarray(np.abs(w), np.float32)
    out = None
    for rows in _row_chunks(w):
        chunk = np.abs(np.asarray(w[rows], dtype=np.float32))
        if axis is None:
            m = np.asarray(chunk.max() if chunk.size else 0.0, np.float32)
            out = m if out is None else np.maximum(out, m)
        elif axis == 0:
            m = chunk.reshape(chunk.shape[0], -1).max(axis=1) if chunk.size else np.zeros(chunk.shape[0], np.float32)
            out = m if out is None else np.concatenate([out, m])
        else:
            red = tuple(i for i in range(w.ndim) if i != axis)
            m = chunk.max(axis=red) if chunk.size else np.zeros(w.shape[axis], np.float32)
            out = m if out is None else np.maximum(out, m)
    return np.asarray(out, np.float32)


def all_finite(w: np.ndarray) -> bool:
    """True if ``w`` holds no NaN/Inf (read slice by slice)."""
    if w.ndim == 0:
        return bool(np.isfinite(w))
    return all(bool(np.isfinite(w[rows]).all()) for rows in _row_chunks(w))


def quantize_weight(w: np.ndarray, axis: int | None, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization of ``w`` per channel along ``axis`` (or per tensor when None).

    ``bits`` is the number of bits actually used (7 = reduced range, values in [-63, 63]).
    Returns ``(q int8, scale float32)``; ``scale`` has one entry per channel (or is a scalar). Large
    weights are read and quantized in slices, so memory is the int8 result plus one slice.
    """
    qmax = 2 ** (bits - 1) - 1
    amax = weight_absmax(w, axis)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.empty(w.shape, np.int8)
    if w.ndim == 0:
        q[...] = np.clip(np.rint(np.float32(w) / scale), -qmax, qmax)
        return q, np.asarray(scale, np.float32).reshape(())
    for rows in _row_chunks(w):
        chunk = np.asarray(w[rows], dtype=np.float32)
        if axis is None:
            s = scale
        elif axis == 0:
            s = scale[rows].reshape([-1] + [1] * (w.ndim - 1))
        else:
            bshape = [1] * w.ndim
            bshape[axis] = -1
            s = scale.reshape(bshape)
        q[rows] = np.clip(np.rint(chunk / s), -qmax, qmax)
    if axis is None:
        scale = np.asarray(scale, np.float32).reshape(())
    return q, scale


def dequantize_weight(q: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    """The float weight a DequantizeLinear of ``q`` yields."""
    if axis is None or np.ndim(scale) == 0:
        return q.astype(np.float32) * np.float32(scale)
    bshape = [1] * q.ndim
    bshape[axis] = -1
    return q.astype(np.float32) * scale.reshape(bshape)



class WeightQuantizer:
    """Weight-only quantization (all modes' weights): slots, bits, DequantizeLinear insertion, int4."""

    def _weight_slots(self, model: ir.Model, ops: Iterable[str]) -> dict[ir.Value, list[tuple[ir.Node, int]]]:
        """Constant float weights of ``ops`` with every (node, slot) using them, in graph order."""
        found: dict[ir.Value, list[tuple[ir.Node, int]]] = {}
        ops = set(ops)
        for node in all_nodes(model):
            if not is_onnx(node, *ops):
                continue
            if self._excluded(node):
                self.decline("excluded by name", node)
                continue
            slots = [1, 0] if node.op_type == "MatMul" else [1, 2] if node.op_type in RECURRENT_OPS else [1]
            for slot in slots:
                v = node.inputs[slot] if slot < len(node.inputs) else None
                if v is None or v.const_value is None or v.is_graph_input():
                    continue
                if v.const_value.dtype != ir.DataType.FLOAT:
                    self.decline(f"weight dtype {v.const_value.dtype.name} (float32 only)", node)
                    continue
                found.setdefault(v, []).append((node, slot))
        for v in list(found):
            users = v.uses()
            if len(users) != len(found[v]):
                self.decline("weight shared with a node that is not quantized", found[v][0][0])
                del found[v]
                continue
            arr_shape = v.shape
            if arr_shape is None or any(not isinstance(d, int) for d in arr_shape) or np.prod(list(arr_shape)) < 16:
                self.decline("weight too small to gain from quantization", found[v][0][0])
                del found[v]
                continue
            if not all_finite(v.const_value.numpy()):
                self.decline("weight holds NaN/Inf: left float", found[v][0][0])
                del found[v]
        return found

    def _weight_bits(self, uses: list[tuple[ir.Node, int]]) -> int:
        """Reduced (7-bit) range only where an integer kernel will multiply: a weight whose consumers all
        keep a float input (heads, excluded or unquantized paths) runs in a float op and gets all 8 bits."""
        if self._int_input is not None and not any(id(n) in self._int_input for n, _ in uses):
            return 8
        if all(is_depthwise(n, slot) for n, slot in uses):
            # onnxruntime's depthwise QLinearConv (one input and one output channel per group) sums
            # in int32 and never saturates (measured with 255 x 127 products; every other Conv and
            # the Gemm/MatMul kernels do on AVX2): its weights keep all 8 bits
            return 8
        return self._wbits

    def _keep_recurrent_float(self, model: ir.Model) -> None:
        n = sum(1 for node in all_nodes(model) if is_onnx(node, *RECURRENT_OPS))
        if n:
            # onnxruntime does not fold a DequantizeLinear of a constant: it would run every inference
            # (see docs/passes/quant.md); mode=weights, which is about size, quantizes them
            self.decline("LSTM/GRU/RNN weights kept float in static/dynamic mode (mode=weights quantizes them)")
            self.count("recurrent_kept_float", n)

    def _dq_for_weight(self, weight: ir.Value, uses: list[tuple[ir.Node, int]], bits: int = 8,
                       share_axis: bool = True) -> dict[tuple[ir.Node, int], ir.Value] | None:
        """Quantize ``weight`` and route every use through one DequantizeLinear per axis."""
        w = weight.const_value.numpy()
        graph = weight.graph or uses[0][0].graph
        out: dict[tuple[ir.Node, int], ir.Value] = {}
        by_axis: dict[int | None, list[tuple[ir.Node, int]]] = {}
        for node, slot in uses:
            axis = weight_axis(node, slot, w.ndim) if self.options.per_channel else None
            by_axis.setdefault(axis, []).append((node, slot))
        for axis, group in by_axis.items():
            q, scale = quantize_weight(w, axis, self._weight_bits(group))
            base = self._short("w")
            qv = self._new_init(graph, base, q)
            sv = self._new_init(graph, f"{base}s", scale)
            # the zero point defaults to 0, but onnxruntime fuses DQ→Gemm/MatMul into QGemm/QLinearMatMul
            # only with it spelled out (measured: without it the digits CNN's Gemms stayed float behind a
            # per-run weight dequantization); Conv fuses either way, so it is omitted there (smaller file)
            keep_zp = self._keep_zp or (self._int_input is not None and any(
                n.op_type in ("Gemm", "MatMul") and id(n) in self._int_input for n, _ in group))
            zv = self._new_init(graph, f"{base}z", np.zeros(scale.shape, np.int8)) if keep_zp else None
            if axis is not None and not self._per_channel_ok:
                # opset < 13: per-tensor DequantizeLinear(q, 1) then a per-channel Mul (exact)
                one = self._new_init(graph, f"{base}u", np.asarray(1.0, np.float32))
                zero = self._new_init(graph, f"{base}z", np.asarray(0, np.int8))
                bshape = [1] * w.ndim
                bshape[axis] = -1
                sv_b = self._new_init(graph, f"{base}b", scale.reshape(bshape))
                dq = self._node("DequantizeLinear", [qv, one, zero])
                mul = self._node("Mul", [dq.outputs[0], sv_b])
                nodes = [dq, mul]
                result = mul.outputs[0]
                self.count("weights_per_channel_by_mul")
            else:
                attrs = {"axis": axis} if axis is not None else {}
                if axis is None:
                    sv.const_value = ir.tensor(np.asarray(scale, np.float32).reshape(()), name=sv.name)
                    sv.shape = ir.Shape([])
                    if zv is not None:
                        zv.const_value = ir.tensor(np.asarray(0, np.int8), name=zv.name)
                        zv.shape = ir.Shape([])
                dq = self._node("DequantizeLinear", [qv, sv] + ([zv] if zv is not None else []), attrs)
                nodes = [dq]
                result = dq.outputs[0]
            result.name = unique_name(f"{base}d", self._taken)
            result.dtype = ir.DataType.FLOAT
            result.shape = ir.Shape(list(w.shape))
            self._insert_front(graph, group, nodes)
            for node, slot in group:
                self._replace(node, slot, result)
                out[(node, slot)] = result
            self.count("weights_quantized")
            self.count("weight_bytes_saved", int(w.nbytes - q.nbytes))
        return out

    def _insert_front(self, graph: ir.Graph, uses: list[tuple[ir.Node, int]], nodes: list[ir.Node]) -> None:
        """Insert ``nodes`` before the first use in ``graph`` (or at its start if uses are in subgraphs)."""
        # uses come in graph order (collected by walking the graph), so the first one is the earliest;
        # no scan of the graph per weight (that made the pass quadratic on 100k-node graphs)
        first = uses[0][0] if all(n.graph is graph for n, _ in uses) else next(iter(graph), None)
        if first is None:
            graph.extend(nodes)
        else:
            graph.insert_before(first, nodes)

    def _quantize_weights(self, model: ir.Model, static: bool = False) -> bool:
        """Weight-only int8/int4; ``static``: the fallback of mode=static, which leaves recurrent ops float."""
        o = self.options
        changed = False
        if static:
            self._keep_recurrent_float(model)
        found = self._weight_slots(model, FAST_WEIGHT_OPS if static else WEIGHT_OPS)
        for weight, uses in found.items():
            if o.bits == 4:
                if all(n.op_type == "MatMul" and s == 1 for n, s in uses) and weight.const_value.numpy().ndim == 2:
                    if self._int4_matmul(model, weight, uses):
                        changed = True
                    continue
                self.decline("4-bit is for MatMul weights: quantized to 8 bits", uses[0][0])
            if self._dq_for_weight(weight, uses):
                changed = True
        return changed

    def _int4_matmul(self, model: ir.Model, weight: ir.Value, uses: list[tuple[ir.Node, int]]) -> bool:
        o = self.options
        w = weight.const_value.numpy().astype(np.float32)
        k, n = w.shape
        bs = o.block_size
        nblocks = -(-k // bs)
        padded = np.zeros((nblocks * bs, n), np.float32)
        padded[:k] = w
        blocks = padded.reshape(nblocks, bs, n)
        amax = np.abs(blocks).max(axis=1)  # [nblocks, n]
        scale = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(blocks / scale[:, None, :]), -8, 7).astype(np.int8)  # [nblocks, bs, n]
        graph = weight.graph or uses[0][0].graph
        base = self._short("w")
        if o.target == "cpu":
            # MatMulNBits: B uint8 [N, nblocks, bs/2], low nibble first; scales [N * nblocks]; zero point 8
            u = (q + 8).astype(np.uint8).transpose(2, 0, 1)  # [n, nblocks, bs]
            packed = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
            bv = self._new_init(graph, base, packed)
            sv = self._new_init(graph, f"{base}s", scale.T.reshape(-1).copy())
            for node, _slot in uses:
                out = node.outputs[0]
                new = self._node("MatMulNBits", [node.inputs[0], bv, sv],
                                 {"K": k, "N": n, "bits": 4, "block_size": bs, "accuracy_level": 0},
                                 domain=MS_DOMAIN, name=f"{node.name or 'MatMul'}_NBits")
                node.graph.insert_before(node, [new])
                new.outputs[0].dtype = ir.DataType.FLOAT
                new.outputs[0].shape = out.shape
                out.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
                name = out.name
                node.graph.remove(node, safe=True)
                new.outputs[0].name = name
            if MS_DOMAIN not in model.opset_imports:
                model.opset_imports[MS_DOMAIN] = 1
            self.count("weights_int4_matmulnbits")
        else:
            if opset_of(model) < 21:
                self.decline("int4 DequantizeLinear needs opset 21: quantized to 8 bits", uses[0][0])
                return bool(self._dq_for_weight(weight, uses))
            q2 = q.reshape(nblocks * bs, n)[:k]
            qv = self._new_init(graph, base, q2, dtype=ir.DataType.INT4)
            sv = self._new_init(graph, f"{base}s", scale)
            dq = self._node("DequantizeLinear", [qv, sv], {"axis": 0, "block_size": bs})
            dq.outputs[0].dtype = ir.DataType.FLOAT
            dq.outputs[0].shape = ir.Shape([k, n])
            self._insert_front(graph, uses, [dq])
            for node, slot in uses:
                node.replace_input_with(slot, dq.outputs[0])
            self.count("weights_int4_blocked")
        self.count("weights_quantized")
        self.count("weight_bytes_saved", int(w.nbytes - q.size // 2 - scale.nbytes))
        return True
