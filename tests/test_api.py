"""The public Python API: onnxshrink.optimize, OptimizeResult.save, and the pinned __all__."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxshrink
from onnxshrink.errors import DataError, OutputPathError, ShrinkError, SpecError, UsageError

MODELS = Path(__file__).resolve().parent.parent / "models"
CNN = MODELS / "digits_cnn.onnx"
X = np.load(MODELS / "digits_test.npz")["input"][:16]


def _run(path_or_proto, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = path_or_proto.SerializeToString() if isinstance(path_or_proto, onnx.ModelProto) else str(path_or_proto)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def cnn(tmp_path) -> Path:
    p = tmp_path / "cnn.onnx"
    shutil.copyfile(CNN, p)
    return p


def test_public_api_pinned():
    assert sorted(onnxshrink.__all__) == sorted([
        "DataError",
        "InputError",
        "ModelLoadError",
        "OptimizeResult",
        "OutputPathError",
        "PassFailedError",
        "Report",
        "ShrinkError",
        "SpecError",
        "TargetCheckFailedError",
        "UsageError",
        "ValidationFailedError",
        "__version__",
        "optimize",
    ])
    assert len(set(onnxshrink.__all__)) == len(onnxshrink.__all__)
    for name in onnxshrink.__all__:
        assert hasattr(onnxshrink, name), name
    assert onnxshrink.__version__ == "0.1.0"
    assert issubclass(onnxshrink.SpecError, onnxshrink.UsageError)
    assert issubclass(onnxshrink.ModelLoadError, onnxshrink.InputError)
    assert onnxshrink.optimize.__doc__ and onnxshrink.OptimizeResult.save.__doc__


@pytest.mark.parametrize("source", ["path", "str", "bytes", "proto"])
def test_optimize_sources(tmp_path, cnn, source):
    before = _sha(cnn)
    arg = {"path": cnn, "str": str(cnn), "bytes": cnn.read_bytes(), "proto": onnx.load(str(cnn))}[source]
    result = onnxshrink.optimize(arg)
    try:
        rep = result.report
        assert rep.verdict == "passed"
        assert result.ok
        assert rep.pipeline == "fold(constants=true,noops=true,fuse_bn=true,dedup=true,max_growth=0,rounds=4)"
        assert rep.before.op_counts["BatchNormalization"] == 3
        assert "BatchNormalization" not in rep.after.op_counts
        assert rep.after.nodes == rep.before.nodes - 3
        assert rep.passes[0].counters.get("batchnorm_fused") == 3
        assert rep.validation.samples == 4 and rep.validation.source == "synthetic"
        assert rep.input == (str(cnn) if source in ("path", "str") else "<in-memory model>")
        assert rep.output is None
        out = result.save(tmp_path / f"out_{source}.onnx")
        assert out == tmp_path / f"out_{source}.onnx"
        assert rep.output == str(out)
        assert rep.after.file_bytes == out.stat().st_size
        np.testing.assert_allclose(_run(out, {"input": X})[0], _run(CNN, {"input": X})[0], rtol=1e-5, atol=1e-5)
        assert len(onnx.load(str(out)).graph.node) == 12
    finally:
        result.close()
    assert _sha(cnn) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cnn.onnx", f"out_{source}.onnx"])


def test_optimize_with_data_and_output(tmp_path, cnn):
    out = tmp_path / "small.onnx"
    result = onnxshrink.optimize(cnn, "fold", data=MODELS / "digits_calib.npz", output=out)
    try:
        assert result.report.verdict == "passed"
        assert result.report.validation.samples == 256
        assert result.report.validation.outputs[0].top1 == 1.0
        assert result.save(out) == out
        np.testing.assert_allclose(_run(out, {"input": X})[0], _run(CNN, {"input": X})[0], rtol=1e-5, atol=1e-5)
    finally:
        result.close()


def test_optimize_data_dict_and_no_validate(cnn, tmp_path):
    result = onnxshrink.optimize(cnn, data={"input": X}, validate=False)
    assert result.report.verdict == "not run" and result.report.validation is None and result.ok
    result.close()
    with pytest.raises(DataError, match="missing input"):
        onnxshrink.optimize(cnn, data={"wrong": X})


def test_save_to_input_path_raises(cnn):
    before = _sha(cnn)
    result = onnxshrink.optimize(cnn)
    try:
        with pytest.raises(OutputPathError) as exc:
            result.save(cnn)
        assert exc.value.exit_code == 2
        assert "is the input model" in exc.value.message
    finally:
        result.close()
    assert _sha(cnn) == before


def test_output_equal_to_input_rejected_before_work(cnn):
    with pytest.raises(OutputPathError, match="is the input model"):
        onnxshrink.optimize(cnn, output=cnn)


def test_bad_spec_raises_spec_error(cnn):
    with pytest.raises(SpecError) as exc:
        onnxshrink.optimize(cnn, "fodl")
    assert exc.value.hint == "did you mean 'fold'?"


def test_empty_step_list(cnn):
    try:
        result = onnxshrink.optimize(cnn, [])
    except ShrinkError as e:
        assert e.exit_code == 2
        return
    try:
        assert result.report.verdict == "passed"
        assert result.report.passes == []
    finally:
        result.close()


def test_empty_spec_string_is_an_error(cnn):
    with pytest.raises(SpecError, match="empty pass spec"):
        onnxshrink.optimize(cnn, "   ")
    with pytest.raises(SpecError, match="empty pass spec"):
        onnxshrink.optimize(cnn, "")


def test_close_removes_workdir(cnn):
    result = onnxshrink.optimize(cnn)
    workdir = result._workdir
    assert workdir and os.path.isdir(workdir)
    result.close()
    assert not os.path.exists(workdir)
    result.close()  # idempotent


def test_failed_validation_save_needs_force(tmp_path, cnn):
    result = onnxshrink.optimize(cnn, tolerance=0.0)
    try:
        assert result.report.verdict == "failed" and not result.ok
        with pytest.raises(onnxshrink.ValidationFailedError) as exc:
            result.save(tmp_path / "o.onnx")
        assert exc.value.exit_code == 3
        assert not (tmp_path / "o.onnx").exists()
        assert result.save(tmp_path / "o.onnx", force=True).is_file()
    finally:
        result.close()


def test_input_shapes_are_used_for_synthetic_validation(tmp_path):
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S"])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(DataError, match="dynamic axis 1"):
        onnxshrink.optimize(m)
    result = onnxshrink.optimize(m, input_shapes={"x": [1, 6]})
    assert result.report.verdict == "passed"
    result.close()


def _ext_model(path: Path, location: str) -> Path:
    rng = np.random.default_rng(0)
    # a small bias first (onnx_ir keeps tensors under 256 bytes inline when saving) and a big weight
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b"),
         numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "w")],
    )
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path),
                    save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0)
    return path


def test_external_data_model_optimized_and_saved(tmp_path):
    src = _ext_model(tmp_path / "ext.onnx", "ext.onnx.data")
    feed = {"x": np.ones((2, 32), np.float32)}
    result = onnxshrink.optimize(src)
    try:
        assert result.report.verdict == "passed"
        out = result.save(tmp_path / "ext_small.onnx")
    finally:
        result.close()
    assert (tmp_path / "ext_small.onnx.data").is_file()
    np.testing.assert_array_equal(_run(out, feed)[0], _run(src, feed)[0])


def test_output_data_file_never_overwrites_input_external_data(tmp_path):
    src = _ext_model(tmp_path / "in.onnx", "out.onnx.data")
    data = tmp_path / "out.onnx.data"
    before = _sha(data)
    feed = {"x": np.ones((2, 32), np.float32)}
    expected = _run(src, feed)[0]
    try:
        result = onnxshrink.optimize(src, output=tmp_path / "out.onnx")
        try:
            result.save(tmp_path / "out.onnx")
        finally:
            result.close()
    except UsageError:
        pass  # refusing is fine too
    assert _sha(data) == before
    np.testing.assert_array_equal(_run(src, feed)[0], expected)
