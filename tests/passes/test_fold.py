"""fold: positive (the rewrite fires), negative (near misses decline with a reason) and numeric tests.

Tolerance: fold is exact up to float rounding of the BatchNorm fusion, so outputs must match the
original within 1e-5 relative L2 (and bit-exactly where no arithmetic is rewritten).
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxshrink
from conftest import MODELS, make, rel_l2, run_ort, vi
from onnxshrink.passes.fold import FoldOptions, FoldPass
from onnxshrink.pipeline import parse

TOL = 1e-5


def fold(proto: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, dict]:
    """Run the fold pass on a proto, return the new proto and the pass stats."""
    model = ir.from_proto(proto)
    result = FoldPass(FoldOptions(**options))(model)
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out)
    return out, result.stats


def file_size(proto: onnx.ModelProto) -> int:
    """Serialized size without value_info and node names (what optimize() strips before saving)."""
    q = onnx.ModelProto()
    q.CopyFrom(proto)
    del q.graph.value_info[:]
    for n in q.graph.node:
        n.ClearField("name")
    return q.ByteSize()


def ops(proto: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in proto.graph.node)


def arr(name, a):
    return numpy_helper.from_array(np.asarray(a), name)


RNG = np.random.default_rng(0)


def bn_params(c, prefix="bn"):
    return [
        arr(f"{prefix}_g", RNG.uniform(0.5, 2, c).astype(np.float32)),
        arr(f"{prefix}_b", RNG.standard_normal(c).astype(np.float32)),
        arr(f"{prefix}_m", RNG.standard_normal(c).astype(np.float32)),
        arr(f"{prefix}_v", RNG.uniform(0.5, 2, c).astype(np.float32)),
    ]


def bn_node(x, y, prefix="bn"):
    return helper.make_node("BatchNormalization", [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"], [y])


def assert_same(orig, new, feeds, tol=TOL):
    a = run_ort(orig, feeds)
    b = run_ort(new, feeds)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert rel_l2(x, y) <= tol, rel_l2(x, y)


# -- BatchNorm fusion ----------------------------------------------------------------------------------


def test_bn_into_conv_with_and_without_bias():
    x = RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)
    for with_bias in (False, True):
        inits = [arr("w", RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)), *bn_params(4)]
        conv_in = ["x", "w"]
        if with_bias:
            inits.append(arr("cb", RNG.standard_normal(4).astype(np.float32)))
            conv_in.append("cb")
        m = make([helper.make_node("Conv", conv_in, ["c"], pads=[1, 1, 1, 1]), bn_node("c", "y")],
                 [vi("x", ["N", 3, 6, 6])], [vi("y", ["N", 4, 6, 6])], inits)
        out, stats = fold(m)
        assert ops(out) == {"Conv": 1}
        assert len(out.graph.node[0].input) == 3
        assert stats["counters"]["batchnorm_fused"] == 1
        assert out.graph.output[0].name == "y"
        assert_same(m, out, {"x": x})


def test_bn_into_grouped_conv_transpose():
    g, cin, cout_g = 2, 4, 3
    inits = [arr("w", RNG.standard_normal((cin, cout_g, 3, 3)).astype(np.float32)), *bn_params(g * cout_g)]
    m = make([helper.make_node("ConvTranspose", ["x", "w"], ["c"], group=g, strides=[2, 2]), bn_node("c", "y")],
             [vi("x", [1, cin, 5, 5])], [vi("y", [1, g * cout_g, 11, 11])], inits)
    out, stats = fold(m)
    assert ops(out) == {"ConvTranspose": 1}
    assert_same(m, out, {"x": RNG.standard_normal((1, cin, 5, 5)).astype(np.float32)})


@pytest.mark.parametrize("trans_b", [0, 1])
def test_bn_into_gemm_with_beta_and_bias(trans_b):
    k, n = 5, 4
    w = RNG.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [arr("w", w), arr("c", RNG.standard_normal(n).astype(np.float32)), *bn_params(n)]
    m = make([helper.make_node("Gemm", ["x", "w", "c"], ["g"], transB=trans_b, alpha=0.7, beta=0.5), bn_node("g", "y")],
             [vi("x", [3, k])], [vi("y", [3, n])], inits)
    out, stats = fold(m)
    assert ops(out) == {"Gemm": 1}
    beta = [a.f for a in out.graph.node[0].attribute if a.name == "beta"]
    assert beta == [1.0]
    assert_same(m, out, {"x": RNG.standard_normal((3, k)).astype(np.float32)})


def test_bn_declines_when_conv_output_is_shared():
    inits = [arr("w", RNG.standard_normal((4, 3, 1, 1)).astype(np.float32)), *bn_params(4)]
    m = make([helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "b"), helper.make_node("Add", ["b", "c"], ["y"])],
             [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 4, 4])], inits)
    out, stats = fold(m)
    assert ops(out)["BatchNormalization"] == 1
    assert stats["declines"] == {"batchnorm: Conv output has other consumers": 1}
    assert_same(m, out, {"x": RNG.standard_normal((1, 3, 4, 4)).astype(np.float32)})


def test_bn_declines_when_parameters_are_inputs():
    inits = [arr("w", RNG.standard_normal((4, 3, 1, 1)).astype(np.float32)), *bn_params(4)[1:]]
    m = make([helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")],
             [vi("x", [1, 3, 4, 4]), vi("bn_g", [4])], [vi("y", [1, 4, 4, 4])], inits)
    out, stats = fold(m)
    assert ops(out)["BatchNormalization"] == 1
    assert stats["declines"]["batchnorm: parameters are not constant"] == 1


def test_bn_fusion_does_not_touch_a_weight_shared_with_another_conv():
    w = RNG.standard_normal((4, 3, 1, 1)).astype(np.float32)
    inits = [arr("w", w), *bn_params(4)]
    m = make([helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y"), helper.make_node("Conv", ["x", "w"], ["z"])],
             [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 4, 4]), vi("z", [1, 4, 4, 4])], inits)
    out, _ = fold(m)
    assert ops(out) == {"Conv": 2}
    second = [n for n in out.graph.node if n.output[0] == "z"][0]
    shared = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}[second.input[1]]
    np.testing.assert_array_equal(shared, w)
    assert_same(m, out, {"x": RNG.standard_normal((1, 3, 4, 4)).astype(np.float32)})


# -- constants, folding, no-ops -----------------------------------------------------------------------


def test_constant_nodes_become_initializers_and_fold():
    w = RNG.standard_normal((3, 3)).astype(np.float32)
    m = make(
        [
            helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
            helper.make_node("Constant", [], ["two"], value_float=2.0),
            helper.make_node("Mul", ["w", "two"], ["w2"]),
            helper.make_node("MatMul", ["x", "w2"], ["y"]),
        ],
        [vi("x", ["N", 3])], [vi("y", ["N", 3])],
    )
    out, stats = fold(m)
    assert ops(out) == {"MatMul": 1}
    assert len(out.graph.initializer) == 1
    np.testing.assert_allclose(numpy_helper.to_array(out.graph.initializer[0]), w * 2, rtol=0)
    assert stats["counters"]["constants_lifted"] == 2
    assert_same(m, out, {"x": RNG.standard_normal((5, 3)).astype(np.float32)}, tol=0)


def test_noops_are_removed_and_output_name_kept():
    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Dropout", ["b"], ["c"]),
        helper.make_node("Cast", ["c"], ["d"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["d", "shape"], ["e"]),
        helper.make_node("Transpose", ["e"], ["f"], perm=[0, 1, 2]),
        helper.make_node("Slice", ["f", "st", "en"], ["g"]),
        helper.make_node("Pad", ["g", "pads"], ["h"]),
        helper.make_node("Add", ["h", "zero"], ["i"]),
        helper.make_node("Mul", ["one", "i"], ["j"]),
        helper.make_node("Div", ["j", "one"], ["y"]),
    ]
    inits = [arr("shape", np.array([2, 3, 4], np.int64)), arr("st", np.array([0], np.int64)),
             arr("en", np.array([100], np.int64)), arr("pads", np.zeros(6, np.int64)),
             arr("zero", np.zeros((1,), np.float32)), arr("one", np.ones((4,), np.float32))]
    m = make(nodes, [vi("x", [2, 3, 4])], [vi("y", [2, 3, 4])], inits)
    out, stats = fold(m)
    assert ops(out) == {"Relu": 1}
    assert out.graph.output[0].name == "y"
    assert out.graph.node[0].output[0] == "y"
    assert_same(m, out, {"x": RNG.standard_normal((2, 3, 4)).astype(np.float32)}, tol=0)


def test_broadcasting_add_of_zero_is_not_a_noop():
    m = make([helper.make_node("Add", ["x", "zero"], ["y"])], [vi("x", [3])], [vi("y", [2, 3])],
             [arr("zero", np.zeros((2, 3), np.float32))])
    out, _ = fold(m)
    assert ops(out) == {"Add": 1}


def test_identity_from_input_to_output_is_kept():
    m = make([helper.make_node("Identity", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])])
    out, stats = fold(m)
    assert ops(out) == {"Identity": 1}
    assert any("graph output" in k for k in stats["declines"])


def test_shape_subgraph_folds_on_static_dims_and_stays_dynamic_on_batch():
    # (with allowzero=1 the same graph must keep reading the batch at run time: see the next test)
    # Reshape(x, [Shape(x)[0], -1]) : the batch dim is dynamic and must stay computed.
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
        helper.make_node("Gather", ["s", "i1"], ["c"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax"], ["nu"]),
        helper.make_node("Unsqueeze", ["c", "ax"], ["cu"]),
        helper.make_node("Concat", ["nu", "cu", "m1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    inits = [arr("i0", np.array(0, np.int64)), arr("i1", np.array(1, np.int64)), arr("ax", np.array([0], np.int64)),
             arr("m1", np.array([-1], np.int64))]
    m = make(nodes, [vi("x", ["N", 3, 4, 5])], [vi("y", ["N", 3, 20])], inits)
    out, stats = fold(m)
    # the static dim became 3; the dynamic batch is copied by Reshape's 0 (allowzero=0), not computed
    assert ops(out) == {"Reshape": 1}
    shape = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}[out.graph.node[0].input[1]]
    assert shape.tolist() == [0, 3, -1]
    assert stats["counters"]["reshape_shapes_materialized"] == 1
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    for batch in (1, 5):
        assert_same(m, out, {"x": RNG.standard_normal((batch, 3, 4, 5)).astype(np.float32)}, tol=0)


def test_dynamic_batch_stays_computed_when_reshape_allows_zero():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax"], ["nu"]),
        helper.make_node("Concat", ["nu", "m1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1),
    ]
    inits = [arr("i0", np.array(0, np.int64)), arr("ax", np.array([0], np.int64)), arr("m1", np.array([-1], np.int64))]
    m = make(nodes, [vi("x", ["N", 3, 4])], [vi("y", ["N", 12])], inits)
    out, _ = fold(m)
    assert ops(out)["Shape"] == 1
    for batch in (1, 4):
        assert_same(m, out, {"x": RNG.standard_normal((batch, 3, 4)).astype(np.float32)}, tol=0)


def test_old_ir_initializers_listed_as_inputs_become_constants():
    inits = [arr("w", RNG.standard_normal((4, 3, 1, 1)).astype(np.float32)), *bn_params(4)]
    m = make([helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")],
             [vi("x", [1, 3, 4, 4])] + [vi(i.name, list(i.dims)) for i in inits], [vi("y", [1, 4, 4, 4])], inits, opset=9)
    m.ir_version = 3
    out, stats = fold(m)
    assert ops(out) == {"Conv": 1}
    assert out.ir_version == 4
    assert [i.name for i in out.graph.input] == ["x"]
    assert stats["counters"]["old_ir_initializer_inputs_dropped"] == 5
    assert_same(m, out, {"x": RNG.standard_normal((1, 3, 4, 4)).astype(np.float32)})


def test_max_growth_lets_the_user_trade_bytes_for_nodes():
    m = make([helper.make_node("ConstantOfShape", ["shape"], ["w"], value=numpy_helper.from_array(np.array([0.5], np.float32))),
              helper.make_node("MatMul", ["x", "w"], ["y"])],
             [vi("x", [2, 64])], [vi("y", [2, 64])], [arr("shape", np.array([64, 64], np.int64))])
    strict, _ = fold(m)
    assert ops(strict)["ConstantOfShape"] == 1
    grown, _ = fold(m, max_growth=1 << 20)
    assert ops(grown) == {"MatMul": 1}
    assert_same(m, grown, {"x": RNG.standard_normal((2, 64)).astype(np.float32)}, tol=0)


def test_folding_never_grows_the_model():
    # Expand of a 1-element constant to 1M elements would add 4 MB: must stay a node.
    m = make([helper.make_node("Expand", ["one", "shape"], ["big"]), helper.make_node("Add", ["x", "big"], ["y"])],
             [vi("x", [1000, 1000])], [vi("y", [1000, 1000])],
             [arr("one", np.ones(1, np.float32)), arr("shape", np.array([1000, 1000], np.int64))])
    out, stats = fold(m)
    assert ops(out)["Expand"] == 1
    assert file_size(out) <= file_size(m)
    assert stats["declines"].get("folding would grow the model", 0) == 1


def test_quantization_ops_are_never_folded():
    m = make([helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["y"])],
             [vi("x", [2, 4])], [vi("y", [2, 4])],
             [arr("q", RNG.integers(-128, 127, (4, 4)).astype(np.int8)), arr("s", np.float32(0.1)), arr("z", np.int8(0))])
    out, stats = fold(m)
    assert ops(out) == {"DequantizeLinear": 1, "MatMul": 1}
    assert stats["declines"]["quantization op kept"] >= 1


def test_custom_op_is_opaque_and_folding_continues_downstream():
    nodes = [
        helper.make_node("MyOp", ["x"], ["a"], domain="com.example"),
        helper.make_node("Add", ["k1", "k2"], ["k"]),  # constant: folds
        helper.make_node("Identity", ["a"], ["b"]),  # downstream of the custom op: removed
        helper.make_node("Mul", ["b", "k"], ["y"]),
    ]
    g = helper.make_graph(nodes, "g", [vi("x", [2])], [vi("y", [2])],
                          [arr("k1", np.ones(2, np.float32)), arr("k2", np.ones(2, np.float32))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    out, _ = fold(m)
    assert ops(out) == {"MyOp": 1, "Mul": 1}
    k = [numpy_helper.to_array(i) for i in out.graph.initializer]
    assert len(k) == 1 and np.all(k[0] == 2)


def test_initializer_that_is_a_graph_input_is_not_a_constant():
    m = make([helper.make_node("Add", ["k", "k"], ["k2"]), helper.make_node("Mul", ["x", "k2"], ["y"])],
             [vi("x", [2]), vi("k", [2])], [vi("y", [2])], [arr("k", np.ones(2, np.float32))])
    m.ir_version = 8
    out, _ = fold(m)
    assert ops(out) == {"Add": 1, "Mul": 1}


def test_duplicate_initializers_are_merged_and_dead_code_removed():
    w = RNG.standard_normal((3, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["a", "w2"], ["y"]),
             helper.make_node("Relu", ["x"], ["unused"])]
    m = make(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], [arr("w1", w), arr("w2", w.copy()), arr("dead", w)])
    out, stats = fold(m)
    assert len(out.graph.initializer) == 1
    assert ops(out) == {"MatMul": 2}
    assert stats["counters"]["initializers_merged"] == 1
    assert_same(m, out, {"x": RNG.standard_normal((2, 3)).astype(np.float32)}, tol=0)


def test_if_branches_are_folded():
    def branch(name, k):
        return helper.make_graph(
            [helper.make_node("Constant", [], [f"{name}_c"], value=numpy_helper.from_array(np.full(2, k, np.float32))),
             helper.make_node("Identity", [f"{name}_c"], [f"{name}_i"]),
             helper.make_node("Mul", ["x", f"{name}_i"], [f"{name}_m"]),
             helper.make_node("Identity", [f"{name}_m"], [f"{name}_out"])],
            name, [], [vi(f"{name}_out", [2])])

    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch("t", 2.0), else_branch=branch("e", 3.0))]
    m = make(nodes, [vi("x", [2])], [vi("y", [2])], [arr("zero", np.float32(0))])
    out, stats = fold(m)
    if_node = [n for n in out.graph.node if n.op_type == "If"][0]
    for attr in if_node.attribute:
        assert [n.op_type for n in attr.g.node] in (["Mul"], ["Mul", "Identity"])
    assert stats["counters"]["constants_lifted"] == 2
    for x in (np.array([1, 2], np.float32), np.array([-1, -2], np.float32)):
        assert_same(m, out, {"x": x}, tol=0)


def test_opset11_model_with_constant_weights_and_if():
    path = MODELS / "cnn_opset11_const_if.onnx"
    m = onnx.load(str(path))
    out, stats = fold(m)
    assert ops(out)["Constant"] == 0
    assert ops(out)["BatchNormalization"] == 0
    assert out.opset_import[0].version == 11
    x = np.load(MODELS / "digits_test.npz")["input"][:16]
    assert_same(m, out, {"input": x})


@pytest.mark.parametrize("name", ["digits_cnn", "digits_resnet", "digits_mobilenetv2", "bert_tiny"])
def test_project_models_fold_exactly_and_keep_accuracy(name, tmp_path):
    path = MODELS / f"{name}.onnx"
    m = onnx.load(str(path))
    result = onnxshrink.optimize(path, "fold", validate=False)
    saved = result.save(tmp_path / "out.onnx")
    out = onnx.load(str(saved))
    assert ops(out)["BatchNormalization"] == 0
    assert sum(ops(out).values()) < sum(ops(m).values())
    assert saved.stat().st_size <= path.stat().st_size
    data = "digits_seq_test.npz" if name == "bert_tiny" else "digits_test.npz"
    x = np.load(MODELS / data)["input"]
    labels = np.load(MODELS / "digits_test_labels.npy")
    a = run_ort(m, {"input": x})[0]
    b = run_ort(out, {"input": x})[0]
    assert rel_l2(a, b) <= TOL
    assert (a.argmax(1) == labels).mean() == (b.argmax(1) == labels).mean()


def test_fold_is_deterministic():
    m = onnx.load(str(MODELS / "digits_resnet.onnx"))
    a, _ = fold(m)
    b, _ = fold(m)
    assert a.SerializeToString() == b.SerializeToString()


def test_fold_options_validate():
    with pytest.raises(Exception) as e:
        parse("fold(rounds=0)")
    assert "rounds" in str(e.value)


# -- property: random elementwise graphs with constants fold exactly ----------------------------------

_BIN = ["Add", "Sub", "Mul", "Max", "Min"]
_UN = ["Relu", "Neg", "Abs", "Identity", "Sigmoid"]


@st.composite
def random_graph(draw):
    n_ops = draw(st.integers(1, 12))
    nodes, inits = [], []
    values = ["x"]  # runtime values
    consts = []
    for i in range(n_ops):
        kind = draw(st.sampled_from(["bin", "un", "const"]))
        out = f"v{i}"
        if kind == "const":
            val = draw(st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=3, max_size=3))
            inits.append(arr(out, np.array(val, np.float32)))
            consts.append(out)
            continue
        pool = values + consts
        if kind == "un":
            nodes.append(helper.make_node(draw(st.sampled_from(_UN)), [draw(st.sampled_from(pool))], [out]))
        else:
            a, b = draw(st.sampled_from(pool)), draw(st.sampled_from(pool))
            nodes.append(helper.make_node(draw(st.sampled_from(_BIN)), [a, b], [out]))
        if any(v in values for v in nodes[-1].input):
            values.append(out)
        else:
            consts.append(out)
    last = values[-1]
    nodes.append(helper.make_node("Identity", [last], ["y"]) if last != "x" else helper.make_node("Neg", ["x"], ["y"]))
    return make(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], inits)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graph())
def test_property_random_graphs_fold_exactly(m):
    out, _ = fold(m)
    assert len(out.graph.node) <= len(m.graph.node)
    assert file_size(out) <= file_size(m)
    x = np.linspace(-2, 2, 6, dtype=np.float32).reshape(2, 3)
    a = run_ort(m, {"x": x})[0]
    b = run_ort(out, {"x": x})[0]
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
