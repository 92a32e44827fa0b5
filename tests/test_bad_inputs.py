"""The bad-input catalogue, part 2: the cases not already in test_cli.py's ``BAD_CASES``.

The whole catalogue (test_cli.py ``BAD_CASES`` + ``CASES`` here) is listed in docs/cli.md. Every case must
give: exit code 2, one ``error:`` line (a spec error adds its text and a caret, indented), a ``hint:`` line,
no traceback, every file in the folder byte-for-byte unchanged and nothing new written. Model cases are
also run through ``inspect`` and ``check``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxshrink
from onnxshrink.cli import main
from onnxshrink.errors import ShrinkError

ROOT = Path(__file__).resolve().parent.parent
CNN = ROOT / "models" / "digits_cnn.onnx"


def _model(nodes, inputs, outputs, inits=(), opsets=(("", 17),), ir_version=None) -> onnx.ModelProto:
    g = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = h.make_model(g, opset_imports=[h.make_opsetid(d, v) for d, v in opsets])
    if ir_version is not None:
        m.ir_version = ir_version
    return m


def _x(shape=(2,)):
    return h.make_tensor_value_info("x", T.FLOAT, list(shape))


def _y(shape=(2,)):
    return h.make_tensor_value_info("y", T.FLOAT, list(shape))


def _write(w: Path, m: onnx.ModelProto) -> Path:
    p = w / "m.onnx"
    p.write_bytes(m.SerializeToString())  # no checker on the way out: these are broken on purpose
    return p


# -- model cases: (path, fragment) ----------------------------------------------------------------------


def _zip_checkpoint(w):
    with zipfile.ZipFile(w / "m.onnx", "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    return w / "m.onnx", "is not an ONNX model: it is a zip archive (a PyTorch checkpoint or .pt file?)"


def _gzip(w):
    (w / "m.onnx").write_bytes(gzip.compress(CNN.read_bytes()))
    return w / "m.onnx", "is not an ONNX model: it is gzip-compressed"


def _ort_format(w):
    (w / "m.onnx").write_bytes(b"\x18\x00\x00\x00ORTM" + bytes(range(256)) * 4)
    return w / "m.onnx", "is not an ONNX model: it is an ONNX Runtime (ORT-format) model"


def _short_external_data(w):
    rng = np.random.default_rng(0)
    m = _model([h.make_node("MatMul", ["x", "w"], ["y"])], [_x((1, 64))], [_y((1, 32))],
               [nh.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")])
    onnx.save_model(m, str(w / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    data = w / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    return w / "m.onnx", "external data file 'm.onnx.data' of"


def _cycle(w):
    return _write(w, _model([h.make_node("Add", ["x", "b"], ["a"], name="n1"), h.make_node("Relu", ["a"], ["b"], name="n2")],
                            [_x()], [h.make_tensor_value_info("b", T.FLOAT, [2])])), "must be topologically sorted"


def _duplicate_output_names(w):
    return _write(w, _model([h.make_node("Relu", ["x"], ["y"], name="n1"), h.make_node("Neg", ["x"], ["y"], name="n2")],
                            [_x()], [_y()])), "'y' has been used as output names multiple times"


def _undefined_input_name(w):
    return _write(w, _model([h.make_node("Add", ["x", "nowhere"], ["y"], name="n1")], [_x()], [_y()])), \
        "is not a valid ONNX graph"


def _domain_not_imported(w):
    return _write(w, _model([h.make_node("MyOp", ["x"], ["y"], name="n1", domain="com.example")], [_x()], [_y()])), \
        "No opset import for domain 'com.example'"


def _unknown_default_domain_op(w):
    return _write(w, _model([h.make_node("Frobnicate", ["x"], ["y"], name="n1")], [_x()], [_y()])), \
        "No Op registered for Frobnicate"


def _opset_newer_than_onnx(w):
    newest = onnx.defs.onnx_opset_version()
    return _write(w, _model([h.make_node("Relu", ["x"], ["y"])], [_x()], [_y()], opsets=(("", newest + 5),))), \
        f"uses opset {newest + 5}, newer than the installed onnx"


def _ir_version_newer_than_onnx(w):
    return _write(w, _model([h.make_node("Relu", ["x"], ["y"])], [_x()], [_y()], ir_version=99)), \
        "ir_version 99 is higher than the checker's"


def _folder(w):
    (w / "m.onnx").mkdir()
    return w / "m.onnx", "is a folder, not an ONNX file"


MODEL_CASES = {f.__name__.lstrip("_"): f for f in [
    _zip_checkpoint, _gzip, _ort_format, _short_external_data, _cycle, _duplicate_output_names,
    _undefined_input_name, _domain_not_imported, _unknown_default_domain_op, _opset_newer_than_onnx,
    _ir_version_newer_than_onnx, _folder,
]}


# -- run cases: (model path, extra args, fragment) on a valid model ----------------------------------


def _dynamic_axis_without_data(w):
    p = _write(w, _model([h.make_node("Relu", ["x"], ["y"])], [_x(("N", "L"))], [_y(("N", "L"))]))
    return p, [], "input 'x' has a dynamic axis 1 and no data to size it"


def _data_with_inf(w):
    x = np.load(ROOT / "models" / "digits_test.npz")["input"][:4].copy()
    x[1, 0, 2, 2] = -np.inf
    np.savez(w / "d.npz", input=x)
    return w / "cnn.onnx", ["--data", "d.npz"], "contains 1 NaN/Inf values"


def _data_wrong_dtype_int_for_float(w):
    np.savez(w / "d.npz", input=np.zeros((2, 1, 16, 16), np.int64))
    return w / "cnn.onnx", ["--data", "d.npz"], "is float32 in the model but int64 in the data"


def _input_shape_wrong_rank(w):
    p = _write(w, _model([h.make_node("Relu", ["x"], ["y"])], [_x(("N", "L"))], [_y(("N", "L"))]))
    return p, ["--input-shape", "x=1x2x3"], "--input-shape for 'x' has 3 dims, the input has 2"


def _output_is_a_symlink_to_the_input(w):
    os.symlink(w / "cnn.onnx", w / "link.onnx")
    return w / "cnn.onnx", ["-o", "link.onnx"], "is the input model"


def _output_exists_read_only(w):
    (w / "o.onnx").write_bytes(b"keep me")
    (w / "o.onnx").chmod(0o444)
    return w / "cnn.onnx", ["-o", "o.onnx"], "exists and is read-only"


def _spec(text, fragment):
    def case(w):
        return w / "cnn.onnx", ["--passes", text], fragment
    case.__name__ = f"_spec_{text}"
    return case


RUN_CASES = {f.__name__.lstrip("_"): f for f in [
    _dynamic_axis_without_data, _data_with_inf, _data_wrong_dtype_int_for_float, _input_shape_wrong_rank,
    _output_is_a_symlink_to_the_input, _output_exists_read_only,
    _spec("fold(", "expected an option name"),
    _spec("fold,,fold", "expected a pass name"),
    _spec("fold{rounds=2}", "use parentheses for options"),
    _spec("fold(rounds)", "expected '=' after option 'rounds'"),
    _spec("fold(rounds=2", "expected ',' or ')' in the option list"),
    _spec("fold(rounds=2,rounds=3)", "is given twice"),
    _spec("fold(rounds=0)", "rounds must be >= 1"),
    _spec("fold(noops=maybe)", "must be true or false"),
    _spec("fold fold", "expected ',' between passes"),
]}


# -- checks ---------------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir() or p.is_symlink():
            out[str(p.relative_to(folder))] = "dir" if p.is_dir() else "link"
    return out


def _run(capsys, args) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code or 0, out, err


def _assert_refused(capsys, folder: Path, args: list, fragment: str) -> str:
    before = _snapshot(folder)
    code, out, err = _run(capsys, args)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and fragment in err, err
    assert lines[-1].startswith("hint: ") and len(lines[-1]) > 10, err
    assert all(ln.startswith("  ") for ln in lines[1:-1]), err  # one error line (+ a spec's caret lines)
    assert "Traceback" not in err + out
    assert _snapshot(folder) == before, "the folder changed: input modified or output written"
    return err


@pytest.fixture
def work(tmp_path, monkeypatch):
    shutil.copyfile(CNN, tmp_path / "cnn.onnx")
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for p in tmp_path.rglob("*"):  # undo read-only bits so pytest can clean up
        if not p.is_symlink():
            p.chmod(0o755)


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model_optimize(work, capsys, case):
    path, fragment = MODEL_CASES[case](work)
    err = _assert_refused(capsys, work, ["optimize", path, "-o", "out.onnx"], fragment)
    assert str(path.name) in err


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model_inspect_and_check(work, capsys, case):
    path, fragment = MODEL_CASES[case](work)
    _assert_refused(capsys, work, ["inspect", path], fragment)
    _assert_refused(capsys, work, ["check", path, "--target", "tensorrt"], fragment)


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model_api_raises_exit_2_error(work, case):
    path, fragment = MODEL_CASES[case](work)
    before = _snapshot(work)
    with pytest.raises(ShrinkError) as exc:
        onnxshrink.optimize(path, "fold")
    assert exc.value.exit_code == 2 and fragment in str(exc.value) and exc.value.hint
    assert _snapshot(work) == before


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_bad_run_input(work, capsys, case):
    path, extra, fragment = RUN_CASES[case](work)
    args = ["optimize", path, *extra] if "-o" in extra else ["optimize", path, "-o", "out.onnx", *extra]
    _assert_refused(capsys, work, args, fragment)
