"""onnxshrink.compare and the HTML report: output distributions, task metrics, CI exit codes, per-layer
matching through QDQ / fused BatchNorm / low-rank splits, bad-layer-first ranking, grouped capture in
bounded memory, and the page rendered in headless Chromium (screenshot in tests/artifacts/)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxshrink
from onnxshrink.calib import Dataset
from onnxshrink.compare import HIST_EDGES, compare, match_layers
from onnxshrink.errors import DataError
from onnxshrink.model import load_model

from conftest import MODELS, run_cli, run_ort

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
MBV2 = MODELS / "digits_mobilenetv2.onnx"
TEST_NPZ = MODELS / "digits_test.npz"
LABELS = MODELS / "digits_test_labels.npy"
CALIB_NPZ = MODELS / "digits_calib.npz"
BAD_LAYER = "/blocks/blocks.2/body/body.0/Conv"  # the layer the QDQ fixture quantizes with a wrong scale


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _model(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _scale_model(path: Path, w: np.ndarray) -> Path:
    """y = x * w, x float[N, C] (C = len(w)); plus cls = ArgMax(y) int64[N]."""
    c = len(w)
    nodes = [helper.make_node("Mul", ["x", "w"], ["y"]), helper.make_node("ArgMax", ["y"], ["cls"], axis=1, keepdims=0)]
    return _save(_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c]),
                         helper.make_tensor_value_info("cls", TensorProto.INT64, ["N"])],
                        [numpy_helper.from_array(w.astype(np.float32), "w")]), path)


# --------------------------------------------------------------------------------------------------
# Outputs: distributions, agreement, labels


RNG = np.random.default_rng(7)
X7 = RNG.standard_normal((50, 7)).astype(np.float32)
Y7 = RNG.integers(0, 7, 50)
W_REF = np.ones(7, np.float32)
W_CAND = np.array([1.3, 1, 0.8, 1, 1, 1.1, 1], np.float32)


@pytest.fixture
def scale_pair(tmp_path):
    ref = _scale_model(tmp_path / "ref.onnx", W_REF)
    cand = _scale_model(tmp_path / "cand.onnx", W_CAND)
    np.savez(tmp_path / "x.npz", x=X7)
    np.save(tmp_path / "y.npy", Y7)
    return ref, cand, tmp_path


def _numpy_truth(w_ref, w_cand):
    r = (X7 * w_ref).astype(np.float64)
    c = (X7 * w_cand).astype(np.float32).astype(np.float64)
    per = np.linalg.norm(c - r, axis=1) / np.linalg.norm(r, axis=1)
    top5c = np.argsort(-c, axis=1)[:, :5]
    return r, c, per, top5c


def test_output_distribution_and_agreement_match_numpy(scale_pair):
    ref, cand, tmp = scale_pair
    res = compare(ref, cand, data=tmp / "x.npz", tolerance=1.0, size=False)
    r, c, per, top5c = _numpy_truth(W_REF, W_CAND)
    y = res.outputs[0]
    assert y.metrics.name == "y" and y.metrics.kind == "float"
    assert y.metrics.rel_l2 == pytest.approx(np.linalg.norm(c - r) / np.linalg.norm(r), rel=1e-5)
    for q, key in ((50, "p50"), (90, "p90"), (99, "p99")):
        assert y.per_sample[key] == pytest.approx(np.percentile(per, q), rel=1e-5)
    assert y.per_sample["max"] == pytest.approx(per.max(), rel=1e-5)
    want_hist = np.histogram(per, bins=np.array(HIST_EDGES[:-1] + [1e301]))[0]
    assert y.histogram == list(want_hist) and sum(y.histogram) == 50
    assert y.metrics.top1 == pytest.approx(np.mean(r.argmax(1) == c.argmax(1)))
    assert y.top5 == pytest.approx(np.mean([r.argmax(1)[i] in top5c[i] for i in range(50)]))
    assert y.metrics.top1 < 1.0  # the perturbation flips some rows: the checks above are not vacuous
    cls = res.outputs[1]
    assert cls.metrics.kind == "exact"
    assert cls.metrics.mismatch == pytest.approx(np.mean(r.argmax(1) != c.argmax(1)))


def test_labels_give_top1_top5_for_both_models_and_exact_match(scale_pair):
    ref, cand, tmp = scale_pair
    res = compare(ref, cand, data=tmp / "x.npz", labels=tmp / "y.npy", tolerance=1.0, size=False)
    r, c, _, top5c = _numpy_truth(W_REF, W_CAND)
    top5r = np.argsort(-r, axis=1)[:, :5]
    t = res.outputs[0].task
    assert t["metric"] == "top-1"
    assert t["ref"] == pytest.approx(np.mean(r.argmax(1) == Y7))
    assert t["cand"] == pytest.approx(np.mean(c.argmax(1) == Y7))
    assert t["delta"] == pytest.approx(t["cand"] - t["ref"])
    assert t["ref_top5"] == pytest.approx(np.mean([Y7[i] in top5r[i] for i in range(50)]))
    assert t["cand_top5"] == pytest.approx(np.mean([Y7[i] in top5c[i] for i in range(50)]))
    e = res.outputs[1].task  # the ArgMax output: exact match against the labels
    assert e["metric"] == "exact match"
    assert e["cand"] == pytest.approx(np.mean(c.argmax(1) == Y7))


def test_digits_accuracy_is_the_known_one():
    res = compare(MBV2, MBV2, data=TEST_NPZ, labels=LABELS, size=False)
    assert res.passed
    t = res.outputs[0].task
    assert t["ref"] == t["cand"] == pytest.approx(0.9875)  # models/README.md
    assert t["delta"] == 0


def test_labels_must_fit(scale_pair):
    ref, cand, tmp = scale_pair
    np.save(tmp / "short.npy", Y7[:10])
    with pytest.raises(DataError, match="10 entries"):
        compare(ref, cand, data=tmp / "x.npz", labels=tmp / "short.npy")
    np.save(tmp / "float.npy", Y7.astype(np.float32))
    with pytest.raises(DataError, match="integers"):
        compare(ref, cand, data=tmp / "x.npz", labels=tmp / "float.npy")


# --------------------------------------------------------------------------------------------------
# CLI: a CI gate


def test_cli_exit_codes_and_per_output_tolerance(scale_pair, capsys):
    ref, cand, tmp = scale_pair
    same = run_cli(capsys, "compare", ref, ref, "--data", tmp / "x.npz", "--quiet")
    assert same[0] == 0 and same[1] == "" and same[2] == ""
    code, out, err = run_cli(capsys, "compare", ref, cand, "--data", tmp / "x.npz")
    assert code == 3
    assert err.startswith("error: outside tolerance: output 'y' rel_l2") and "Traceback" not in err
    assert "outputs" in out and "FAILED" in out
    # per-output tolerances: loose enough for both outputs -> 0; y loose but cls strict -> 3
    assert run_cli(capsys, "compare", ref, cand, "--data", tmp / "x.npz", "--tol", "y=0.5", "--tol", "cls=0.5", "-q")[0] == 0
    code, _, err = run_cli(capsys, "compare", ref, cand, "--data", tmp / "x.npz", "--tol", "y=0.5", "-q")
    assert code == 3 and "output 'cls' mismatch" in err and "'y'" not in err


def test_cli_max_drop_gates_accuracy(scale_pair, capsys):
    ref, cand, tmp = scale_pair
    res = compare(ref, cand, data=tmp / "x.npz", labels=tmp / "y.npy", tolerance=1.0, size=False)
    drop = -res.outputs[0].task["delta"]
    assert drop > 0  # the candidate is worse on these labels
    base = ["compare", ref, cand, "--data", tmp / "x.npz", "--labels", tmp / "y.npy", "--tol", "1", "-q"]
    assert run_cli(capsys, *base, "--max-drop", str(drop + 0.001))[0] == 0
    code, _, err = run_cli(capsys, *base, "--max-drop", str(max(drop - 0.01, 0)))
    assert code == 3 and "accuracy drops" in err


@pytest.mark.parametrize("args, message", [
    (["--labels", "missing.npy"], "labels file"),
    (["--report", "out.txt"], "unknown format"),
    (["--tol", "nope=1"], "unknown output 'nope'"),
    (["--max-drop", "0.01"], "--max-drop needs --labels"),
    (["--max-drop", "5", "--labels", "y.npy"], "must be a fraction"),
])
def test_cli_bad_input_is_exit_2_one_line(scale_pair, capsys, monkeypatch, args, message):
    ref, cand, tmp = scale_pair
    monkeypatch.chdir(tmp)
    code, out, err = run_cli(capsys, "compare", ref, cand, "--data", "x.npz", *args)
    assert code == 2, err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_not_onnx_is_exit_2(scale_pair, capsys):
    ref, _, tmp = scale_pair
    (tmp / "junk.onnx").write_bytes(b"not a model")
    code, _, err = run_cli(capsys, "compare", ref, tmp / "junk.onnx")
    assert code == 2 and err.startswith("error: ")


def test_cli_reports_json_and_markdown(scale_pair, capsys):
    ref, cand, tmp = scale_pair
    code, _, _ = run_cli(capsys, "compare", ref, cand, "--data", tmp / "x.npz", "--labels", tmp / "y.npy",
                         "--tol", "1", "--report", tmp / "d.json", "-q")
    assert code == 0
    d = json.loads((tmp / "d.json").read_text())
    assert set(d) == {"schema", "tool", "command", "version", "ref", "cand", "verdict", "reason", "samples", "source",
                      "seconds", "max_drop", "outputs", "per_layer", "latency", "size", "notes"}
    o = d["outputs"][0]
    assert {"name", "cand_name", "kind", "tolerance", "passed", "rel_l2", "snr_db", "top1", "top5",
            "per_sample_rel_l2", "histogram", "task"} <= set(o)
    assert set(o["per_sample_rel_l2"]) == {"mean", "p50", "p90", "p99", "max"}
    assert d["outputs"][1]["task"]["metric"] == "exact match"
    run_cli(capsys, "compare", ref, cand, "--data", tmp / "x.npz", "--tol", "1", "--report", tmp / "d.md", "-q")
    md = (tmp / "d.md").read_text()
    assert md.startswith("# onnxshrink compare") and "| y | float |" in md


def test_progress_bar_shown_on_a_terminal_and_silenced_by_quiet(scale_pair, capsys, monkeypatch):
    ref, cand, tmp = scale_pair
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich treats the captured stderr as a terminal
    monkeypatch.setenv("TTY_INTERACTIVE", "0")
    _, _, err = run_cli(capsys, "compare", ref, ref, "--data", tmp / "x.npz")
    assert "comparing outputs" in err
    _, out, err = run_cli(capsys, "compare", ref, ref, "--data", tmp / "x.npz", "--quiet")
    assert err == "" and out == ""


# --------------------------------------------------------------------------------------------------
# Per-layer matching


def _conv_relu_conv(w1, w2, b2):
    return [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
            helper.make_node("Relu", ["c2"], ["y"], name="relu2")]


def _io(c_in=4, c_out=6, hw=8):
    return ([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, hw, hw])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c_out, hw, hw])])


def _qdq(name, x, scale, zp=0, dtype=np.uint8):
    """Q -> DQ nodes on ``x`` (named ``name``), with their initializers."""
    inits = [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
             numpy_helper.from_array(np.array(zp, dtype), f"{name}_z")]
    nodes = [helper.make_node("QuantizeLinear", [x, f"{name}_s", f"{name}_z"], [f"{name}_q"], name=f"{name}_Q"),
             helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"],
                              name=f"{name}_DQ")]
    return nodes, inits


def _weight_dq(name, w, axis=0, bad=1.0):
    """int8 symmetric per-channel weight + DequantizeLinear; ``bad`` multiplies the scale."""
    amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    s = (np.where(amax > 0, amax, 1) / 127 * bad).astype(np.float32)
    q = np.clip(np.round(w / s.reshape(-1, *[1] * (w.ndim - 1))), -127, 127).astype(np.int8)
    inits = [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(s, f"{name}_s"),
             numpy_helper.from_array(np.zeros_like(s, dtype=np.int8), f"{name}_z")]
    node = helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_w"],
                            axis=axis, name=f"{name}_wDQ")
    return node, inits


def test_matching_through_qdq_pairs(tmp_path):
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 4, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((6, 6, 1, 1)).astype(np.float32) * 0.3
    b2 = rng.standard_normal(6).astype(np.float32)
    inp, out = _io()
    ref = _save(_model(_conv_relu_conv(w1, w2, b2), inp, out, [numpy_helper.from_array(w1, "w1"),
                                                                   numpy_helper.from_array(w2, "w2"),
                                                                   numpy_helper.from_array(b2, "b2")]),
                tmp_path / "ref.onnx")
    # candidate: renamed tensors, activations through Q/DQ, weights int8 through DQ
    qx, ix = _qdq("in", "x", 8 / 255, 128)
    qr, ir_ = _qdq("act", "t_relu", 6 / 255, 0)
    d1, i1 = _weight_dq("k1", w1)
    d2, i2 = _weight_dq("k2", w2)
    nodes = qx + [d1, helper.make_node("Conv", ["in_dq", "k1_w"], ["t_conv"], pads=[1, 1, 1, 1], name="A"),
                  helper.make_node("Relu", ["t_conv"], ["t_relu"], name="B")] + qr + [
        d2, helper.make_node("Conv", ["act_dq", "k2_w", "b2"], ["t_c2"], name="C"),
        helper.make_node("Relu", ["t_c2"], ["y"], name="D")]
    cand = _save(_model(nodes, inp, out, ix + ir_ + i1 + i2 + [numpy_helper.from_array(b2, "b2")]), tmp_path / "cand.onnx")
    matches, unmatched, fused = match_layers(load_model(ref), load_model(cand))
    got = {m.ref: (m.cand, m.how) for m in matches}
    assert got == {"c1": ("t_conv", "same op"), "r1": ("act_dq", "QDQ"), "c2": ("t_c2", "same op"),
                   "y": ("y", "same op")}
    assert unmatched == [] and fused == []
    x = rng.uniform(0, 1, (8, 4, 8, 8)).astype(np.float32)
    res = compare(ref, cand, data=Dataset([lambda: {"x": x[:, None]}], 8, "t"), per_layer=True, tolerance=1.0,
                  size=False)
    by = {l.match.ref: l for l in res.per_layer.layers}
    assert 0 < by["c1"].rel_l2 < 0.05 and by["r1"].rel_l2 > 0  # int8 error, measured on the DQ output


def test_matching_through_fused_batchnorm(tmp_path):
    folded = tmp_path / "mb_fold.onnx"
    r = onnxshrink.optimize(MBV2, "fold", data=TEST_NPZ, output=folded)
    r.save(folded)
    r.close()
    ref_m, cand_m = load_model(MBV2), load_model(folded)
    from onnxshrink.compare import _infer
    _infer(ref_m), _infer(cand_m)
    matches, unmatched, fused = match_layers(ref_m, cand_m)
    bn = [m for m in matches if m.how == "fused BN"]
    assert len(bn) == 14 and all("BatchNormalization_output_0" in m.ref and m.cand.endswith("Conv_output_0")
                                 for m in bn)
    assert len(fused) == 14 and unmatched == []
    res = compare(MBV2, folded, data=TEST_NPZ, limit=64, per_layer=True, size=False)
    assert res.passed and len(res.per_layer.layers) == len(matches)
    assert max(l.rel_l2 for l in res.per_layer.layers) < 1e-5  # fold is exact: the pairs are right


def _svd_split(w: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    m = w.reshape(w.shape[0], -1).astype(np.float64)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    a = (np.sqrt(s[:r])[:, None] * vt[:r]).astype(np.float32)
    b = (u[:, :r] * np.sqrt(s[:r])).astype(np.float32)
    return a, b


def test_matching_through_low_rank_splits(tmp_path):
    rng = np.random.default_rng(1)
    wc = rng.standard_normal((16, 4, 3, 3)).astype(np.float32) * 0.3
    bc = rng.standard_normal(16).astype(np.float32) * 0.1
    wg = rng.standard_normal((10, 16 * 8 * 8)).astype(np.float32) * 0.05
    bg = rng.standard_normal(10).astype(np.float32)
    inp = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])]
    out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])]
    ref_nodes = [helper.make_node("Conv", ["x", "wc", "bc"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
                 helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
                 helper.make_node("Flatten", ["relu"], ["flat"], name="flatten"),
                 helper.make_node("Gemm", ["flat", "wg", "bg"], ["logits"], transB=1, name="fc")]
    ref = _save(_model(ref_nodes, inp, out, [numpy_helper.from_array(a, n) for a, n in
                                             ((wc, "wc"), (bc, "bc"), (wg, "wg"), (bg, "bg"))]), tmp_path / "ref.onnx")
    ca, cb = _svd_split(wc, 6)
    ga, gb = _svd_split(wg, 5)
    cand_nodes = [helper.make_node("Conv", ["x", "ca"], ["lr0"], pads=[1, 1, 1, 1], name="conv_lr_a"),
                  helper.make_node("Conv", ["lr0", "cb", "bc"], ["lr1"], name="conv_lr_b"),
                  helper.make_node("Relu", ["lr1"], ["relu"], name="relu"),
                  helper.make_node("Flatten", ["relu"], ["flat"], name="flatten"),
                  helper.make_node("Gemm", ["flat", "ga"], ["g0"], transB=1, name="fc_a"),
                  helper.make_node("Gemm", ["g0", "gb", "bg"], ["logits"], transB=1, name="fc_b")]
    inits = [numpy_helper.from_array(ca.reshape(6, 4, 3, 3), "ca"), numpy_helper.from_array(cb.reshape(16, 6, 1, 1), "cb"),
             numpy_helper.from_array(bc, "bc"), numpy_helper.from_array(ga, "ga"), numpy_helper.from_array(gb, "gb"),
             numpy_helper.from_array(bg, "bg")]
    cand = _save(_model(cand_nodes, inp, out, inits), tmp_path / "cand.onnx")
    ref_m, cand_m = load_model(ref), load_model(cand)
    from onnxshrink.compare import _infer
    _infer(ref_m), _infer(cand_m)
    matches, unmatched, _ = match_layers(ref_m, cand_m)
    got = {m.ref: (m.cand, m.cand_node, m.how) for m in matches}
    assert got["conv"] == ("lr1", "conv_lr_b", "low-rank split")
    assert got["logits"] == ("logits", "fc_b", "low-rank split")
    assert got["relu"][0] == "relu" and unmatched == []
    x = rng.standard_normal((16, 4, 8, 8)).astype(np.float32)
    res = compare(ref, cand, data=Dataset([lambda: {"x": x[:, None]}], 16, "t"), per_layer=True, tolerance=1.0,
                  size=False)
    by = {l.match.ref: l for l in res.per_layer.layers}
    r_ref = run_ort(ref, {"x": x})[0]
    assert by["logits"].rel_l2 == pytest.approx(res.outputs[0].metrics.rel_l2, rel=1e-6)  # same tensor, same error
    assert by["conv"].rel_l2 > 1e-3  # truncation error, measured against the real conv output
    assert r_ref.shape == (16, 10)


# --------------------------------------------------------------------------------------------------
# The quantized MobileNetV2 with one badly quantized layer


def _activation_ranges(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict[str, tuple[float, float]]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    for n in names:
        m.graph.output.append(helper.make_empty_tensor_value_info(n))
    outs = run_ort(m, {"input": x})
    return {n: (float(min(o.min(), 0)), float(max(o.max(), 0))) for n, o in zip(names, outs)}


def build_qdq_mobilenet(folded: Path, out: Path, bad_node: str | None = BAD_LAYER, bad: float = 50.0) -> Path:
    """Static QDQ int8 of the folded digits MobileNetV2: per-channel symmetric int8 weights (Conv, Gemm) and
    asymmetric uint8 activations at every Conv/Gemm input, scales from min/max on the calibration set; the
    weight scale of ``bad_node`` is ``bad`` times too coarse."""
    m = onnx.load(str(folded))
    inits = {i.name: i for i in m.graph.initializer}
    x = np.load(CALIB_NPZ)["input"][:128]
    targets = [n for n in m.graph.node if n.op_type in ("Conv", "Gemm")]
    acts = list(dict.fromkeys(n.input[0] for n in targets))
    ranges = _activation_ranges(m, acts, x)
    new_nodes, new_inits, act_map = [], [], {}
    for a in acts:
        lo, hi = ranges[a]
        s = max(hi - lo, 1e-8) / 255
        zp = int(np.clip(round(-lo / s), 0, 255))
        nodes, ini = _qdq(f"act{len(act_map)}", a, s, zp)
        act_map[a] = (nodes, ini, f"act{len(act_map)}_dq")
    out_nodes = []
    for node in m.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            a = node.input[0]
            nodes, ini, dq = act_map[a]
            if nodes is not None:
                out_nodes += nodes
                new_inits += ini
                act_map[a] = (None, None, dq)
            w = numpy_helper.to_array(inits[node.input[1]])
            axis = 0
            wn = f"{node.name}_W"
            d, wi = _weight_dq(wn, w, axis=axis, bad=bad if node.name == bad_node else 1.0)
            out_nodes.append(d)
            new_inits += wi
            node.input[0] = dq
            node.input[1] = f"{wn}_w"
        out_nodes.append(node)
    used = {i for n in out_nodes for i in n.input}
    keep = [i for i in m.graph.initializer if i.name in used]
    del m.graph.node[:]
    m.graph.node.extend(out_nodes)
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep + new_inits)
    return _save(m, out)


@pytest.fixture(scope="module")
def qdq_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("qdq")
    folded = d / "mb_fold.onnx"
    r = onnxshrink.optimize(MBV2, "fold", output=folded, validate=False)
    r.save(folded)
    r.close()
    good = build_qdq_mobilenet(folded, d / "mb_qdq_good.onnx", bad_node=None)
    bad = build_qdq_mobilenet(folded, d / "mb_qdq_bad.onnx")
    return folded, good, bad


def test_bad_layer_ranks_first_on_qdq_mobilenet(qdq_models):
    _, good, bad = qdq_models
    onnx.checker.check_model(onnx.load(str(bad)))
    ops = {n.op_type for n in onnx.load(str(bad)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "BatchNormalization" not in ops
    res = compare(MBV2, bad, data=TEST_NPZ, labels=LABELS, limit=200, per_layer=True, size=False)
    ranked = res.per_layer.ranked()
    assert ranked[0].match.ref_node == BAD_LAYER, [(x.match.ref_node, x.added_rel_l2) for x in ranked[:5]]
    assert ranked[0].match.how == "fused BN"  # float BN output ↔ the QDQ model's fused Conv
    assert ranked[0].added_rel_l2 > 3 * ranked[1].added_rel_l2
    assert len(res.per_layer.layers) == 29 and res.per_layer.unmatched_ref == []
    d = json.loads(res.to_json())["per_layer"]
    assert {"matched", "ref_tensors", "cand_tensors", "unmatched_ref", "fused_ref", "groups", "budget_bytes",
            "peak_batch_bytes", "samples", "seconds", "layers"} == set(d)
    assert d["layers"][0]["ref_node"] == BAD_LAYER and d["layers"][0]["rank"] == 1
    assert {"rank", "index", "ref", "cand", "ref_node", "cand_node", "op", "how", "shape", "inputs", "rel_l2", "snr_db",
            "cosine", "max_abs", "input_rel_l2", "added_rel_l2", "snr_drop_db"} == set(d["layers"][0])
    # the same model quantized correctly: the bad layer is no longer an outlier, and accuracy holds
    ok = compare(MBV2, good, data=TEST_NPZ, labels=LABELS, limit=200, per_layer=True, size=False)
    by = {x.match.ref_node: x for x in ok.per_layer.layers}
    assert by[BAD_LAYER].added_rel_l2 < ranked[0].added_rel_l2 / 5
    assert ok.outputs[0].task["delta"] > res.outputs[0].task["delta"]


# --------------------------------------------------------------------------------------------------
# Bounded memory: grouped capture


def chain_model(path: Path, layers: int = 120, channels: int = 8, hw: int = 16, noise: float = 0.0) -> Path:
    """A chain of ``layers`` x (Conv 1x1 -> Relu -> Add residual): 3 tensors per layer; ``noise`` perturbs
    the weights (a candidate)."""
    rng = np.random.default_rng(3)
    noise_rng = np.random.default_rng(5)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = (np.eye(channels) + 0.05 * rng.standard_normal((channels, channels))).astype(np.float32)
        w = (w + noise * noise_rng.standard_normal(w.shape)).astype(np.float32)
        inits.append(numpy_helper.from_array(w.reshape(channels, channels, 1, 1) / 2, f"w{i}"))
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}"),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"),
                  helper.make_node("Add", [x, f"r{i}"], [f"a{i}"], name=f"add{i}")]
        x = f"a{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    return _save(_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, hw, hw])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, hw, hw])], inits), path)


def test_per_layer_capture_is_grouped_within_the_budget(tmp_path):
    ref = chain_model(tmp_path / "chain.onnx", layers=40)
    cand = chain_model(tmp_path / "chain_cand.onnx", layers=40, noise=1e-3)
    x = np.random.default_rng(0).uniform(0, 1, (64, 8, 16, 16)).astype(np.float32)
    data = Dataset([lambda: {"x": x[:, None]}], 64, "t")
    tensor = 8 * 16 * 16 * 4 * 32  # one tensor of one 32-sample batch
    budget = 2 * 10 * tensor  # 10 tensors per model per batch
    small = compare(ref, cand, data=data, per_layer=True, budget_bytes=budget, size=False, tolerance=1.0)
    big = compare(ref, cand, data=data, per_layer=True, budget_bytes=1 << 34, size=False, tolerance=1.0)
    assert small.per_layer.groups == 12 and big.per_layer.groups == 1  # 120 tensors, 10 per group
    assert small.per_layer.peak_batch_bytes <= budget
    assert big.per_layer.peak_batch_bytes == 2 * 120 * tensor
    # same figures either way, and not trivially zero
    got = {x.match.ref: x.rel_l2 for x in small.per_layer.layers}
    want = {x.match.ref: x.rel_l2 for x in big.per_layer.layers}
    assert len(got) == 120 and got == pytest.approx(want, rel=1e-9)
    assert min(got.values()) > 0


# --------------------------------------------------------------------------------------------------
# HTML in headless Chromium


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing on CI: .ci/run installs Debian's chromium package")
        pytest.skip("headless Chromium not installed (apt-get install chromium) — the HTML render test needs it")
    return exe


def _chrome(exe: str, page: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="onnxshrink-chromium-")
    try:
        return subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={profile}", *args, page.resolve().as_uri()],
            capture_output=True, text=True, timeout=180,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_compare_html_renders_in_chromium_with_plots_and_tables(qdq_models, capsys):
    exe = _chromium()
    _, _, bad = qdq_models
    ARTIFACTS.mkdir(exist_ok=True)
    page = ARTIFACTS / "compare.html"
    code, _, err = run_cli(capsys, "compare", MBV2, bad, "--data", TEST_NPZ, "--labels", LABELS, "--per-layer",
                           "--limit", "200", "--tol", "0.5", "--latency-runs", "10", "--report", page, "-q")
    assert code == 0, err
    text = page.read_text()
    assert not re.search(r"(src|href)=\"?(https?:)?//", text) and "<script" not in text  # self-contained
    dom = _chrome(exe, page, "--dump-dom").stdout
    for plot in ("plot-layers", "plot-size", "plot-latency", "plot-hist-logits"):
        assert re.search(rf'<svg[^>]*id="{plot}"', dom), plot
    for table in ("outputs", "task", "layers", "size", "nodes"):
        assert re.search(rf'<table id="{table}"', dom), table
    layers = dom.split('<table id="layers"')[1]
    first_row = layers.split("<tbody>")[1].split("</tr>")[0]
    assert BAD_LAYER in first_row  # the ranking's top row is the badly quantized layer
    assert dom.count("<rect") > 30 and dom.count("<tr") > 30
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    _chrome(exe, page, f"--screenshot={shot}", "--window-size=1280,2400")
    assert shot.exists() and shot.stat().st_size > 20_000
    print(f"\nscreenshot: {shot}")


def test_optimize_html_report_renders_in_chromium(tmp_path, capsys):
    exe = _chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    page = ARTIFACTS / "optimize.html"
    out = tmp_path / "mb.small.onnx"
    code, _, err = run_cli(capsys, "optimize", MBV2, "-o", out, "--data", TEST_NPZ, "--report", page,
                           "--latency-runs", "5", "-q")
    assert code == 0, err
    dom = _chrome(exe, page, "--dump-dom").stdout
    assert 'id="verdict">passed<' in dom
    for plot in ("plot-layers", "plot-size", "plot-latency"):
        assert re.search(rf'<svg[^>]*id="{plot}"', dom), plot
    for table in ("passes", "summary", "outputs", "layers", "size"):
        assert re.search(rf'<table id="{table}"', dom), table
    assert "fold(constants=true" in dom and "fused BN" in dom
    shot = ARTIFACTS / "optimize.png"
    _chrome(exe, page, f"--screenshot={shot}", "--window-size=1280,2400")
    assert shot.exists() and shot.stat().st_size > 20_000
