"""onnxshrink.model: loading (and its errors), external data, atomic save, output-path checks, stats."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (ShapeInferencePass)
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.errors import ModelLoadError, OutputPathError
from onnxshrink.model import check_output_path, load_model, model_stats, save_model

MODELS = Path(__file__).resolve().parent.parent / "models"
CNN = MODELS / "digits_cnn.onnx"


def _run(path, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _gemm_proto(seed=0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    # weights over onnx_ir's 256-byte external-data threshold (the bias stays below it)
    w = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "w2")
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [w, b, w2],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _save_external(proto: onnx.ModelProto, path: Path, location: str | None = None) -> Path:
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location or path.name + ".data", size_threshold=0)
    return path


FEED = {"x": np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)}


# --------------------------------------------------------------------------------------------------
# Loading


def test_load_from_path_bytes_proto_and_ir():
    by_path = load_model(CNN)
    by_str = load_model(str(CNN))
    by_bytes = load_model(CNN.read_bytes())
    by_proto = load_model(onnx.load(str(CNN)))
    for m in (by_path, by_str, by_bytes, by_proto):
        assert isinstance(m, ir.Model)
        assert model_stats(m).op_counts == {
            "BatchNormalization": 3, "Conv": 3, "Flatten": 1, "Gemm": 2, "MaxPool": 2, "Relu": 4,
        }
        assert [v.name for v in m.graph.inputs] == ["input"]
        assert [v.name for v in m.graph.outputs] == ["logits"]
    assert load_model(by_path) is by_path


def _bad_file(tmp_path: Path, kind: str) -> tuple[Path, str]:
    p = tmp_path / "model.onnx"
    if kind == "text":
        p.write_text("this is a text file, not a protobuf\n")
        return p, "is not an ONNX model: protobuf parse failed"
    if kind == "empty":
        p.write_bytes(b"")
        return p, "is empty (0 bytes)"
    if kind == "truncated":
        data = CNN.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return p, "is not an ONNX model: protobuf parse failed"
    if kind == "empty_proto":
        p.write_bytes(b"\x08\x01")  # a valid protobuf: ir_version=1 and nothing else
        return p, "is not an ONNX model: it parses to an empty ModelProto"
    if kind == "missing":
        return tmp_path / "nope.onnx", "does not exist"
    if kind == "folder":
        p.mkdir()
        return p, "is a folder, not an ONNX file"
    if kind == "invalid_graph":
        g = helper.make_graph(
            [helper.make_node("Relu", ["undefined_tensor"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        )
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
        return p, "is not a valid ONNX graph"
    if kind == "missing_external":
        _save_external(_gemm_proto(), p)
        (tmp_path / "model.onnx.data").unlink()
        return p, "external data file 'model.onnx.data' of"
    if kind == "truncated_external":
        _save_external(_gemm_proto(), p)
        d = tmp_path / "model.onnx.data"
        d.write_bytes(d.read_bytes()[:40])
        return p, "is truncated (40 bytes"
    raise AssertionError(kind)


BAD_KINDS = ["text", "empty", "truncated", "empty_proto", "missing", "folder", "invalid_graph",
             "missing_external", "truncated_external"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_files_raise_model_load_error(tmp_path, kind):
    path, fragment = _bad_file(tmp_path, kind)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ModelLoadError) as exc:
        load_model(path)
    e = exc.value
    assert e.exit_code == 2
    assert fragment in e.message
    assert str(path) in e.message
    assert sorted(os.listdir(tmp_path)) == before  # nothing created or removed


def test_missing_external_data_names_tensor_and_folder(tmp_path):
    path, _ = _bad_file(tmp_path, "missing_external")
    with pytest.raises(ModelLoadError) as exc:
        load_model(path)
    assert exc.value.tensor == "w"
    assert str(tmp_path) in exc.value.hint


@pytest.mark.parametrize("kind", ["text", "truncated", "empty_proto", "invalid_graph"])
def test_bad_bytes_raise_model_load_error(tmp_path, kind):
    path, _ = _bad_file(tmp_path, kind)
    with pytest.raises(ModelLoadError) as exc:
        load_model(path.read_bytes())
    assert exc.value.exit_code == 2


def test_empty_bytes():
    with pytest.raises(ModelLoadError, match="the model bytes are empty"):
        load_model(b"")


def test_invalid_proto():
    g = helper.make_graph(
        [helper.make_node("Relu", ["nowhere"], ["y"])], "g", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    with pytest.raises(ModelLoadError, match="the model is not a valid ONNX graph"):
        load_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_check_false_skips_the_checker_but_not_external_data(tmp_path):
    path, _ = _bad_file(tmp_path, "invalid_graph")
    m = load_model(path, check=False)
    assert [n.op_type for n in m.graph] == ["Relu"]
    sub = tmp_path / "sub"
    sub.mkdir()
    path, _ = _bad_file(sub, "missing_external")
    with pytest.raises(ModelLoadError):
        load_model(path, check=False)


# --------------------------------------------------------------------------------------------------
# External data


def test_external_data_stays_external_and_round_trips(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    path = _save_external(_gemm_proto(), src / "model.onnx")
    expected = _run(path, FEED)

    m = load_model(path)
    tensors = {name: v.const_value for name, v in m.graph.initializers.items()}
    assert set(tensors) == {"w", "b", "w2"}
    assert all(isinstance(t, ir.ExternalTensor) for t in tensors.values())
    assert Path(tensors["w"].base_dir) == src

    out = tmp_path / "out"
    out.mkdir()
    dest = save_model(m, out / "small.onnx", external_data=True)
    assert dest == out / "small.onnx"
    assert sorted(os.listdir(out)) == ["small.onnx", "small.onnx.data"]
    reloaded = onnx.load(str(dest), load_external_data=False)
    locations = {e.value for t in reloaded.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"small.onnx.data"}
    np.testing.assert_array_equal(_run(dest, FEED)[0], expected[0])

    # the in-memory model is unchanged by saving: still points to the source's data
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in m.graph.initializers.values())
    assert Path(m.graph.initializers["w"].const_value.base_dir) == src

    # default: keep external data because the model came with it
    dest2 = save_model(m, out / "again.onnx")
    assert (out / "again.onnx.data").is_file()
    np.testing.assert_array_equal(_run(dest2, FEED)[0], expected[0])


def test_external_model_saved_embedded_when_asked(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    path = _save_external(_gemm_proto(), src / "model.onnx")
    expected = _run(path, FEED)
    out = tmp_path / "out"
    out.mkdir()
    dest = save_model(load_model(path), out / "embedded.onnx", external_data=False)
    assert os.listdir(out) == ["embedded.onnx"]
    assert not any(t.external_data for t in onnx.load(str(dest), load_external_data=False).graph.initializer)
    np.testing.assert_array_equal(_run(dest, FEED)[0], expected[0])


def test_embedded_model_saves_embedded_by_default(tmp_path):
    m = load_model(_gemm_proto())
    dest = save_model(m, tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == ["m.onnx"]
    np.testing.assert_array_equal(_run(dest, FEED)[0], _run_proto(_gemm_proto(), FEED)[0])


def _run_proto(proto, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


# --------------------------------------------------------------------------------------------------
# Atomic save


def _fake_save_factory(exc: BaseException):
    def fake_save(model, path, format=None, external_data=None, **kw):
        path = Path(path)
        path.write_bytes(b"half a model")
        if external_data:
            (path.parent / external_data).write_bytes(b"half the data")
        raise exc

    return fake_save


@pytest.mark.parametrize("err", [RuntimeError("disk exploded"), OSError(28, "No space left on device")])
def test_save_is_atomic_when_ir_save_fails(tmp_path, monkeypatch, err):
    dest = tmp_path / "m.onnx"
    dest.write_bytes(b"OLD MODEL")
    (tmp_path / "m.onnx.data").write_bytes(b"OLD DATA")
    m = load_model(_gemm_proto())
    monkeypatch.setattr(ir, "save", _fake_save_factory(err))
    expected_exc = OutputPathError if isinstance(err, OSError) else RuntimeError
    with pytest.raises(expected_exc) as exc:
        save_model(m, dest, external_data=True)
    if isinstance(err, OSError):
        assert exc.value.exit_code == 2
        assert exc.value.message == f"cannot write {dest}: No space left on device"
    assert dest.read_bytes() == b"OLD MODEL"
    assert (tmp_path / "m.onnx.data").read_bytes() == b"OLD DATA"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]  # no temp files left


def test_save_is_atomic_when_serialization_fails(tmp_path, monkeypatch):
    dest = tmp_path / "m.onnx"
    dest.write_bytes(b"OLD MODEL")
    m = load_model(_gemm_proto())

    def boom(*a, **k):
        raise RuntimeError("serialization failed")

    monkeypatch.setattr(ir, "to_proto", boom)
    with pytest.raises(RuntimeError, match="serialization failed"):
        save_model(m, dest, external_data=False)
    assert dest.read_bytes() == b"OLD MODEL"
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_save_replaces_existing_file(tmp_path):
    dest = tmp_path / "m.onnx"
    dest.write_bytes(b"OLD MODEL")
    save_model(load_model(_gemm_proto()), dest)
    assert os.listdir(tmp_path) == ["m.onnx"]
    np.testing.assert_array_equal(_run(dest, FEED)[0], _run_proto(_gemm_proto(), FEED)[0])


def test_save_into_missing_folder(tmp_path):
    with pytest.raises(OutputPathError) as exc:
        save_model(load_model(_gemm_proto()), tmp_path / "no" / "m.onnx")
    assert exc.value.message.startswith(f"cannot write to {tmp_path / 'no'}")


# --------------------------------------------------------------------------------------------------
# check_output_path


def test_check_output_path_ok(tmp_path):
    src = tmp_path / "in.onnx"
    src.write_bytes(b"x")
    assert check_output_path(tmp_path / "out.onnx", [src]) == tmp_path / "out.onnx"
    existing = tmp_path / "exists.onnx"
    existing.write_bytes(b"y")
    assert check_output_path(existing, [src]) == existing


def test_check_output_path_same_as_input(tmp_path, monkeypatch):
    src = tmp_path / "in.onnx"
    src.write_bytes(b"x")
    for out in (src, str(src), tmp_path / "." / "in.onnx", tmp_path / "sub" / ".." / "in.onnx"):
        if "sub" in str(out):
            (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(OutputPathError) as exc:
            check_output_path(out, [src])
        assert "is the input model" in exc.value.message
        assert exc.value.exit_code == 2
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputPathError, match="is the input model"):
        check_output_path("in.onnx", [src])
    # a symlink or a hard link to the input
    (tmp_path / "link.onnx").symlink_to(src)
    with pytest.raises(OutputPathError, match="is the input model"):
        check_output_path(tmp_path / "link.onnx", [src])
    os.link(src, tmp_path / "hard.onnx")
    with pytest.raises(OutputPathError, match="is the input model"):
        check_output_path(tmp_path / "hard.onnx", [src])


def test_check_output_path_folder_and_missing_folder(tmp_path):
    with pytest.raises(OutputPathError) as exc:
        check_output_path(tmp_path, [])
    assert exc.value.message == f"output path {tmp_path} is a folder"
    with pytest.raises(OutputPathError) as exc:
        check_output_path(tmp_path / "missing" / "m.onnx", [])
    assert exc.value.message == f"output folder {tmp_path / 'missing'} does not exist"


def test_check_output_path_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        # refused by its mode bits even for root, whom os.access would let write
        with pytest.raises(OutputPathError, match="is not writable"):
            check_output_path(ro / "m.onnx", [])
    finally:
        ro.chmod(0o755)


def test_check_output_path_read_only_folder_by_access(tmp_path, monkeypatch):
    # as root chmod cannot make a folder unwritable: emulate what os.access reports for a normal user
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == tmp_path else real_access(p, mode, **k))
    with pytest.raises(OutputPathError) as exc:
        check_output_path(tmp_path / "m.onnx", [])
    assert exc.value.message == f"output folder {tmp_path} is not writable"


# --------------------------------------------------------------------------------------------------
# model_stats


def _conv_gemm_model() -> ir.Model:
    rng = np.random.default_rng(0)
    W = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")
    B = numpy_helper.from_array(np.zeros(4, np.float32), "B")
    G = numpy_helper.from_array(rng.standard_normal((10, 256)).astype(np.float32), "G")
    C = numpy_helper.from_array(np.zeros(10, np.float32), "C")
    g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Flatten", ["c"], ["f"]),
            helper.make_node("Gemm", ["f", "G", "C"], ["y"], transB=1),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [W, B, G, C],
    )
    m = load_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    ir.passes.common.ShapeInferencePass()(m)
    return m


def test_model_stats_conv_gemm():
    s = model_stats(_conv_gemm_model())
    assert s.nodes == 3
    assert s.op_counts == {"Conv": 1, "Flatten": 1, "Gemm": 1}
    assert s.params == 4 * 3 * 3 * 3 + 4 + 10 * 256 + 10 == 2682
    assert s.weight_bytes == 2682 * 4
    # Conv: output 4x8x8 (batch counted as 1), each a 3x3x3 dot product; Gemm: 1x256 @ 256x10
    assert s.macs == 4 * 8 * 8 * (3 * 3 * 3) + 256 * 10 == 9472
    assert s.opset == 17
    assert s.file_bytes is None
    assert s.to_dict()["macs"] == 9472


def _single_op_model(node, inputs, inits, out_shape):
    g = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                          [numpy_helper.from_array(a, n) for n, a in inits.items()])
    m = load_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    ir.passes.common.ShapeInferencePass()(m)
    return m


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


@pytest.mark.parametrize(
    "node, inputs, inits, out_shape, macs",
    [
        # grouped Conv: out [1,6,3,3], each output sums C/g * 3 * 3 = 18 products
        (helper.make_node("Conv", ["x", "W"], ["y"], group=2), [_vi("x", [1, 4, 5, 5])],
         {"W": np.ones((6, 2, 3, 3), np.float32)}, [1, 6, 3, 3], 6 * 3 * 3 * 18),
        # ConvTranspose: every input element (2x4x4) meets a C_out x 3 x 3 slice of the kernel
        (helper.make_node("ConvTranspose", ["x", "W"], ["y"]), [_vi("x", [1, 2, 4, 4])],
         {"W": np.ones((2, 3, 3, 3), np.float32)}, [1, 3, 6, 6], 2 * 4 * 4 * 3 * 3 * 3),
        # batched MatMul: out [2,3,5], inner dim 4
        (helper.make_node("MatMul", ["x", "W"], ["y"]), [_vi("x", [2, 3, 4])],
         {"W": np.ones((4, 5), np.float32)}, [2, 3, 5], 2 * 3 * 5 * 4),
        # Gemm with transA: A is [K=3, M=2]
        (helper.make_node("Gemm", ["x", "W"], ["y"], transA=1), [_vi("x", [3, 2])],
         {"W": np.ones((3, 4), np.float32)}, [2, 4], 2 * 3 * 4),
    ],
)
def test_model_stats_macs_by_op(node, inputs, inits, out_shape, macs):
    assert model_stats(_single_op_model(node, inputs, inits, out_shape)).macs == macs


def test_model_stats_without_shapes_has_no_macs_and_counts_constants():
    m = ir.from_onnx_text(
        """
        <ir_version: 8, opset_import: ["" : 17, "custom.x" : 1]>
        g (float[N] x) => (float[N] y) {
            c = Constant <value = float[6] {1, 2, 3, 4, 5, 6}> ()
            t = custom.x.Thing(x, c)
            y = Relu(t)
        }
        """
    )
    s = model_stats(m)
    assert s.macs is None
    assert s.nodes == 3
    assert s.params == 6 and s.weight_bytes == 24
    assert s.op_counts == {"Constant": 1, "Relu": 1, "custom.x::Thing": 1}


def test_model_stats_digits_cnn_by_hand():
    m = load_model(CNN)
    ir.passes.common.ShapeInferencePass()(m)
    s = model_stats(m)
    conv1 = 16 * 16 * 16 * (1 * 9)
    conv2 = 32 * 16 * 16 * (16 * 9)
    conv3 = 32 * 8 * 8 * (32 * 9)
    fc1, fc2 = 512 * 64, 64 * 10
    assert s.macs == conv1 + conv2 + conv3 + fc1 + fc2 == 1_839_744
    assert s.nodes == 15


def test_model_stats_walks_subgraphs():
    s = model_stats(load_model(MODELS / "cnn_opset11_const_if.onnx"))
    assert s.op_counts == {
        "BatchNormalization": 3, "Concat": 1, "Constant": 28, "Conv": 3, "Equal": 1, "Gather": 2, "Gemm": 3,
        "If": 1, "MaxPool": 2, "Relu": 4, "Reshape": 1, "Shape": 2, "Unsqueeze": 1,
    }
    assert s.nodes == 52
    assert s.opset == 11


def test_name_matcher_is_one_rule_for_every_exclude_option():
    from onnxshrink.model import name_matcher

    m = name_matcher("/blocks/*|fc")
    assert m("/blocks/blocks.0/Conv") and m("/fc/Gemm") and m("fc")
    assert not m("/stem/Conv") and not m("x/blocks/y") and not m(None)
    m = name_matcher("stem+conv[12]")
    assert m("/stem/stem.0/Conv") and m("conv1") and not m("conv3") and not m("conv12")
    assert not name_matcher("none")("none") and not name_matcher(None)("a") and not name_matcher("")("a")
