"""The registered ``quant`` pass: mode selection, checks, and the order of the steps.

``weights``: weights only. ``dynamic``: MatMul/Gemm rewrites. ``static``: CLE (optional) → placement →
range groups → calibration → ranges → weights (bias correction first) → activation Q/DQ → int32 biases →
``max_drop`` fallback → Relu/Clip folding → QLinear ops (``format=qop``) or shared qparams. Options are
validated before the graph is touched; a model onnxruntime cannot run falls back to weights-only with a
counted reason. ``tolerance`` (0.15 relative L2 on outputs; 0.3 for 4-bit) is the validation bound;
task accuracy is what ``max_drop`` and the benchmarks measure.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from onnxshrink.errors import UsageError
from onnxshrink.model import name_matcher, taken_names
from onnxshrink.passes.quant.build import GraphBuilder
from onnxshrink.passes.quant.calibrate import Calibrator
from onnxshrink.passes.quant.correct import BiasCorrector
from onnxshrink.passes.quant.dynamic import DynamicQuantizer
from onnxshrink.passes.quant.equalize import Equalizer
from onnxshrink.passes.quant.graph import (
    FAST_WEIGHT_OPS,
    RECURRENT_OPS,
    WEIGHT_OPS,
    _infer_shapes,
    all_nodes,
    is_onnx,
    opset_of,
)
from onnxshrink.passes.quant.opset import OpsetUpgrader
from onnxshrink.passes.quant.options import QuantOptions
from onnxshrink.passes.quant.placement import Placement
from onnxshrink.passes.quant.qdq import QDQWriter
from onnxshrink.passes.quant.qop import QOpWriter
from onnxshrink.passes.quant.ranges import activation_qparams, choose_range
from onnxshrink.passes.quant.recover import Recovery, reference, run_outputs
from onnxshrink.passes.quant.weights import WeightQuantizer
from onnxshrink.registry import ShrinkPass, register
from onnxshrink.targets import static_problems


@register("quant", QuantOptions, summary="int8/int4 quantization to QDQ or QLinear ops (weights/dynamic/static)")
class QuantPass(GraphBuilder, OpsetUpgrader, WeightQuantizer, DynamicQuantizer, Placement, Calibrator,
                Equalizer, BiasCorrector, QDQWriter, QOpWriter, Recovery, ShrinkPass):
    """Quantization: the steps live in the mixins (one module each, see the package docstring); this class
    checks the options, picks the mode and runs the steps in order."""

    tolerance = 0.15

    @classmethod
    def applicability(cls, model: ir.Model) -> str:
        return applicability_of(model)

    @classmethod
    def validation_tolerance(cls, options: QuantOptions) -> float:
        """Relative L2 on outputs: 0.15 for 8-bit (activation + weight rounding, and bounded fallback
        of saturating kernels), 0.3 for 4-bit weights (16 levels per block)."""
        return 0.3 if options.bits == 4 else cls.tolerance

    def run(self, model: ir.Model) -> bool:
        o = self.options
        data = self.context.data
        mode = o.mode if o.mode != "auto" else ("static" if data is not None else "weights")
        if mode == "static" and data is None:
            raise UsageError("quant(mode=static) needs calibration data", pass_name=self.name, option="mode",
                             hint="give --data (an .npz with one array per input), or use mode=weights")
        if mode == "dynamic" and o.target == "tensorrt":
            raise UsageError("TensorRT does not run DynamicQuantizeLinear", pass_name=self.name,
                             option="mode", hint="use mode=static or mode=weights with target=tensorrt")
        if o.format == "qop" and o.target == "tensorrt":
            raise UsageError("TensorRT takes QDQ only", pass_name=self.name, option="format",
                             hint="use format=qdq with target=tensorrt")
        if o.max_drop >= 0 and data is None:
            raise UsageError("max_drop needs data to measure the drop", pass_name=self.name, option="max_drop",
                             hint="give --data")
        self.details["mode"] = mode
        self._restore: dict[int, tuple[ir.Node, dict[int, list]]] = {}
        self._unnamed: list[ir.Node] = []
        self._counter = 0  # short-name counter
        self._zeros: dict[ir.DataType, ir.Value] = {}  # shared scalar zero points of QLinear ops
        reduce = o.reduce_range == "on" or (o.reduce_range == "auto" and o.target in ("cpu", "mobile")
                                            and mode in ("static", "dynamic"))
        self._wbits = 7 if reduce else 8
        self._int_input: set[int] | None = None  # static: nodes that read a quantized activation
        self._keep_zp = False  # DequantizeLinear's zero point defaults to 0; QLinear ops get a shared scalar
        if reduce:
            self.details["weights"] = "int8 with 7-bit range (reduce_range)"
        if o.max_drop >= 0:
            if mode != "static":
                raise UsageError("max_drop works with mode=static", pass_name=self.name, option="max_drop",
                                 hint="drop max_drop, or use mode=static")
            _infer_shapes(model, self.context)
            try:
                outs = run_outputs(self.context, model, o.samples)
            except (RuntimeError, ValueError) as e:
                raise UsageError(f"max_drop needs onnxruntime to run the model: {str(e).splitlines()[0][:200]}",
                                 pass_name=self.name, option="max_drop", hint="drop max_drop for this model") from e
            self._reference = reference(outs, o.metric, self.context)
        self._exclude = name_matcher(o.exclude)
        self._taken: set[str] = taken_names(*model.graphs())
        opset = opset_of(model)
        if opset < 10 or (mode == "dynamic" and opset < 11):
            need = 11 if mode == "dynamic" else 10
            self.decline(f"opset {opset} < {need}: no {'DynamicQuantizeLinear' if need == 11 else 'QuantizeLinear'}")
            self.details["skipped"] = f"opset {opset} has no quantization ops (needs >= {need})"
            return False
        changed = self._lift_constants(model)
        if model.ir_version is not None and model.ir_version < 4:
            model.ir_version = 4  # initializers need not be graph inputs any more
        self._per_channel_ok = True
        if o.per_channel and (mode in ("static", "weights")) and opset_of(model) < 13:
            changed |= self._upgrade_opset(model)
        if mode == "weights":
            changed |= self._quantize_weights(model)
        elif mode == "dynamic":
            changed |= self._quantize_dynamic(model)
        else:
            changed |= self._quantize_static(model)
        self._remove_unused(model)
        for node in self._unnamed:
            node.name = None
        problems = static_problems(model, o.target)
        self.details["target_check"] = f"{o.target}: ok" if not problems else f"{o.target}: " + "; ".join(problems[:3])
        if problems:
            self.decline(f"output breaks {o.target} rules")
        return changed

    def _quantize_static(self, model: ir.Model) -> bool:
        o = self.options
        _infer_shapes(model, self.context)
        changed = False
        if o.cle is True or (o.cle == "auto" and not o.per_channel):
            changed |= self._cle(model)
        plan = self._plan(model)
        if not plan:
            self.decline("no activation feeds a quantizable op: weights only")
            return self._quantize_weights(model, static=True) or changed
        groups = self._range_groups(model, plan)
        names = sorted({v.name for g in groups for v in g})
        mean_axes = self._mean_axes(plan)
        try:
            stats = self._calibrate(model, names, mean_axes)
        except (RuntimeError, ValueError) as e:
            # onnxruntime cannot run this graph (custom or training ops, old kernels): weights only
            self.decline("calibration impossible (onnxruntime cannot run the model): weights only")
            self.details["calibration"] = f"not possible: {str(e).splitlines()[0][:200]}"
            return self._quantize_weights(model, static=True) or changed
        ranges: dict[str, tuple[float, float]] = {}
        symmetric = o.target == "tensorrt"
        for g in groups:
            if any(stats.get(v.name) is not None and stats[v.name].nonfinite for v in g):
                self.decline("activation holds NaN/Inf in calibration (e.g. a -inf mask): left float")
                continue
            los, his = [], []
            for v in g:
                st = stats.get(v.name)
                if st is None or not math.isfinite(st.lo):
                    continue
                lo, hi = choose_range(st, o.calib, o.percentile, symmetric)
                los.append(lo)
                his.append(hi)
            if not los:
                continue
            for v in g:
                ranges[v.name] = (min(los), max(his))
        # weights (all graphs; inside If/Loop/Scan bodies weight-only), with bias correction first
        self._keep_recurrent_float(model)
        found = self._weight_slots(model, FAST_WEIGHT_OPS)
        self._int_input = {id(node) for v, uses in plan.items() if v.name in ranges for node, _ in uses}
        if o.bias_correction:
            self._bias_correction(model, found, stats, plan)
        for weight, uses in found.items():
            self._dq_for_weight(weight, uses)
        in_main = {id(n) for n in model.graph}
        sub_weights = sum(1 for uses in found.values() for n, _ in uses if id(n) not in in_main)
        if sub_weights:
            self.count("subgraph_weights_weight_only", sub_weights)
        # activations
        qparams: dict[str, tuple[ir.Value, ir.Value]] = {}
        for value, uses in plan.items():
            if value.name not in ranges:
                self.decline("activation never observed in calibration: left float")
                continue
            lo, hi = ranges[value.name]
            scale, zp = activation_qparams(lo, hi, o.target)
            self._insert_qdq(model, value, uses, scale, zp)
            qparams[value.name] = (scale, zp)
            self.count("activations_quantized")
        if o.format == "qop":
            self._quantize_biases(model)  # QLinearConv takes an int32 bias; QDQ keeps it float (ORT fuses)
        elif o.target != "tensorrt":
            # onnxruntime fuses a Gemm whose output is not requantized (a classifier's last layer) into
            # QGemm only with an int32 bias behind DequantizeLinear (measured on the digits CNN's fc2)
            self._quantize_biases(model, ("Gemm",))
        self._activation_ranges = ranges
        if o.max_drop >= 0:
            self._fallback(model)
        self._fold_activations_into_q(model)
        if o.format == "qop":
            self._to_qop(model)
        else:
            self._compact_qparams(model)
        return True


def applicability_of(model: ir.Model) -> str:
    n, nbytes = 0, 0
    for node in all_nodes(model):
        if is_onnx(node, *WEIGHT_OPS):
            for v in node.inputs[:3 if node.op_type in RECURRENT_OPS else 2]:
                if v is not None and v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT:
                    n += 1
                    nbytes += v.const_value.nbytes
    if not n:
        return "no float Conv/Gemm/MatMul/LSTM/GRU/RNN weights to quantize"
    return f"{n} Conv/Gemm/MatMul/LSTM/GRU/RNN weight(s), {nbytes:,} B float → about {nbytes // 4:,} B int8"

