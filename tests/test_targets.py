"""Deploy checks (onnxshrink.targets, `onnxshrink check`, `optimize --target`).

Every TensorRT rule has a small hand-built QDQ model that passes it and one that breaks it, and the
problem text must name the node at fault. cpu and mobile run onnxruntime for real.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxshrink.cli import main
from onnxshrink.errors import ModelLoadError, UsageError
from onnxshrink.model import load_model
from onnxshrink.targets import TARGETS, check_target

MODELS = Path(__file__).resolve().parent.parent / "models"


def _qdq_conv(tmp: Path, name: str = "m.onnx", *, act_dtype=np.int8, act_zp=0, act_zp_given=True,
              w_axis=0, per_channel=True, opset=13, act_per_axis=False, scale_as_input=False,
              consumer="Conv", trans_b=1) -> Path:
    """x → Q → DQ → consumer(·, DQ(w_q)) with the knobs the rules care about."""
    rng = np.random.default_rng(0)
    if consumer == "Conv":
        w = rng.integers(-127, 127, (4, 3, 3, 3)).astype(np.int8)
        x_shape, y_shape, out_ch = [1, 3, 8, 8], [1, 4, 6, 6], 4
    elif consumer == "Gemm":
        w = rng.integers(-127, 127, (4, 3) if trans_b else (3, 4)).astype(np.int8)
        x_shape, y_shape, out_ch = [2, 3], [2, 4], 4
    else:  # MatMul
        w = rng.integers(-127, 127, (3, 4)).astype(np.int8)
        x_shape, y_shape, out_ch = [2, 3], [2, 4], 4
    n = w.shape[w_axis] if per_channel else 1
    w_scale = np.full(n, 0.01, np.float32) if per_channel else np.array(0.01, np.float32)
    w_zp = np.zeros(n, np.int8) if per_channel else np.array(0, np.int8)
    x_scale = np.full(3, 0.02, np.float32) if act_per_axis else np.array(0.02, np.float32)
    x_zp = np.full(3, act_zp, act_dtype) if act_per_axis else np.array(act_zp, act_dtype)
    inits = [nh.from_array(w, "w_q"), nh.from_array(w_scale, "w_scale"), nh.from_array(w_zp, "w_zp"),
             nh.from_array(x_zp, "x_zp")]
    inputs = [h.make_tensor_value_info("x", T.FLOAT, x_shape)]
    if scale_as_input:
        inputs.append(h.make_tensor_value_info("x_scale", T.FLOAT, []))
    else:
        inits.append(nh.from_array(x_scale, "x_scale"))
    zp = ["x_zp"] if act_zp_given else []
    ax = (lambda a: {"axis": a}) if opset >= 13 else (lambda a: {})  # opset 10-12: per-tensor only
    nodes = [
        h.make_node("QuantizeLinear", ["x", "x_scale", *zp], ["xq"], name="q_x", **ax(1)),
        h.make_node("DequantizeLinear", ["xq", "x_scale", *zp], ["xd"], name="dq_x", **ax(1)),
        h.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["wd"], name="dq_w", **ax(w_axis)),
    ]
    attrs = {"transB": trans_b} if consumer == "Gemm" else {}
    nodes.append(h.make_node(consumer, ["xd", "wd"], ["y"], name="op", **attrs))
    g = h.make_graph(nodes, "g", inputs, [h.make_tensor_value_info("y", T.FLOAT, y_shape)], inits)
    del out_ch
    path = tmp / name
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", opset)]), str(path))
    return path


def _single_node(tmp: Path, node, inputs, outputs, inits=(), opset=17, domains=()) -> Path:
    g = h.make_graph([node], "g", inputs, outputs, list(inits))
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset), *[h.make_opsetid(d, 1) for d in domains]])
    path = tmp / "m.onnx"
    onnx.save(m, str(path))
    return path


def _problems(path, target="tensorrt"):
    res = check_target(path, target)
    assert res.ok == (not res.problems)
    assert res.checks, "a check must say what it verified"
    return res.problems


# --------------------------------------------------------------------------------------------------
# TensorRT static rules


@pytest.mark.parametrize("consumer,trans_b,axis", [("Conv", 1, 0), ("Gemm", 1, 0), ("Gemm", 0, 1), ("MatMul", 0, 1)])
def test_tensorrt_accepts_symmetric_int8_per_channel_weights(tmp_path, consumer, trans_b, axis):
    assert _problems(_qdq_conv(tmp_path, consumer=consumer, trans_b=trans_b, w_axis=axis)) == []


def test_tensorrt_accepts_per_tensor(tmp_path):
    assert _problems(_qdq_conv(tmp_path, per_channel=False)) == []


@pytest.mark.parametrize("consumer,trans_b,axis,want", [("Conv", 1, 1, 0), ("Gemm", 1, 1, 0), ("Gemm", 0, 0, 1),
                                                        ("MatMul", 0, 0, 1)])
def test_tensorrt_per_channel_weight_on_wrong_axis(tmp_path, consumer, trans_b, axis, want):
    problems = _problems(_qdq_conv(tmp_path, consumer=consumer, trans_b=trans_b, w_axis=axis))
    assert len(problems) == 1, problems
    assert "DequantizeLinear node 'dq_w'" in problems[0]
    assert f"along axis {axis}" in problems[0] and f"output-channel axis {want}" in problems[0]


def test_tensorrt_uint8_asymmetric_activation(tmp_path):
    problems = _problems(_qdq_conv(tmp_path, act_dtype=np.uint8, act_zp=128))
    text = "\n".join(problems)
    assert "QuantizeLinear node 'q_x': quantized type is uint8" in text
    assert "DequantizeLinear node 'dq_x': quantized type is uint8" in text
    assert "zero point 'x_zp' has 1 non-zero value(s)" in text


def test_tensorrt_int8_nonzero_zero_point(tmp_path):
    problems = _problems(_qdq_conv(tmp_path, act_zp=3))
    assert len(problems) == 2 and all("non-zero" in p for p in problems), problems


def test_tensorrt_missing_zero_point_means_uint8(tmp_path):
    problems = _problems(_qdq_conv(tmp_path, act_zp_given=False))
    assert any("'q_x': quantized type is uint8" in p for p in problems), problems


def test_tensorrt_per_axis_activation(tmp_path):
    problems = _problems(_qdq_conv(tmp_path, act_per_axis=True))
    assert any("'q_x': per-axis scale (3 values) on an activation" in p for p in problems), problems
    assert any("'dq_x': per-axis scale" in p for p in problems), problems


def test_tensorrt_scale_not_constant(tmp_path):
    problems = _problems(_qdq_conv(tmp_path, scale_as_input=True))
    assert any("scale 'x_scale' is not a constant" in p for p in problems), problems


def test_tensorrt_old_opset(tmp_path):
    problems = _problems(_qdq_conv(tmp_path, per_channel=False, opset=12))
    assert problems == ["opset 12 < 13: TensorRT explicit quantization needs opset >= 13 "
                        "(per-axis QuantizeLinear/DequantizeLinear)"]


def test_tensorrt_dynamic_quantize_linear(tmp_path):
    p = _single_node(tmp_path, h.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"], name="dql"),
                     [h.make_tensor_value_info("x", T.FLOAT, [4])],
                     [h.make_tensor_value_info("y", T.UINT8, [4]), h.make_tensor_value_info("s", T.FLOAT, []),
                      h.make_tensor_value_info("z", T.UINT8, [])])
    assert _problems(p) == ["DynamicQuantizeLinear node 'dql': DynamicQuantizeLinear is not supported by "
                            "TensorRT (use static QDQ quantization)"]


def test_tensorrt_qlinear_ops(tmp_path):
    inits = [nh.from_array(np.array(0.1, np.float32), n) for n in ("a_s", "b_s", "y_s")]
    inits += [nh.from_array(np.array(0, np.uint8), n) for n in ("a_z", "b_z", "y_z")]
    inits.append(nh.from_array(np.ones((4, 2), np.uint8), "b"))
    p = _single_node(tmp_path, h.make_node("QLinearMatMul", ["a", "a_s", "a_z", "b", "b_s", "b_z", "y_s", "y_z"],
                                           ["y"], name="qmm"),
                     [h.make_tensor_value_info("a", T.UINT8, [3, 4])], [h.make_tensor_value_info("y", T.UINT8, [3, 2])],
                     inits)
    assert _problems(p) == ["QLinearMatMul node 'qmm': quantized-operator op, TensorRT takes QDQ only"]


def test_tensorrt_custom_domain_and_unsupported_op(tmp_path):
    nodes = [h.make_node("MyOp", ["x"], ["t"], name="custom", domain="com.example"),
             h.make_node("TfIdfVectorizer", ["ti"], ["u"], name="tfidf", mode="TF", min_gram_length=1,
                         max_gram_length=1, max_skip_count=0, ngram_counts=[0], ngram_indexes=[0], pool_int64s=[1])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [4]),
                                  h.make_tensor_value_info("ti", T.INT64, [4])],
                     [h.make_tensor_value_info("t", T.FLOAT, [4]), h.make_tensor_value_info("u", T.FLOAT, [1])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.example", 1)])
    onnx.save(m, str(tmp_path / "m.onnx"))
    problems = _problems(tmp_path / "m.onnx")
    assert problems == ["com.example::MyOp node 'custom': custom-domain op, needs a TensorRT plugin",
                        "TfIdfVectorizer node 'tfidf': op not supported by TensorRT's ONNX parser"]


def test_tensorrt_int32_bias_dequantize(tmp_path):
    inits = [nh.from_array(np.arange(4, dtype=np.int32), "b_q"), nh.from_array(np.array(0.01, np.float32), "b_s")]
    p = _single_node(tmp_path, h.make_node("DequantizeLinear", ["b_q", "b_s"], ["y"], name="dq_bias"), [],
                     [h.make_tensor_value_info("y", T.FLOAT, [4])], inits)
    assert _problems(p) == ["DequantizeLinear node 'dq_bias': int32 quantization (a quantized bias?) is not "
                            "supported by TensorRT; keep biases float"]


def test_tensorrt_accepts_a_float_model(tmp_path):
    assert _problems(MODELS / "digits_cnn.onnx") == []


def test_check_target_takes_an_ir_model_and_checks_names(tmp_path):
    m = load_model(_qdq_conv(tmp_path, w_axis=1))
    res = check_target(m, "tensorrt")
    assert not res.ok and "dq_w" in res.problems[0]
    assert res.to_dict()["target"] == "tensorrt"
    with pytest.raises(UsageError, match="unknown target 'tensorr'"):
        check_target(m, "tensorr")
    with pytest.raises(ModelLoadError):
        check_target(tmp_path / "nope.onnx", "tensorrt")
    assert TARGETS == ("cpu", "mobile", "tensorrt")


# --------------------------------------------------------------------------------------------------
# cpu and mobile run onnxruntime


def test_cpu_loads_and_runs(tmp_path):
    res = check_target(MODELS / "digits_cnn.onnx", "cpu")
    assert res.ok, res
    assert "ran once on synthetic inputs (1 output(s))" in res.checks


def test_cpu_model_that_fails_at_run_time(tmp_path):
    # per-axis weight scales along axis 1 (3 values) of a [4,3,3,3] weight whose DequantizeLinear says axis 0
    path = _qdq_conv(tmp_path, w_axis=1)
    m = onnx.load(str(path))
    for n in m.graph.node:
        if n.name == "dq_w":
            n.attribute[0].i = 0
    onnx.save(m, str(path))
    res = check_target(path, "cpu")
    assert not res.ok and "cannot run the model on synthetic inputs" in res.problems[0], res


def test_cpu_model_that_does_not_load(tmp_path):
    p = _single_node(tmp_path, h.make_node("MyOp", ["x"], ["y"], name="custom", domain="com.example"),
                     [h.make_tensor_value_info("x", T.FLOAT, [4])], [h.make_tensor_value_info("y", T.FLOAT, [4])],
                     domains=["com.example"])
    res = check_target(p, "cpu")
    assert not res.ok and res.problems[0].startswith("onnxruntime (CPU) cannot load the model"), res


def test_cpu_dynamic_axis_without_shape_is_a_note_not_a_pass(tmp_path):
    p = _single_node(tmp_path, h.make_node("Relu", ["x"], ["y"]),
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", "L"])], [h.make_tensor_value_info("y", T.FLOAT, ["N", "L"])])
    res = check_target(p, "cpu")
    assert res.ok and any("not run" in n for n in res.notes), res
    assert not any("ran once" in c for c in res.checks)
    res = check_target(p, "cpu", input_shapes={"x": [2, 5]})
    assert any("ran once" in c for c in res.checks)


def test_mobile_uint8_qdq_converts(tmp_path):
    res = check_target(_qdq_conv(tmp_path, act_dtype=np.uint8, act_zp=128), "mobile")
    assert res.ok, res
    assert any(c.startswith("converted to ORT format") for c in res.checks)
    assert any(n.startswith("NNAPI: 1 partition(s) covering 4/4 nodes") for n in res.notes), res.notes


def test_mobile_int8_activations_and_unconvertible_model(tmp_path):
    res = check_target(_qdq_conv(tmp_path), "mobile")
    assert res.problems == ["QuantizeLinear node 'q_x' quantizes an activation to int8: mobile (NNAPI) needs "
                            "uint8 activations"]
    p = _single_node(tmp_path, h.make_node("MyOp", ["x"], ["y"], name="custom", domain="com.example"),
                     [h.make_tensor_value_info("x", T.FLOAT, [4])], [h.make_tensor_value_info("y", T.FLOAT, [4])],
                     domains=["com.example"])
    res = check_target(p, "mobile")
    assert not res.ok and "cannot convert the model to ORT format" in res.problems[0], res


# --------------------------------------------------------------------------------------------------
# CLI


def _cli(capsys, *args):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code or 0, out, err


def test_cli_check_exit_codes(tmp_path, capsys):
    good = _qdq_conv(tmp_path, "good.onnx")
    bad = _qdq_conv(tmp_path, "bad.onnx", act_dtype=np.uint8, act_zp=128)
    code, out, _ = _cli(capsys, "check", good, "--target", "tensorrt")
    assert code == 0 and "target tensorrt: OK" in out
    code, out, _ = _cli(capsys, "check", bad, "--target", "tensorrt", "--json")
    assert code == 1
    data = json.loads(out)
    assert data["ok"] is False and len(data["problems"]) == 4
    code, _, err = _cli(capsys, "check", tmp_path / "nope.onnx", "--target", "cpu")
    assert code == 2 and err.startswith("error: model file")
    code, _, err = _cli(capsys, "check", good, "--target", "gpu")
    assert code == 2 and "unknown target 'gpu'" in err


def test_cli_optimize_target_ok_is_reported(tmp_path, capsys):
    shutil.copyfile(MODELS / "digits_cnn.onnx", tmp_path / "cnn.onnx")
    code, _, err = _cli(capsys, "optimize", tmp_path / "cnn.onnx", "-o", tmp_path / "o.onnx", "--target", "cpu",
                        "--report", tmp_path / "r.json", "--quiet")
    assert code == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["target"]["target"] == "cpu" and rep["target"]["ok"] is True
    assert (tmp_path / "o.onnx").exists()


def test_cli_optimize_target_problem_exit_1_nothing_written(tmp_path, capsys):
    src = _qdq_conv(tmp_path, "q.onnx", act_dtype=np.uint8, act_zp=128)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    code, _, err = _cli(capsys, "optimize", src, "-o", tmp_path / "o.onnx", "--target", "tensorrt", "--quiet")
    assert code == 1, err
    assert err.startswith("error: the result does not pass the tensorrt checks: QuantizeLinear node 'q_x'")
    assert "(and 3 more)" in err and "hint: nothing was written" in err
    assert not (tmp_path / "o.onnx").exists()
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    code, _, err = _cli(capsys, "optimize", src, "-o", tmp_path / "o.onnx", "--target", "tensorrt", "--quiet", "--force")
    assert code == 1 and (tmp_path / "o.onnx").exists()


def test_cli_optimize_unknown_target_exit_2(tmp_path, capsys):
    shutil.copyfile(MODELS / "digits_cnn.onnx", tmp_path / "cnn.onnx")
    code, _, err = _cli(capsys, "optimize", tmp_path / "cnn.onnx", "--target", "tensorrtt")
    assert code == 2 and "did you mean 'tensorrt'?" in err
    assert not (tmp_path / "cnn.small.onnx").exists()


def test_api_save_refuses_a_result_that_fails_its_target(tmp_path):
    import onnxshrink
    from onnxshrink.errors import TargetCheckFailedError

    src = _qdq_conv(tmp_path, "q.onnx", act_dtype=np.uint8, act_zp=128)
    res = onnxshrink.optimize(src, "fold", target="tensorrt")
    assert res.ok and not res.target_ok and len(res.report.target.problems) == 4
    assert res.report.to_dict()["target"]["ok"] is False
    with pytest.raises(TargetCheckFailedError, match="does not pass the tensorrt checks") as exc:
        res.save(tmp_path / "o.onnx")
    assert exc.value.exit_code == 1 and not (tmp_path / "o.onnx").exists()
    res.save(tmp_path / "o.onnx", force=True)
    assert (tmp_path / "o.onnx").exists()
    with pytest.raises(UsageError, match="unknown target"):
        onnxshrink.optimize(src, "fold", target="trt")


def test_quant_follows_the_deploy_target(tmp_path, capsys):
    import onnxshrink

    calib = str(MODELS / "digits_calib.npz")
    res = onnxshrink.optimize(str(MODELS / "digits_cnn.onnx"), "fold,quant(mode=static)", data=calib,
                              target="tensorrt", latency=False)
    assert res.ok and res.target_ok, res.report.target.problems
    quant = res.report.passes[-1]
    assert quant.details["target_check"] == "tensorrt: ok"
    assert "quant works for target=tensorrt (from --target)" in json.dumps(res.report.to_dict())
    assert "quant(mode=static,format=qdq,target=tensorrt" in res.report.pipeline
    # symmetric int8 activations: every activation zero point is an int8 0
    import onnx_ir as ir

    proto = ir.to_proto(res.model)
    inits = {i.name: nh.to_array(i) for i in proto.graph.initializer}
    zps = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert zps and all(z.dtype == np.int8 and int(z) == 0 for z in zps)
    with pytest.raises(UsageError, match=r"quant\(target=cpu\) contradicts --target tensorrt"):
        onnxshrink.optimize(str(MODELS / "digits_cnn.onnx"), "quant(mode=static,target=cpu)", data=calib,
                            target="tensorrt")
    shutil.copyfile(MODELS / "digits_cnn.onnx", tmp_path / "cnn.onnx")
    code, _, err = _cli(capsys, "optimize", tmp_path / "cnn.onnx", "--passes", "fold,quant(target=mobile)",
                        "--data", calib, "--target", "tensorrt", "--quiet")
    assert code == 2 and "contradicts --target tensorrt" in err
    code, out, err = _cli(capsys, "optimize", tmp_path / "cnn.onnx", "--passes", "fold,quant", "--data", calib,
                          "--target", "tensorrt", "-o", tmp_path / "o.onnx", "--quiet", "--no-validate")
    assert code == 0, err
    assert _problems(tmp_path / "o.onnx") == []
