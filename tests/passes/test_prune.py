"""prune: positive (the rewrite fires), negative (declines with a reason), numeric and property tests.

Tolerances: ratio=0 must be bit-exact (nothing changes); pruning channels whose weights are all zero must
be exact up to float rounding (1e-5 relative L2: those channels contribute nothing); otherwise pruning
changes outputs by design, and the tests check structure (shapes, channel counts, ORT runs) and that
reconstruction lowers the error relative to no reconstruction.
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
from conftest import MODELS, rel_l2, run_ort
from onnxshrink.calib import Dataset
from onnxshrink.errors import UsageError
from onnxshrink.passes.channels import analyze
from onnxshrink.passes.prune import PruneOptions, PrunePass, exclusion_matcher
from onnxshrink.pipeline import parse
from onnxshrink.registry import PassContext, get_pass


# ---- graph building ---------------------------------------------------------------------------------------

class G:
    """A tiny builder for NCHW test graphs."""

    def __init__(self, seed: int = 0, in_ch: int = 3, hw: int = 8):
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []
        self.n = 0
        self.in_ch, self.hw = in_ch, hw

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}{self.n}"

    def init(self, base: str, a: np.ndarray) -> str:
        nm = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(a), nm))
        return nm

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str] | str:
        outs = [self.name(op.lower() + "_o") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, stride: int = 1, bias: bool = True,
             w: np.ndarray | None = None) -> str:
        if w is None:
            w = (self.rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(cin // group * k * k)).astype(np.float32)
        ins = [x, self.init("w", w)]
        if bias:
            ins.append(self.init("b", (0.1 * self.rng.standard_normal(cout)).astype(np.float32)))
        return self.node("Conv", ins, kernel_shape=[k, k], pads=[k // 2] * 4, group=group, strides=[stride] * 2)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        return self.node("BatchNormalization", [
            x, self.init("g", r.uniform(0.5, 2, c).astype(np.float32)), self.init("be", r.standard_normal(c).astype(np.float32)),
            self.init("m", r.standard_normal(c).astype(np.float32)), self.init("v", r.uniform(0.5, 2, c).astype(np.float32))])

    def head(self, x: str, c: int, spatial: int = 1, classes: int = 10) -> str:
        if spatial == 1:
            x = self.node("GlobalAveragePool", [x])
        f = self.node("Flatten", [x], axis=1)
        w = (self.rng.standard_normal((classes, c * spatial)) / np.sqrt(c * spatial)).astype(np.float32)
        return self.node("Gemm", [f, self.init("fw", w), self.init("fb", np.zeros(classes, np.float32))], transB=1)

    def model(self, out: str, out_shape: list | None = None, opset: int = 17, extra_opsets=()) -> onnx.ModelProto:
        nodes = list(self.nodes)
        nodes.append(helper.make_node("Identity", [out], ["y"], name="out_identity"))
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", self.in_ch, self.hw, self.hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)] +
                              [helper.make_opsetid(d, 1) for d in extra_opsets])
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m


def feeds(proto: onnx.ModelProto, n: int = 4, seed: int = 1) -> dict[str, np.ndarray]:
    t = proto.graph.input[0].type.tensor_type
    shape = [n] + [d.dim_value for d in t.shape.dim[1:]]
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def dataset(arrays: dict[str, np.ndarray]) -> Dataset:
    chunk = {k: v[:, None] for k, v in arrays.items()}  # one sample = one feed with its own batch axis
    return Dataset([lambda: chunk], len(next(iter(chunk.values()))), "test")


def prune(proto: onnx.ModelProto, data: dict[str, np.ndarray] | None = None, **options) -> tuple[onnx.ModelProto, dict, bool]:
    model = ir.from_proto(proto)
    ctx = PassContext(data=dataset(data) if data is not None else None)
    result = PrunePass(PruneOptions(**options), ctx)(model)
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    return out, result.stats, result.modified


def weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def conv_weight_shapes(proto: onnx.ModelProto) -> list[tuple[int, ...]]:
    w = weights(proto)
    return [w[n.input[1]].shape for n in proto.graph.node if n.op_type == "Conv"]


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def ops(proto: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in proto.graph.node)


def plain_cnn(seed: int = 0) -> onnx.ModelProto:
    g = G(seed)
    x = g.relu(g.conv("x", 3, 8))
    x = g.relu(g.conv(x, 8, 16))
    return g.model(g.head(x, 16), ["N", 10])


def resnet_like(seed: int = 0) -> onnx.ModelProto:
    """stem → residual block → concat of two branches → depthwise → split/concat → flatten head."""
    g = G(seed)
    s = g.relu(g.conv("x", 3, 8))
    b = g.relu(g.conv(s, 8, 8))
    b = g.conv(b, 8, 8)
    r = g.relu(g.node("Add", [b, s]))
    c = g.node("Concat", [g.relu(g.conv(r, 8, 8, k=1)), g.relu(g.conv(r, 8, 8))], axis=1)
    d = g.relu(g.conv(c, 16, 16, group=16))
    p1, p2 = g.node("Split", [d, g.init("sp", np.array([8, 8], np.int64))], n_out=2, axis=1)
    m = g.node("Concat", [g.relu(g.conv(p1, 8, 8)), p2], axis=1)
    m = g.node("MaxPool", [m], kernel_shape=[2, 2], strides=[2, 2])
    return g.model(g.head(m, 16, spatial=16), ["N", 10])


# ---- positive ---------------------------------------------------------------------------------------------

def test_registered_with_order_rule_and_options():
    info = get_pass("prune")
    assert info.must_precede == ("quant",)
    assert info.cls.tolerance == 0.5
    steps = parse("prune(ratio=0.4,scope=global,importance=l1,round_to=8,exclude=stem+fc,target_macs=0.6,recon=none)")
    o = steps[0].options
    assert (o.ratio, o.scope, o.importance, o.round_to, o.exclude, o.target_macs, o.recon) == \
        (0.4, "global", "l1", 8, "stem+fc", 0.6, "none")
    assert parse(steps[0].format())[0] == steps[0]  # prints back (exclude=none round-trips too)
    assert parse(parse("prune")[0].format())[0].options.exclude is None


def test_plain_cnn_channels_cut_consistently():
    proto = plain_cnn()
    out, stats, modified = prune(proto, ratio=0.5, recon="none")
    assert modified
    assert conv_weight_shapes(out) == [(4, 3, 3, 3), (8, 4, 3, 3)]
    w = weights(out)
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    assert w[gemm.input[1]].shape == (10, 8)
    assert ops(out) == ops(proto)
    c = stats["counters"]
    assert c["groups_pruned"] == 2 and c["channels_removed"] == 12 and c["channels_before"] == 24
    assert stats["declines"] == {"group not pruned: reaches a graph output": 1}
    layers = stats["layers"]
    assert [r["out_channels"] for r in layers] == [[8, 4], [16, 8], [10, 10]]
    (y,) = run_ort(out, feeds(proto))
    assert y.shape == (4, 10)
    # old weights are gone, not left as dead initializers
    assert len(out.graph.initializer) == len(proto.graph.initializer)


def test_residual_concat_depthwise_split_flatten():
    proto = resnet_like()
    out, stats, modified = prune(proto, ratio=0.5, recon="none")
    assert modified
    ref = run_ort(proto, feeds(proto))[0]
    got = run_ort(out, feeds(proto))[0]
    assert got.shape == ref.shape
    c = stats["counters"]
    assert c["group_counts_fixed"] == 1 and c["split_sizes_fixed"] == 1
    dw = next(n for n in out.graph.node if n.op_type == "Conv" and attrs(n).get("group", 1) > 1)
    group = attrs(dw)["group"]
    w = weights(out)
    assert w[dw.input[1]].shape == (group, 1, 3, 3) and group == 8
    split = next(n for n in out.graph.node if n.op_type == "Split")
    assert list(w[split.input[1]]) == [4, 4]
    # residual: stem and the block's second conv lose the same channels
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert w[convs[0].input[1]].shape[0] == w[convs[2].input[1]].shape[0] == 4
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    assert w[gemm.input[1]].shape == (10, 8 * 16)  # channel × spatial blocks of the flatten


def test_reshape_flatten_shape_constant_is_fixed():
    g = G()
    x = g.relu(g.conv("x", 3, 8))
    r = g.node("Reshape", [x, g.init("shape", np.array([-1, 8 * 64], np.int64))])
    w = g.init("fw", np.random.default_rng(0).standard_normal((8 * 64, 10)).astype(np.float32))
    y = g.node("MatMul", [r, w])
    proto = g.model(y, ["N", 10])
    out, stats, _ = prune(proto, ratio=0.5, recon="none")
    assert stats["counters"]["reshape_shapes_fixed"] == 1
    wts = weights(out)
    reshape = next(n for n in out.graph.node if n.op_type == "Reshape")
    assert list(wts[reshape.input[1]]) == [-1, 4 * 64]
    assert run_ort(out, feeds(proto))[0].shape == (4, 10)


def test_qdq_unfused_bn_and_conv_transpose_pass_through():
    g = G()
    x = g.conv("x", 3, 8)
    x = g.relu(g.bn(x, 8))
    q = g.node("QuantizeLinear", [x, g.init("s", np.float32(0.05)), g.init("z", np.uint8(128))])
    x = g.node("DequantizeLinear", [q, g.init("s", np.float32(0.05)), g.init("z", np.uint8(128))])
    wt = np.random.default_rng(0).standard_normal((8, 6, 2, 2)).astype(np.float32) * 0.3
    x = g.node("ConvTranspose", [x, g.init("wt", wt)], kernel_shape=[2, 2], strides=[2, 2])
    x = g.relu(x)
    proto = g.model(g.head(x, 6), ["N", 10])
    out, stats, _ = prune(proto, ratio=0.5, recon="none")
    w = weights(out)
    ct = next(n for n in out.graph.node if n.op_type == "ConvTranspose")
    assert w[ct.input[1]].shape == (4, 3, 2, 2)
    bn = next(n for n in out.graph.node if n.op_type == "BatchNormalization")
    assert all(w[i].shape == (4,) for i in bn.input[1:])
    assert run_ort(out, feeds(proto))[0].shape == (4, 10)


def test_round_to_and_max_ratio():
    g = G()
    x = g.relu(g.conv("x", 3, 32))
    proto = g.model(g.head(x, 32), ["N", 10])
    out, _, _ = prune(proto, ratio=0.7, round_to=8, recon="none")
    assert conv_weight_shapes(out)[0][0] == 16  # 32 - 22 = 10 -> rounded up to 16
    out, _, _ = prune(proto, ratio=0.9, max_ratio=0.5, recon="none")
    assert conv_weight_shapes(out)[0][0] == 16


def test_target_macs_keeps_at_most_that_fraction():
    proto = resnet_like()
    model = ir.from_proto(proto)
    res = onnxshrink.optimize(model, passes="prune(target_macs=0.5,recon=none)", validate=False)
    assert res.report.after.macs <= 0.5 * res.report.before.macs
    assert res.report.after.macs >= 0.35 * res.report.before.macs  # not grossly over-pruned


def test_global_scope_and_bn_importance():
    proto = resnet_like(3)
    out_g, stats_g, _ = prune(proto, ratio=0.4, scope="global", recon="none")
    assert stats_g["counters"]["channels_removed"] > 0
    g = G()
    x = g.relu(g.bn(g.conv("x", 3, 8, bias=False), 8))
    proto2 = g.model(g.head(x, 8), ["N", 10])
    gamma = weights(proto2)[next(n for n in proto2.graph.node if n.op_type == "BatchNormalization").input[1]]
    out, stats, _ = prune(proto2, ratio=0.5, importance="bn", recon="none")
    bn = next(n for n in out.graph.node if n.op_type == "BatchNormalization")
    kept = weights(out)[bn.input[1]]
    assert sorted(kept) == sorted(np.sort(gamma)[4:])  # the 4 largest |gamma| are kept


# ---- negative ---------------------------------------------------------------------------------------------

def test_group_reaching_graph_output_is_not_pruned():
    g = G()
    x = g.relu(g.conv("x", 3, 8))
    proto = g.model(x, ["N", 8, 8, 8])
    out, stats, modified = prune(proto, ratio=0.5, recon="none")
    assert not modified
    assert stats["declines"] == {"group not pruned: reaches a graph output": 1}
    assert stats["blocked"][0]["reason"] == "reaches a graph output"


def test_unknown_op_blocks_its_group():
    g = G()
    a = g.relu(g.conv("x", 3, 8))
    t = g.node("Transpose", [a], perm=[0, 1, 3, 2])
    b = g.relu(g.conv(t, 8, 8))
    proto = g.model(g.head(b, 8), ["N", 10])
    out, stats, _ = prune(proto, ratio=0.5, recon="none")
    assert stats["declines"]["group not pruned: used by Transpose"] == 1
    assert conv_weight_shapes(out) == [(8, 3, 3, 3), (4, 8, 3, 3)]


def test_custom_op_blocks_its_group():
    g = G()
    a = g.relu(g.conv("x", 3, 8))
    g.nodes.append(helper.make_node("Mystery", [a], ["m_out"], domain="com.example", name="mystery"))
    proto = g.model(g.head(g.relu(g.conv(a, 8, 8)), 8), ["N", 10], extra_opsets=["com.example"])
    model = ir.from_proto(proto)
    cg = analyze(model)
    reasons = [r for rs in cg.group_reasons().values() for r in rs]
    assert "used by custom op com.example::Mystery" in reasons


def test_shared_weight_declines():
    g = G()
    a = g.relu(g.conv("x", 3, 8))
    w = np.random.default_rng(0).standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.1
    wn = g.init("shared", w)
    b1 = g.relu(g.node("Conv", [a, wn], kernel_shape=[3, 3], pads=[1] * 4))
    b2 = g.relu(g.node("Conv", [b1, wn], kernel_shape=[3, 3], pads=[1] * 4))
    proto = g.model(g.head(b2, 8), ["N", 10])
    out, stats, _ = prune(proto, ratio=0.5, recon="none")
    assert stats["declines"]["group not pruned: weight shared with another node"] >= 1
    assert weights(out)[wn].shape == (8, 8, 3, 3)  # untouched


def test_exclude_by_name():
    proto = plain_cnn()
    first = next(n.name for n in proto.graph.node if n.op_type == "Conv")
    out, stats, _ = prune(proto, ratio=0.5, recon="none", exclude=first)
    assert stats["declines"]["group not pruned: excluded by option"] == 1
    assert conv_weight_shapes(out) == [(8, 3, 3, 3), (8, 8, 3, 3)]
    assert exclusion_matcher("stem+/layer*")(ir.Node("", "Conv", [], name="/layer3/Conv"))
    assert not exclusion_matcher("layer*")(ir.Node("", "Conv", [], name="/layer3/Conv"))  # a glob is whole-name
    assert exclusion_matcher("layer")(ir.Node("", "Conv", [], name="/layer3/Conv"))
    assert not exclusion_matcher("stem")(ir.Node("", "Conv", [], name="/layer3/Conv"))


def test_data_needing_options_without_data_are_usage_errors():
    with pytest.raises(UsageError, match="needs --data"):
        prune(plain_cnn(), ratio=0.5, importance="act")
    with pytest.raises(UsageError, match="needs --data"):
        prune(plain_cnn(), ratio=0.5, recon="lsq")


# ---- numeric ----------------------------------------------------------------------------------------------

def test_ratio_zero_is_exact():
    proto = resnet_like()
    out, stats, modified = prune(proto, ratio=0.0)
    assert not modified
    f = feeds(proto)
    np.testing.assert_array_equal(run_ort(out, f)[0], run_ort(proto, f)[0])


def test_pruning_all_zero_channels_is_exact():
    g = G()
    w = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    w[[1, 4, 6]] = 0.0
    x = g.conv("x", 3, 8, bias=False, w=w)
    x = g.relu(x)
    x = g.relu(g.conv(x, 8, 8))
    proto = g.model(g.head(x, 8), ["N", 10])
    second = [n.name for n in proto.graph.node if n.op_type == "Conv"][1]
    out, stats, _ = prune(proto, ratio=3 / 8 + 1e-6, recon="none", exclude=second)
    assert stats["counters"]["channels_removed"] == 3
    assert conv_weight_shapes(out)[0] == (5, 3, 3, 3)
    f = feeds(proto, 16)
    assert rel_l2(run_ort(proto, f)[0], run_ort(out, f)[0]) <= 1e-5


def test_lsq_reconstruction_reduces_error():
    proto = onnx.load(MODELS / "digits_cnn.onnx")
    calib = dict(np.load(MODELS / "digits_calib.npz"))
    test = {"input": np.load(MODELS / "digits_test.npz")["input"][:200]}
    ref = run_ort(proto, test)[0]
    errs = {}
    for recon in ("none", "lsq"):
        res = onnxshrink.optimize(proto, passes=f"fold,prune(ratio=0.5,recon={recon},samples=128)", data=calib,
                                  validate=False)
        out = ir.to_proto(res.model)
        errs[recon] = rel_l2(ref, run_ort(out, test)[0])
        if recon == "lsq":
            assert res.report.passes[1].counters["layers_reconstructed"] >= 2
            rows = res.report.passes[1].layers
            fitted = [r["recon_rel_err"] for r in rows if r["recon_rel_err"]]
            assert fitted and all(after <= before for before, after in fitted)
    assert errs["lsq"] < 0.6 * errs["none"], errs


def test_act_importance_runs_on_data():
    proto = resnet_like()
    f = feeds(proto, 32)
    out, stats, modified = prune(proto, data=f, ratio=0.3, importance="act", recon="lsq", samples=32)
    assert modified and stats["counters"]["layers_reconstructed"] >= 1
    assert "act_fallback_l2" not in stats["counters"]
    assert run_ort(out, f)[0].shape == (32, 10)


# ---- API / pipeline -----------------------------------------------------------------------------------------

def test_optimize_fold_prune_on_shipped_resnet(tmp_path):
    res = onnxshrink.optimize(MODELS / "digits_resnet.onnx", passes="fold,prune(ratio=0.3,samples=64)",
                              data=MODELS / "digits_calib.npz")
    assert res.report.verdict == "passed"
    assert res.report.after.macs < 0.6 * res.report.before.macs
    d = res.report.to_dict()
    prune_rec = d["passes"][1]
    assert prune_rec["layers"] and prune_rec["counters"]["layers_reconstructed"] > 0
    assert "per layer" in res.report.to_markdown()
    out = res.save(tmp_path / "r.onnx")
    y = run_ort(out, {"input": np.load(MODELS / "digits_test.npz")["input"][:8]})[0]
    assert y.shape == (8, 10)


# ---- property: random small CNNs --------------------------------------------------------------------------------

@st.composite
def random_cnn(draw):
    seed = draw(st.integers(0, 10_000))
    g = G(seed, in_ch=draw(st.sampled_from([1, 3])), hw=8)
    c = draw(st.sampled_from([4, 6, 8]))
    x = g.relu(g.conv("x", g.in_ch, c))
    hw = 8
    for kind in draw(st.lists(st.sampled_from(["conv", "res", "concat", "dw", "pool", "bn", "split", "mul"]),
                              min_size=1, max_size=5)):
        if kind == "conv":
            c2 = draw(st.sampled_from([4, 6, 8, 12]))
            x, c = g.relu(g.conv(x, c, c2, k=draw(st.sampled_from([1, 3])))), c2
        elif kind == "res":
            b = g.conv(g.relu(g.conv(x, c, c)), c, c)
            x = g.relu(g.node("Add", [b, x]))
        elif kind == "concat":
            c1, c2 = draw(st.sampled_from([2, 4])), draw(st.sampled_from([3, 4]))
            x, c = g.node("Concat", [g.relu(g.conv(x, c, c1, k=1)), g.relu(g.conv(x, c, c2))], axis=1), c1 + c2
        elif kind == "dw":
            x = g.relu(g.conv(x, c, c, group=c))
        elif kind == "pool" and hw >= 4:
            x = g.node(draw(st.sampled_from(["MaxPool", "AveragePool"])), [x], kernel_shape=[2, 2], strides=[2, 2])
            hw //= 2
        elif kind == "bn":
            x = g.bn(x, c)
        elif kind == "split" and c % 2 == 0:
            a, b = g.node("Split", [x, g.init("sp", np.array([c // 2, c // 2], np.int64))], n_out=2, axis=1)
            x = g.node("Concat", [g.relu(g.conv(a, c // 2, c // 2)), b], axis=1)
        elif kind == "mul":
            x = g.node("Mul", [x, g.init("cm", g.rng.uniform(0.5, 1.5, (c, 1, 1)).astype(np.float32))])
    flat = draw(st.booleans())
    y = g.head(x, c, spatial=hw * hw if flat else 1)
    return g.model(y, ["N", 10])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(proto=random_cnn(), ratio=st.floats(0.0, 0.9), scope=st.sampled_from(["local", "global"]),
       round_to=st.sampled_from([1, 2]), importance=st.sampled_from(["l1", "l2", "bn"]))
def test_property_random_cnns_stay_valid(proto, ratio, scope, round_to, importance):
    out, stats, modified = prune(proto, ratio=ratio, scope=scope, round_to=round_to, importance=importance,
                                 recon="none")
    f = feeds(proto, 3)
    ref = run_ort(proto, f)
    got = run_ort(out, f)
    assert [a.shape for a in got] == [a.shape for a in ref]
    assert [o.type for o in out.graph.output] == [o.type for o in proto.graph.output]
    assert all(np.isfinite(a).all() for a in got)
    if not modified:
        np.testing.assert_array_equal(got[0], ref[0])
    if ratio >= 0.5 and stats["counters"]["groups_prunable"]:
        assert modified and stats["counters"]["channels_removed"] > 0


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(proto=random_cnn(), ratio=st.floats(0.1, 0.7))
def test_property_random_cnns_with_reconstruction(proto, ratio):
    f = feeds(proto, 16)
    out, stats, modified = prune(proto, data=f, ratio=ratio, recon="lsq", samples=16)
    got = run_ort(out, f)
    assert got[0].shape == run_ort(proto, f)[0].shape and np.isfinite(got[0]).all()


def test_latency_option_reports_total_and_per_node():
    proto = plain_cnn()
    out, stats, _ = prune(proto, ratio=0.5, recon="none", latency=True)
    lat = stats["latency_ms"]
    assert len(lat) == 2 and all(t > 0 for t in lat)
    assert stats["counters"]["latency_us_before"] > 0
    rows = stats["layers"]
    assert any(r["latency_us"][0] is not None for r in rows)
