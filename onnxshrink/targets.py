"""Deploy checks: does a model load where the user deploys it?

:func:`check_target` verifies a model against one target's rules and returns a :class:`TargetCheck`:

* ``cpu`` — onnxruntime's CPU provider creates a session and runs the model once on deterministic
  synthetic inputs (from the declared types and shapes; ``input_shapes`` sizes dynamic axes).
* ``mobile`` — onnxruntime's own converter (``python -m onnxruntime.tools.convert_onnx_models_to_ort``)
  turns the model into the ORT format in a temporary folder, and quantized activations are uint8
  (NNAPI runs no int8 activations; int8 *weights* are fine, ORT converts them). Dynamic input axes are
  noted (NNAPI and CoreML need fixed shapes), and so is onnxruntime's usability checker's estimate of the
  NNAPI/CoreML partitions and node coverage (advice, not a failure: the CPU provider runs the rest).
* ``tensorrt`` — static rules of TensorRT's explicit quantization (its ONNX parser): opset ≥ 13, QDQ format
  only (no ``DynamicQuantizeLinear``, no ``QLinear*``/``*Integer`` ops), int8 with zero points that are
  constant zeros, scales that are constants, per-axis scales only on weights (a DequantizeLinear fed by an
  initializer, or a QuantizeLinear of one) along the consumer's output-channel axis (Conv: 0,
  ConvTranspose: 1, Gemm: 0 with ``transB=1`` else 1, MatMul: the last axis), no custom-domain ops, every
  op in the parser's supported list. Nothing is run: TensorRT is not needed.

Each problem is one line naming the node (and tensor) at fault; ``checks`` lists what was verified, so an
empty problem list means something. The quantization pass uses this to verify its own output.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxshrink.errors import UsageError
from onnxshrink.model import constant_value

__all__ = ["TARGETS", "TargetCheck", "check_target", "check_target_name", "TENSORRT_OPS", "TENSORRT_MIN_OPSET"]

#: The deploy targets :func:`check_target` knows.
TARGETS = ("cpu", "mobile", "tensorrt")

#: Per-axis QuantizeLinear/DequantizeLinear (the ``axis`` attribute) needs opset 13.
TENSORRT_MIN_OPSET = 13
#: The newest default-domain opset these rules were written against (TensorRT 10's parser).
TENSORRT_KNOWN_OPSET = 22

#: ONNX (default domain) ops TensorRT 10's ONNX parser imports (onnx-tensorrt ``docs/operators.md``).
TENSORRT_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Bernoulli
BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow Cast CastLike Ceil Celu Clip Compress Concat
ConcatFromSequence Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DFT DeformConv DepthToSpace
DequantizeLinear Div Dropout DynamicQuantizeLinear Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
GRU Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
GreaterOrEqual GridSample GroupNormalization HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity
If ImageScaler InstanceNormalization IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu Less LessOrEqual Log
LogSoftmax Loop LpNormalization LpPool MatMul Max MaxPool MaxRoiPool MaxUnpool Mean MeanVarianceNormalization
Min Mish Mod Mul Multinomial Neg NonMaxSuppression NonZero Not OneHot Or PRelu Pad ParametricSoftplus Pow
QuantizeLinear RNN RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1
ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare
Relu Reshape Resize ReverseSequence RoiAlign Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND
Selu SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength Shape Shrink
Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split SplitToSequence Sqrt Squeeze
Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unique Unsqueeze Upsample Where Xor
""".split()) - {"DynamicQuantizeLinear"}  # listed by the parser docs as unsupported in explicit quantization

#: Quantized-operator ("QOperator") and integer-arithmetic ops: TensorRT takes only QDQ models.
_QOP_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul",
    "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool",
    "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere", "QGemm", "QAttention", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "MatMulNBits", "QOrderedMatMul",
})
_ONNX_DOMAINS = ("", "ai.onnx")
_INT8_OK = {ir.DataType.INT8, ir.DataType.INT4}
_FLOAT8 = {
    getattr(ir.DataType, n) for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")
    if hasattr(ir.DataType, n)
}


@dataclasses.dataclass
class TargetCheck:
    """The outcome of :func:`check_target`.

    Attributes:
        target: ``cpu``, ``mobile`` or ``tensorrt``.
        ok: True when ``problems`` is empty.
        problems: one line each, naming the node/tensor at fault.
        checks: what was verified (one line each).
        notes: advisories that do not fail the check (e.g. dynamic shapes on mobile).
    """

    target: str
    ok: bool
    problems: list[str] = dataclasses.field(default_factory=list)
    checks: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with stable keys."""
        return dataclasses.asdict(self)


def check_target(
    model: str | os.PathLike | ir.Model,
    target: str,
    *,
    input_shapes: dict[str, list[int]] | None = None,
) -> TargetCheck:
    """Check ``model`` against ``target``'s rules (see the module docstring).

    Args:
        model: a model file path (external data beside it is fine) or an ``onnx_ir.Model`` (saved to a
            temporary folder when the target needs a file).
        target: one of :data:`TARGETS`.
        input_shapes: concrete shapes for dynamic input axes (``cpu``: to run the model).

    Returns:
        A :class:`TargetCheck`; ``ok`` is False when any problem was found.

    Raises:
        UsageError: unknown target.
        ModelLoadError: ``model`` is a path that is not a loadable ONNX model.
    """
    from onnxshrink.model import load_model, save_model

    check_target_name(target)
    if isinstance(model, ir.Model):
        m = model
        path = None
    else:
        path = Path(os.fspath(model))
        m = load_model(path)
    result = TargetCheck(target, True)
    if target == "tensorrt":
        _check_tensorrt(m, result)
    else:
        with tempfile.TemporaryDirectory(prefix="onnxshrink-target-") as tmp:
            if path is None:
                path = Path(tmp) / "model.onnx"
                save_model(m, path)
            if target == "cpu":
                _check_cpu(m, path, result, input_shapes or {})
            else:
                _check_mobile(m, path, result, Path(tmp))
    result.ok = not result.problems
    return result


def static_problems(model: ir.Model, target: str) -> list[str]:
    """The rules of ``target`` that can be checked on the graph alone (no onnxruntime, no files): what a
    pass uses to verify its own output. tensorrt: every static rule of :func:`check_target`; mobile:
    quantized activations are uint8; cpu: no u8s8 ``ConvInteger`` (onnxruntime has no CPU kernel)."""
    check_target_name(target)
    result = TargetCheck(target, True)
    if target == "tensorrt":
        _check_tensorrt(model, result)
    elif target == "mobile":
        _check_uint8_activations(model, result)
    else:
        for graph in model.graphs():
            for node in graph:
                if node.domain in _ONNX_DOMAINS and node.op_type == "ConvInteger":
                    result.problems.append(f"{_node_label(node)}: ConvInteger (u8s8) has no onnxruntime CPU kernel")
    return result.problems


def check_target_name(target: str) -> None:
    """Raise :class:`~onnxshrink.errors.UsageError` (with a did-you-mean hint) unless ``target`` is known."""
    if target not in TARGETS:
        from onnxshrink.registry import suggest

        raise UsageError(f"unknown target {target!r}",
                         hint=suggest(target, list(TARGETS)) or f"targets: {', '.join(TARGETS)}")


# -- helpers ------------------------------------------------------------------------------------------


def _first_line(e: BaseException | str) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _node_label(node: ir.Node) -> str:
    name = node.name or (node.outputs[0].name if node.outputs and node.outputs[0].name else "?")
    op = node.op_type if node.domain in _ONNX_DOMAINS else f"{node.domain}::{node.op_type}"
    return f"{op} node {name!r}"


def _is_weight(value: ir.Value | None) -> bool:
    return constant_value(value) is not None


def _opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def _q_output_type(node: ir.Node) -> ir.DataType | None:
    """The integer type a QuantizeLinear produces (zero point's type, output_dtype, else uint8)."""
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    if zp is not None:
        t = constant_value(zp)
        if t is not None:
            return t.dtype
        return zp.dtype
    out_dtype = node.attributes.get_int("output_dtype", 0)
    if out_dtype:
        return ir.DataType(out_dtype)
    return ir.DataType.UINT8


def _dq_input_type(node: ir.Node) -> ir.DataType | None:
    x = node.inputs[0]
    t = constant_value(x)
    if t is not None:
        return t.dtype
    if x is not None and x.dtype is not None:
        return x.dtype
    producer = x.producer() if x is not None else None
    if producer is not None and producer.op_type == "QuantizeLinear" and producer.domain in _ONNX_DOMAINS:
        return _q_output_type(producer)
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    if zp is not None:
        zt = constant_value(zp)
        return zt.dtype if zt is not None else zp.dtype
    return None


# -- cpu ------------------------------------------------------------------------------------------------


def _check_cpu(model: ir.Model, path: Path, result: TargetCheck, input_shapes: dict[str, list[int]]) -> None:
    from onnxshrink.calib import input_specs, synthetic_data
    from onnxshrink.errors import DataError
    import onnxruntime as ort

    try:
        ort.set_default_logger_severity(4)
        so = ort.SessionOptions()
        so.log_severity_level = 4
        session = ort.InferenceSession(os.fspath(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        result.problems.append(f"onnxruntime (CPU) cannot load the model: {_first_line(e)}")
        return
    result.checks.append("onnxruntime CPU session created")
    try:
        data, notes = synthetic_data(input_specs(model), input_shapes, num_samples=1)
    except DataError as e:
        result.notes.append(f"not run: {e.message}" + (f" ({e.hint})" if e.hint else ""))
        return
    result.notes += notes
    feed = next(iter(data.samples(1)))
    try:
        outputs = session.run(None, feed)
    except Exception as e:
        result.problems.append(f"onnxruntime (CPU) cannot run the model on synthetic inputs: {_first_line(e)}")
        return
    result.checks.append(f"ran once on synthetic inputs ({len(outputs)} output(s))")
    for meta, out in zip(session.get_outputs(), outputs):
        arr = np.asarray(out) if not isinstance(out, (list, dict)) else None
        if arr is not None and arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            result.notes.append(f"output {meta.name!r} holds NaN/Inf on synthetic inputs")


# -- mobile ---------------------------------------------------------------------------------------------


def _check_mobile(model: ir.Model, path: Path, result: TargetCheck, tmp: Path) -> None:
    _check_uint8_activations(model, result)
    src_dir = tmp / "src"
    out_dir = tmp / "ort"
    src_dir.mkdir(exist_ok=True)
    link = src_dir / "model.onnx"
    # the converter converts every .onnx in a folder: give it one, with its external data beside it
    try:
        os.symlink(path.resolve(), link)
        for f in _external_files(path):
            if not (src_dir / f.name).exists():
                os.symlink(f.resolve(), src_dir / f.name)
    except OSError:
        import shutil

        shutil.copyfile(path, link)
    cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(link),
           "--output_dir", str(out_dir), "--optimization_style", "Fixed"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        result.problems.append("ORT-format conversion timed out (600 s)")
        return
    produced = sorted(out_dir.rglob("*.ort")) if out_dir.is_dir() else []
    if proc.returncode != 0 or not produced:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        err = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln or "Fail" in ln),
                   lines[-1] if lines else f"exit code {proc.returncode}")
        result.problems.append(f"onnxruntime cannot convert the model to ORT format: {err[:300]}")
        return
    result.checks.append(f"converted to ORT format with onnxruntime's tools ({produced[0].stat().st_size:,} bytes)")
    _mobile_usability(link, result)
    dynamic = [v.name for v in model.graph.inputs if not v.is_initializer()
               and (v.shape is None or any(not isinstance(d, int) for d in v.shape))]
    if dynamic:
        result.notes.append(
            f"input(s) {', '.join(map(repr, dynamic))} have dynamic axes: NNAPI/CoreML need fixed shapes "
            "(the CPU provider is fine)"
        )


def _mobile_usability(path: Path, result: TargetCheck) -> None:
    """Notes from onnxruntime's mobile usability checker: NNAPI/CoreML partitions and node coverage."""
    import re

    cmd = [sys.executable, "-m", "onnxruntime.tools.check_onnx_model_mobile_usability", str(path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        result.notes.append("onnxruntime's mobile usability checker timed out")
        return
    text = proc.stdout + "\n" + proc.stderr
    ep = None
    found = False
    for line in text.splitlines():
        m = re.search(r"Checking (NNAPI|CoreML \w+)", line)
        if m:
            ep = m.group(1)
            continue
        m = re.search(r"(\d+) partitions with a total of (\d+)/(\d+) nodes", line)
        if m and ep:
            result.notes.append(f"{ep}: {m.group(1)} partition(s) covering {m.group(2)}/{m.group(3)} nodes "
                                "(onnxruntime's usability checker; the rest runs on the CPU provider)")
            found = True
    if found:
        result.checks.append("NNAPI/CoreML coverage estimated with onnxruntime's usability checker (see notes)")
    else:
        result.notes.append("onnxruntime's mobile usability checker gave no estimate")


def _external_files(path: Path) -> list[Path]:
    from onnxshrink.model import external_data_files

    return [f for f in external_data_files(path) if f.is_file()]


def _check_uint8_activations(model: ir.Model, result: TargetCheck) -> None:
    n = 0
    for graph in model.graphs():
        for node in graph:
            if node.domain not in _ONNX_DOMAINS or node.op_type != "QuantizeLinear":
                continue
            if _is_weight(node.inputs[0]):
                continue  # a weight quantized in the graph: NNAPI converts int8 weights itself
            n += 1
            tp = _q_output_type(node)
            if tp is not None and tp != ir.DataType.UINT8:
                result.problems.append(
                    f"{_node_label(node)} quantizes an activation to {tp.name.lower()}: mobile (NNAPI) "
                    "needs uint8 activations"
                )
    result.checks.append(f"quantized activations are uint8 ({n} QuantizeLinear on activations)")


# -- tensorrt -------------------------------------------------------------------------------------------


def _check_tensorrt(model: ir.Model, result: TargetCheck) -> None:
    opset = _opset(model)
    if opset < TENSORRT_MIN_OPSET:
        result.problems.append(
            f"opset {opset} < {TENSORRT_MIN_OPSET}: TensorRT explicit quantization needs opset >= 13 "
            "(per-axis QuantizeLinear/DequantizeLinear)"
        )
    elif opset > TENSORRT_KNOWN_OPSET:
        result.notes.append(f"opset {opset} is newer than these rules know ({TENSORRT_KNOWN_OPSET})")
    result.checks.append(f"opset {opset} >= {TENSORRT_MIN_OPSET}")
    counts = {"q": 0, "dq": 0}
    for graph in model.graphs():
        for node in graph:
            label = _node_label(node)
            if node.domain not in _ONNX_DOMAINS:
                what = "quantized-operator op, TensorRT takes QDQ only" if node.op_type in _QOP_OPS else \
                    "custom-domain op, needs a TensorRT plugin"
                result.problems.append(f"{label}: {what}")
                continue
            op = node.op_type
            if op == "DynamicQuantizeLinear":
                result.problems.append(f"{label}: DynamicQuantizeLinear is not supported by TensorRT "
                                       "(use static QDQ quantization)")
                continue
            if op in _QOP_OPS:
                result.problems.append(f"{label}: quantized-operator op, TensorRT takes QDQ only")
                continue
            if op not in TENSORRT_OPS:
                result.problems.append(f"{label}: op not supported by TensorRT's ONNX parser")
                continue
            if op in ("QuantizeLinear", "DequantizeLinear"):
                counts["q" if op == "QuantizeLinear" else "dq"] += 1
                _check_qdq_node(node, result)
    result.checks.append("no DynamicQuantizeLinear, no QLinear*/Integer ops, no custom-domain ops")
    result.checks.append(f"every op in TensorRT's supported list ({len(TENSORRT_OPS)} ops)")
    result.checks.append(
        f"{counts['q']} QuantizeLinear / {counts['dq']} DequantizeLinear: int8, zero point 0, constant "
        "scales, per-axis only on weights along the output-channel axis"
    )


def _check_qdq_node(node: ir.Node, result: TargetCheck) -> None:
    label = _node_label(node)
    is_q = node.op_type == "QuantizeLinear"
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    # integer type: int8 (int4 for weights, float8 allowed)
    qtype = _q_output_type(node) if is_q else _dq_input_type(node)
    weight = _is_weight(node.inputs[0]) or (
        not is_q and node.inputs[0] is not None and (p := node.inputs[0].producer()) is not None
        and p.op_type == "QuantizeLinear" and _is_weight(p.inputs[0])
    )
    if qtype == ir.DataType.INT32:
        result.problems.append(f"{label}: int32 quantization (a quantized bias?) is not supported by TensorRT; "
                               "keep biases float")
    elif qtype is not None and qtype not in _INT8_OK | _FLOAT8:
        result.problems.append(f"{label}: quantized type is {qtype.name.lower()}, TensorRT needs int8 "
                               "(symmetric; uint8 only as a network input/output)")
    elif qtype == ir.DataType.INT4 and not weight:
        result.problems.append(f"{label}: int4 is for weights only in TensorRT")
    # zero point: a constant of zeros
    if zp is not None:
        zt = constant_value(zp)
        if zt is None:
            result.problems.append(f"{label}: zero point {zp.name!r} is not a constant")
        else:
            try:
                arr = zt.numpy()
                nonzero = np.count_nonzero(np.asarray(arr, dtype=np.float64))
            except Exception:
                nonzero = 0
            if nonzero:
                result.problems.append(f"{label}: zero point {zp.name!r} has {nonzero} non-zero value(s); "
                                       "TensorRT needs symmetric quantization (zero point 0)")
    # scale: a constant with a static shape
    st = constant_value(scale)
    if st is None:
        result.problems.append(f"{label}: scale {scale.name if scale is not None else '?'!r} is not a constant "
                               "initializer")
        return
    n_scales = int(np.prod(st.shape.numpy())) if st.shape is not None else 1
    if node.attributes.get_int("block_size", 0):
        if not weight:
            result.problems.append(f"{label}: blocked quantization of an activation (weights only in TensorRT)")
        return
    if n_scales <= 1:
        return
    if not weight:
        result.problems.append(f"{label}: per-axis scale ({n_scales} values) on an activation; TensorRT "
                               "allows per-axis scales on weights only")
        return
    # the weight's consumer decides the output-channel axis
    axis = node.attributes.get_int("axis", 1)
    wvalue = node.inputs[0]
    wt = constant_value(wvalue)
    if wt is None and wvalue is not None and (p := wvalue.producer()) is not None:
        wt = constant_value(p.inputs[0])
    rank = len(wt.shape) if wt is not None else None
    if rank is not None and axis < 0:
        axis += rank
    dq_out = node.outputs[0] if not is_q else None
    if is_q:  # Q of a weight: look through to its DequantizeLinear
        dqs = [u.node for u in node.outputs[0].uses() if u.node.op_type == "DequantizeLinear"]
        dq_out = dqs[0].outputs[0] if dqs else None
    for use in (dq_out.uses() if dq_out is not None else []):
        consumer, idx = use.node, use.idx
        want = _output_channel_axis(consumer, idx, rank)
        if want is None:
            continue
        if axis != want:
            result.problems.append(
                f"{label}: per-axis scale along axis {axis} of the weight of {_node_label(consumer)}; TensorRT "
                f"needs the output-channel axis {want}"
            )
        elif wt is not None and wt.shape[want] != n_scales:
            result.problems.append(f"{label}: {n_scales} scales for {wt.shape[want]} output channels")


def _output_channel_axis(consumer: ir.Node, idx: int, rank: int | None) -> int | None:
    """The output-channel axis of ``consumer``'s weight input ``idx`` (None: not a weighted op's weight)."""
    if consumer.domain not in _ONNX_DOMAINS:
        return None
    op = consumer.op_type
    if op == "Conv" and idx == 1:
        return 0
    if op == "ConvTranspose" and idx == 1:
        return 1
    if op == "Gemm" and idx == 1:
        return 0 if consumer.attributes.get_int("transB", 0) else 1
    if op == "MatMul" and idx == 1 and rank is not None:
        return rank - 1
    return None
