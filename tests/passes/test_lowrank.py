"""lowrank: positive (splits fire), negative (declines with a reason) and numeric tests.

Tolerance: a split at the weight's full rank is exact up to float rounding, so outputs must match the
original within 1e-5 relative L2 (weights are built with an exact low rank, so rank=r is full rank for
them and still saves parameters). Below full rank the error is by design; those tests check the error
the pass promises (budget) or compare methods (asvd vs svd) on the same data.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

import onnxshrink
from conftest import MODELS, make, rel_l2, run_ort, vi
from onnxshrink.api import _as_dataset
from onnxshrink.errors import SpecError, UsageError
from onnxshrink.passes.lowrank import LowrankOptions, LowrankPass, _factors, _Layer, _whitener
from onnxshrink.pipeline import parse
from onnxshrink.registry import PassContext, get_pass

TOL = 1e-5
RNG = np.random.default_rng(0)


def arr(name, a):
    return numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)


def lowrank_matrix(m, n, r, rng=RNG):
    return (rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) / np.sqrt(r)).astype(np.float32)


def lowrank(proto, data=None, **options):
    """Run the lowrank pass on a proto (with optional data dict); return new proto and stats."""
    model = ir.from_proto(proto)
    ctx = PassContext(data=_as_dataset(data, model) if data is not None else None)
    result = LowrankPass(LowrankOptions(**options), ctx)(model)
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out)
    return out, result.stats


def ops(proto) -> collections.Counter:
    return collections.Counter(n.op_type for n in proto.graph.node)


def assert_same(orig, new, feeds, tol=TOL):
    for a, b in zip(run_ort(orig, feeds), run_ort(new, feeds)):
        assert a.shape == b.shape
        assert rel_l2(a, b) <= tol, rel_l2(a, b)


def row(stats, name):
    return next(r for r in stats["layers"] if r["layer"] == name)


# -- numeric: at the weight's full rank the split is exact -----------------------------------------------


@pytest.mark.parametrize("method", ["svd", "asvd"])
def test_matmul_weight_right_batched_exact(method):
    w = lowrank_matrix(64, 48, 8)
    m = make([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
             [vi("x", ["N", 5, 64])], [vi("y", ["N", 5, 48])], [arr("w", w)])
    x = RNG.standard_normal((6, 5, 64)).astype(np.float32)
    out, stats = lowrank(m, data={"x": x} if method == "asvd" else None, rank=8, method=method)
    assert ops(out) == {"MatMul": 2}
    assert out.graph.output[0].name == "y"
    assert "w" not in {i.name for i in out.graph.initializer}
    r = row(stats, "mm")
    assert r["rank"] == 8 and r["reason"] == "split" and r["params_saved"] == 64 * 48 - 8 * 112
    assert r["method"] == method
    assert_same(m, out, {"x": x})


def test_matmul_weight_left_batched_exact():
    w = lowrank_matrix(40, 64, 8)
    m = make([helper.make_node("MatMul", ["w", "x"], ["y"], name="mm")],
             [vi("x", ["N", 3, 64, 7])], [vi("y", ["N", 3, 40, 7])], [arr("w", w)])
    x = RNG.standard_normal((2, 3, 64, 7)).astype(np.float32)
    out, stats = lowrank(m, data={"x": x}, rank=8)
    assert ops(out) == {"MatMul": 2}
    assert row(stats, "mm")["method"] == "asvd"
    assert_same(m, out, {"x": x})


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("weight_side", ["B", "A"])
def test_gemm_exact_transposes_alpha_beta(trans_a, trans_b, weight_side):
    M, K, N = 5, 64, 48
    if weight_side == "B":
        w = lowrank_matrix(K, N, 8)
        w = w.T if trans_b else w
        a_shape = [K, M] if trans_a else [M, K]
        inputs, inits = [vi("a", a_shape)], [arr("b", w)]
        feeds = {"a": RNG.standard_normal(a_shape).astype(np.float32)}
    else:
        w = lowrank_matrix(N, K, 8)  # op(A) = [N, K], output [N, M]
        w = w.T if trans_a else w
        b_shape = [M, K] if trans_b else [K, M]
        inputs, inits = [vi("b", b_shape)], [arr("a", w)]
        feeds = {"b": RNG.standard_normal(b_shape).astype(np.float32)}
        M, N = N, M
    inits.append(arr("c", RNG.standard_normal(N)))
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], name="gemm", alpha=0.5, beta=2.0,
                            transA=trans_a, transB=trans_b)
    m = make([node], inputs, [vi("y", [M, N])], inits)
    out, stats = lowrank(m, data=feeds, rank=8)
    assert ops(out) == {"Gemm": 2}
    assert row(stats, "gemm")["reason"] == "split"
    assert len(out.graph.node[1].input) == 3  # the bias stays on the second Gemm
    assert_same(m, out, feeds)


@pytest.mark.parametrize("method", ["svd", "asvd"])
def test_conv_groups_dilation_stride_pads_exact(method):
    g, cin, cout, k = 2, 16, 32, 3
    cg, mg = cin // g, cout // g
    w = np.concatenate([lowrank_matrix(mg, cg * k * k, 8).reshape(mg, cg, k, k) for _ in range(g)], axis=0)
    node = helper.make_node("Conv", ["x", "w", "bias"], ["y"], name="conv", group=g, dilations=[2, 1],
                            strides=[2, 1], pads=[1, 2, 2, 0])
    m = make([node], [vi("x", ["N", cin, 11, 9])], [vi("y", ["N", cout, None, None])],
             [arr("w", w), arr("bias", RNG.standard_normal(cout))])
    x = RNG.standard_normal((3, cin, 11, 9)).astype(np.float32)
    out, stats = lowrank(m, data={"x": x} if method == "asvd" else None, rank=8, method=method)
    assert ops(out) == {"Conv": 2}
    first, second = out.graph.node
    assert helper.get_attribute_value(next(a for a in first.attribute if a.name == "group")) == g
    assert numpy_helper.to_array(next(i for i in out.graph.initializer if i.name == first.input[1])).shape == (g * 8, cg, k, k)
    assert numpy_helper.to_array(next(i for i in out.graph.initializer if i.name == second.input[1])).shape == (cout, 8, 1, 1)
    assert row(stats, "conv")["method"] == method
    assert_same(m, out, {"x": x})


def test_conv_tucker2_exact():
    cin, cout, k, r = 32, 40, 3, 8
    u_in, _ = np.linalg.qr(RNG.standard_normal((cin, r)))
    u_out, _ = np.linalg.qr(RNG.standard_normal((cout, r)))
    core = RNG.standard_normal((r, r, k, k))
    w = np.einsum("sr...,ms,cr->mc...", core, u_out, u_in).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "bias"], ["y"], name="conv", strides=[2, 2], pads=[1, 1, 1, 1])
    m = make([node], [vi("x", [1, cin, 12, 12])], [vi("y", [1, cout, 6, 6])],
             [arr("w", w), arr("bias", RNG.standard_normal(cout))])
    out, stats = lowrank(m, rank=8, tucker=True)
    assert ops(out) == {"Conv": 3}
    r_ = row(stats, "conv")
    assert r_["op"] == "Conv/tucker" and r_["rank"] == [8, 8]
    assert stats["counters"]["split_conv_tucker"] == 1
    assert_same(m, out, {"x": RNG.standard_normal((1, cin, 12, 12)).astype(np.float32)})


def test_factors_full_rank_reproduce_weight_with_and_without_whitening():
    w = RNG.standard_normal((24, 16))
    x = RNG.standard_normal((200, 24)) * np.linspace(0.1, 10, 24)
    for whiten in (None, _whitener(x.T @ x, 0.01)):
        layer = _Layer(node=None, kind="mm_right", w_index=1, act_index=0, wshape=(24, 16), groups=1,
                       d_in=24, d_out=16, rows=1)
        layer.whiten = [whiten] if whiten else None
        wt = whiten[0] @ w if whiten else w
        layer.svd = [np.linalg.svd(wt, full_matrices=False)]
        (a, b), = _factors(layer, 16)
        assert np.abs(a @ b - w).max() < 1e-10


def test_constant_node_weight_is_handled():
    w = lowrank_matrix(64, 64, 8)
    m = make([helper.make_node("Constant", [], ["w"], value=arr("wc", w)),
              helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
             [vi("x", ["N", 64])], [vi("y", ["N", 64])])
    out, stats = lowrank(m, rank=8)
    assert ops(out) == {"MatMul": 2}
    assert_same(m, out, {"x": RNG.standard_normal((4, 64)).astype(np.float32)})


# -- positive: rank choice -------------------------------------------------------------------------------


def two_layer(d=64, hidden=64, out=32, rank=None):
    w1 = lowrank_matrix(d, hidden, rank) if rank else RNG.standard_normal((d, hidden)).astype(np.float32) / 8
    w2 = RNG.standard_normal((hidden, out)).astype(np.float32) / 8
    return make([helper.make_node("MatMul", ["x", "w1"], ["h"], name="l1"),
                 helper.make_node("Relu", ["h"], ["r"]),
                 helper.make_node("MatMul", ["r", "w2"], ["y"], name="l2")],
                [vi("x", ["N", d])], [vi("y", ["N", out])], [arr("w1", w1), arr("w2", w2)])


def test_energy_finds_exact_rank_and_ratio_hits_target():
    m = two_layer(rank=16)
    out, stats = lowrank(m, energy=1.0)
    assert row(stats, "l1")["rank"] == 16 and row(stats, "l1")["reason"] == "split"
    assert row(stats, "l2")["reason"].startswith("rank 32 too high")  # full-rank 64x32 keeps no saving
    out, stats = lowrank(m, ratio=0.5)
    r1 = row(stats, "l1")
    assert r1["rank"] == 16 and r1["params_saved"] == 64 * 64 - 16 * 128  # largest rank with ≤ 50% params
    assert stats["counters"]["split"] == 2  # l2: 64x32 at rank 8 keeps 37.5%
    assert row(stats, "l2")["rank"] == 8


def test_round_to_changes_ranks():
    _, stats = lowrank(two_layer(), ratio=0.3, round_to=4)
    assert row(stats, "l1")["rank"] == 20  # 20·128 ≤ 0.7·4096 < 24·128
    _, stats = lowrank(two_layer(), ratio=0.3, round_to=8)
    assert row(stats, "l1")["rank"] == 16


def test_asvd_beats_svd_on_anisotropic_inputs():
    d, n = 64, 48
    w = RNG.standard_normal((d, n)).astype(np.float32)
    m = make([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", ["N", d])], [vi("y", ["N", n])],
             [arr("w", w)])
    basis, _ = np.linalg.qr(RNG.standard_normal((d, d)))
    scales = np.where(np.arange(d) < 8, 10.0, 0.1)  # the data lives in an 8-dim subspace (plus noise)
    calib = (RNG.standard_normal((256, d)) * scales) @ basis.T
    test = (RNG.standard_normal((256, d)) * scales) @ basis.T
    calib, test = calib.astype(np.float32), test.astype(np.float32)
    errs = {}
    for method in ("svd", "asvd"):
        out, stats = lowrank(m, data={"x": calib}, rank=8, method=method)
        assert row(stats, "mm")["method"] == method
        errs[method] = rel_l2(run_ort(m, {"x": test})[0], run_ort(out, {"x": test})[0])
    assert errs["asvd"] < 0.05 < 0.5 < errs["svd"], errs


def test_budget_is_met_on_data_and_spread_by_sensitivity():
    m = two_layer(d=64, hidden=128, out=64)
    x = RNG.standard_normal((64, 64)).astype(np.float32)
    out, stats = lowrank(m, data={"x": x}, budget=0.2, round_to=4)
    assert stats["counters"]["split"] >= 1
    assert stats["counters"]["sensitivity_runs"] >= 2
    err = rel_l2(run_ort(m, {"x": x})[0], run_ort(out, {"x": x})[0])
    assert err <= 0.2 + 1e-6
    assert abs(err - stats["counters"]["budget_error_ppm"] / 1e6) < 1e-3  # the pass measured what ORT gives
    for r in stats["layers"]:
        if r["reason"] == "split":
            assert r["output_error"] is not None and r["output_error"] <= 0.2
    # a tighter budget never keeps more parameters out
    _, tight = lowrank(m, data={"x": x}, budget=0.02, round_to=4)
    assert tight["counters"].get("params_saved", 0) < stats["counters"]["params_saved"]


# -- negative: declines with reasons ---------------------------------------------------------------------


def test_declines_small_layer_and_too_high_rank():
    m = make([helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", transB=1)], [vi("x", ["N", 64])],
             [vi("y", ["N", 10])], [arr("w", RNG.standard_normal((10, 64))), arr("c", np.zeros(10))])
    out, stats = lowrank(m)
    assert ops(out) == {"Gemm": 1}
    assert stats["declines"] == {"no rank (multiple of 8) saves 10%": 1}
    out, stats = lowrank(two_layer(), rank=48)
    assert ops(out) == {"MatMul": 2, "Relu": 1}
    assert stats["declines"]["rank 48 too high to save 10%"] == 2


def test_declines_depthwise_shared_and_non_constant():
    dw = make([helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=32, pads=[1, 1, 1, 1])],
              [vi("x", [1, 32, 8, 8])], [vi("y", [1, 32, 8, 8])], [arr("w", RNG.standard_normal((32, 1, 3, 3)))])
    out, stats = lowrank(dw)
    assert ops(out) == {"Conv": 1} and stats["declines"] == {"depthwise conv": 1}

    w = lowrank_matrix(64, 64, 8)
    shared = make([helper.make_node("MatMul", ["x", "w"], ["h"], name="a"),
                   helper.make_node("MatMul", ["h", "w"], ["y"], name="b")],
                  [vi("x", ["N", 64])], [vi("y", ["N", 64])], [arr("w", w)])
    out, stats = lowrank(shared, rank=8)
    assert ops(out) == {"MatMul": 2} and stats["declines"] == {"weight shared with another node": 2}

    act = make([helper.make_node("MatMul", ["x", "z"], ["y"], name="mm")],
               [vi("x", ["N", 64]), vi("z", [64, 64])], [vi("y", ["N", 64])])
    out, stats = lowrank(act, rank=8)
    assert stats["declines"] == {"no constant weight": 1}
    assert row(stats, "mm")["reason"] == "no constant weight"

    # an initializer that is also a graph input can be overridden at run time: not a constant
    conv = make([helper.make_node("Conv", ["x", "w"], ["y"], name="c")],
                [vi("x", [1, 16, 8, 8]), vi("w", [32, 16, 3, 3])], [vi("y", [1, 32, 6, 6])],
                [arr("w", RNG.standard_normal((32, 16, 3, 3)))])
    out, stats = lowrank(conv, rank=8)
    assert ops(out) == {"Conv": 1} and stats["declines"] == {"weight is not constant": 1}


def test_option_errors_and_data_requirements():
    with pytest.raises(SpecError, match="at most one"):
        parse("lowrank(ratio=0.3,budget=0.1)")
    with pytest.raises(SpecError):
        parse("lowrank(method=fancy)")
    with pytest.raises(UsageError, match="needs --data"):
        lowrank(two_layer(), method="asvd")
    with pytest.raises(UsageError, match="needs --data"):
        lowrank(two_layer(), budget=0.1)
    assert get_pass("lowrank").must_precede == ("quant",)
    assert LowrankPass.validation_tolerance(LowrankOptions(budget=0.04)) == pytest.approx(0.06)
    assert LowrankPass.validation_tolerance(LowrankOptions()) == 0.25


def test_min_speedup_measures_and_declines():
    m = two_layer(d=64, hidden=64, out=64)
    out, stats = lowrank(m, ratio=0.5, min_speedup=1000.0)
    assert ops(out) == {"MatMul": 2, "Relu": 1}
    for name in ("l1", "l2"):
        r = row(stats, name)
        assert r["reason"].startswith("measured speedup") and len(r["latency_ms"]) == 2
        assert all(t > 0 for t in r["latency_ms"])


# -- API and shipped models ------------------------------------------------------------------------------


def test_optimize_api_on_digits_cnn_reports_layers():
    data = str(MODELS / "digits_calib.npz")
    result = onnxshrink.optimize(str(MODELS / "digits_cnn.onnx"), passes="fold,lowrank(energy=0.95)", data=data)
    rep = result.report
    assert rep.verdict == "passed"
    assert rep.after.macs < 0.85 * rep.before.macs and rep.after.params < rep.before.params
    lr = rep.passes[1]
    assert lr.counters["split"] >= 2 and lr.layers
    assert {r["reason"] for r in lr.layers} >= {"split"}
    d = json.loads(rep.to_json())
    assert d["passes"][1]["layers"][0]["layer"]
    md = rep.to_markdown()
    assert "### lowrank: per layer" in md and "`/fc1/Gemm`" in md
    x = np.load(data)["input"][:64]
    a = run_ort(str(MODELS / "digits_cnn.onnx"), {"input": x})[0]
    proto = ir.to_proto(result.model)
    b = run_ort(proto, {"input": x})[0]
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.95


def test_bert_tiny_budget_keeps_outputs_close():
    result = onnxshrink.optimize(str(MODELS / "bert_tiny.onnx"), passes="fold,lowrank(budget=0.1,samples=64)",
                                 data=str(MODELS / "digits_seq_calib.npz"))
    rep = result.report
    assert rep.verdict == "passed"
    assert rep.after.params < 0.75 * rep.before.params
    assert rep.validation.outputs[0].cosine >= 0.98


@pytest.mark.parametrize("auto_pad", ["NOTSET", "SAME_UPPER", "SAME_LOWER"])
def test_im2col_rows_reproduce_conv(auto_pad):
    """The patch rows the asvd covariance is built from, times the group matrices, are the Conv itself."""
    from onnxshrink.passes.lowrank import _conv_pads, _patch_rows

    g, cin, cout = 2, 6, 8
    w = RNG.standard_normal((cout, cin // g, 3, 2)).astype(np.float32)
    dil = [1, 2] if auto_pad == "NOTSET" else [1, 1]  # onnxruntime refuses dilation with SAME padding
    attrs = dict(group=g, strides=[2, 1], dilations=dil)
    if auto_pad == "NOTSET":
        attrs["pads"] = [1, 0, 2, 1]
    else:
        attrs["auto_pad"] = auto_pad
    m = make([helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], [vi("x", [2, cin, 9, 7])],
             [vi("y", [2, cout, None, None])], [arr("w", w)])
    x = RNG.standard_normal((2, cin, 9, 7)).astype(np.float32)
    y = run_ort(m, {"x": x})[0]
    node = ir.from_proto(m).graph.node(0)
    pads = _conv_pads(node, [9, 7], [3, 2], [2, 1], dil)
    rows = _patch_rows(x.astype(np.float64), (3, 2), (2, 1), tuple(pads), tuple(dil), g)
    mg = cout // g
    for gi, r in enumerate(rows):
        got = r @ w[gi * mg:(gi + 1) * mg].reshape(mg, -1).T.astype(np.float64)  # [N·Ho·Wo, mg]
        ref = np.moveaxis(y[:, gi * mg:(gi + 1) * mg], 1, -1).reshape(-1, mg)
        assert np.abs(got - ref).max() < 1e-4


# -- refit (reduced-rank regression on the compressed model's inputs) -----------------------------------


def conv_chain(rng):
    """Conv 3×3 (no bias) → Relu → Conv 1×1 (no bias) → Relu → pool → Gemm with bias."""
    w1 = rng.standard_normal((32, 8, 3, 3)).astype(np.float32) / 8
    w2 = rng.standard_normal((32, 32, 1, 1)).astype(np.float32) / 6
    w3 = rng.standard_normal((24, 32)).astype(np.float32) / 6
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["h2"], name="c2"),
             helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1)]
    return make(nodes, [vi("x", ["N", 8, 6, 6])], [vi("y", ["N", 24])],
                [arr("w1", w1), arr("w2", w2), arr("w3", w3), arr("b3", rng.standard_normal(24))])


def image_data(rng, n):
    """Inputs whose 8 channels are correlated (a few strong directions), so that rank 8 truncates."""
    basis = np.linalg.qr(rng.standard_normal((8, 8)))[0]
    z = rng.standard_normal((n, 6, 6, 8)) * np.linspace(3, 0.2, 8)
    return np.ascontiguousarray(np.moveaxis(z @ basis.T, -1, 1)).astype(np.float32)


def test_refit_lowers_heldout_error_and_fits_biases():
    rng = np.random.default_rng(1)
    m = conv_chain(rng)
    calib, test = image_data(rng, 256), image_data(rng, 256)
    ref = run_ort(m, {"x": test})[0]
    errs = {}
    for refit in ("rrr", "none"):
        out, stats = lowrank(m, data={"x": calib}, rank=8, refit=refit)
        assert stats["counters"]["split"] == 3
        errs[refit] = rel_l2(ref, run_ort(out, {"x": test})[0])
        if refit == "rrr":
            assert stats["counters"]["layers_refit"] == 3
            for name in ("c2", "fc"):  # fitted on inputs the split before them changed: better on held-out rows
                plain, fitted = row(stats, name)["refit_error"]
                assert fitted < plain
            # the 1×1 Convs after each split get the refitted bias (the original Convs had none)
            convs = [n for n in out.graph.node if n.op_type == "Conv"]
            assert [len(n.input) for n in convs] == [2, 3, 2, 3]
            assert len(out.graph.node[-1].input) == 3 and "b3" not in {i.name for i in out.graph.initializer}
        else:
            assert all(r["refit_error"] is None for r in stats["layers"])
    assert errs["rrr"] < 0.6 * errs["none"], errs


def test_refit_keeps_svd_factors_where_the_fit_would_overfit(monkeypatch):
    """Fewer calibration rows (48) than inputs (96) of the second layer: the cross-fitted check keeps the SVD
    factors; without it (folds merged, in-sample choice) the refit is worse on held-out data."""
    import onnxshrink.passes.lowrank as lr

    rng = np.random.default_rng(2)
    w1 = rng.standard_normal((32, 96)).astype(np.float32) / 6
    w2 = rng.standard_normal((64, 96)).astype(np.float32) / 10
    m = make([helper.make_node("MatMul", ["x", "w1"], ["h"], name="l1"), helper.make_node("Relu", ["h"], ["r"]),
              helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="l2", transB=1)],
             [vi("x", ["N", 32])], [vi("y", ["N", 64])],
             [arr("w1", w1), arr("w2", w2), arr("b2", rng.standard_normal(64))])
    calib = rng.standard_normal((48, 32)).astype(np.float32)
    test = rng.standard_normal((1000, 32)).astype(np.float32)
    ref = run_ort(m, {"x": test})[0]

    def heldout(**options):
        out, stats = lowrank(m, data={"x": calib}, rank=8, **options)
        return rel_l2(ref, run_ort(out, {"x": test})[0]), stats

    plain, _ = heldout(refit="none")
    guarded, stats = heldout()
    assert stats["counters"]["refit_kept_plain"] >= 1
    assert row(stats, "l2")["refit_error"][0] == row(stats, "l2")["refit_error"][1]
    assert guarded <= 1.01 * plain
    fit_layer = lr.LowrankPass._fit_layer
    monkeypatch.setattr(lr.LowrankPass, "_fit_layer", lambda self, layer, cfg, folds: fit_layer(
        self, layer, cfg, [[a + b for a, b in zip(*folds)]] if len(folds) == 2 else folds))
    unguarded, _ = heldout()
    assert unguarded > 1.1 * plain


def test_budget_with_refit_is_met_cross_fitted_and_saves_more():
    rng = np.random.default_rng(3)
    m = conv_chain(rng)
    calib, test = image_data(rng, 128), image_data(rng, 256)
    saved = {}
    for refit in ("rrr", "none"):
        out, stats = lowrank(m, data={"x": calib}, budget=0.15, refit=refit, round_to=4)
        c = stats["counters"]
        saved[refit] = c.get("macs_saved", 0)
        err = rel_l2(run_ort(m, {"x": calib})[0], run_ort(out, {"x": calib})[0])
        assert err <= 0.15 + 1e-6 and abs(err - c["budget_error_ppm"] / 1e6) < 1e-3
        if refit == "rrr":
            assert 0 < c["budget_heldout_error_ppm"] <= 150000  # refitted on half the batches, measured on the rest
            assert rel_l2(run_ort(m, {"x": test})[0], run_ort(out, {"x": test})[0]) <= 0.15
    assert saved["rrr"] > saved["none"], saved


def test_refit_probe_leaves_declined_layers_as_they_were():
    """The probe session adds a bias input to Convs without one while it measures; a budget that declines
    every split must give back the model exactly."""
    rng = np.random.default_rng(5)
    m = conv_chain(rng)
    out, stats = lowrank(m, data={"x": image_data(rng, 64)}, budget=1e-4)
    assert "split" not in stats["counters"] and stats["counters"]["sensitivity_runs"] > 0
    assert list(out.graph.node) == list(m.graph.node)  # shape inference adds value_info, nothing else changes
    by_name = lambda g: sorted(g.initializer, key=lambda t: t.name)  # noqa: E731 (their order is not kept)
    assert by_name(out.graph) == by_name(m.graph) and out.graph.input == m.graph.input


def test_refit_is_deterministic():
    rng = np.random.default_rng(4)
    m = conv_chain(rng)
    calib = image_data(rng, 96)
    a, _ = lowrank(m, data={"x": calib}, budget=0.2)
    b, _ = lowrank(m, data={"x": calib}, budget=0.2)
    assert a.SerializeToString() == b.SerializeToString()


def test_refit_options():
    with pytest.raises(UsageError, match="needs --data"):
        lowrank(two_layer(), refit="rrr", method="svd")
    with pytest.raises(SpecError):
        parse("lowrank(refit=always)")
    with pytest.raises(SpecError):
        parse("lowrank(ridge=-1)")
    assert LowrankOptions().refit == "auto"
    # refit=auto follows the method: data with method=svd stays data-free
    x = RNG.standard_normal((64, 64)).astype(np.float32)
    _, stats = lowrank(two_layer(), data={"x": x}, rank=8, method="svd")
    assert "layers_refit" not in stats["counters"] and row(stats, "l2")["refit_error"] is None
    _, stats = lowrank(two_layer(), data={"x": x}, rank=8, method="svd", refit="rrr")
    assert row(stats, "l2")["refit_error"] is not None


def test_mobilenetv2_criterion_30pct_macs_within_1pt():
    """Issue 6: on the shipped MobileNetV2, lowrank removes ≥ 30% of Conv/Gemm MACs at ≤ 1 pt top-1 loss,
    fitted on the calib split and measured on the held-out test split (400 samples). ``round_to=4``: with
    the default 8 the thin 16/24-channel 1×1 convs only have rank 8 to give, and budget=0.3 lands exactly
    on −1.00 pt (32.0%); at 4 it is 33.9% at −0.50 pt, a margin one flipped sample cannot break."""
    model = str(MODELS / "digits_mobilenetv2.onnx")
    calib = str(MODELS / "digits_calib.npz")
    x = np.load(MODELS / "digits_test.npz")["input"]
    y = np.load(MODELS / "digits_test_labels.npy")
    ref = onnxshrink.optimize(model, passes="fold", validate=False)
    res = onnxshrink.optimize(model, passes="fold,lowrank(budget=0.3,objective=macs,round_to=4)", data=calib)
    assert res.report.verdict == "passed"
    removed = 1 - res.report.after.macs / ref.report.after.macs
    top1 = [float((run_ort(ir.to_proto(r.model), {"input": x})[0].argmax(1) == y).mean()) for r in (ref, res)]
    assert removed >= 0.30, removed
    assert top1[1] >= top1[0] - 0.0075 - 1e-9, top1  # measured −0.50 pt
