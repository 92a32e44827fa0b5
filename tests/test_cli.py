"""The command line: every exit code, error rendering, reports, `passes` and `inspect`.

The CLI runs in-process through ``onnxshrink.cli.main`` (catching SystemExit); one test runs
``python -m onnxshrink.cli`` in a subprocess.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxshrink import registry
from onnxshrink.registry import ShrinkPass, option

from conftest import run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
CNN = MODELS / "digits_cnn.onnx"
X16 = np.load(MODELS / "digits_test.npz")["input"][:16]

REPORT_KEYS = {
    "schema", "tool", "version", "input", "output", "pipeline", "verdict", "seconds", "before", "after",
    "passes", "validation", "latency", "notes", "target",
}
FOLD_SPEC = "fold(constants=true,noops=true,fuse_bn=true,dedup=true,max_growth=0,rounds=4)"


# --------------------------------------------------------------------------------------------------
# Helpers and fixtures


def sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def run_ort(path, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A scratch folder (the cwd) holding a copy of digits_cnn.onnx as cnn.onnx."""
    shutil.copyfile(CNN, tmp_path / "cnn.onnx")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_bad_input(capsys, input_path: Path, args: list, fragment: str, *, outputs: list[Path] = ()):
    """Exit code 2, one clean `error: ...` on stderr, the input untouched and nothing written."""
    before = sha(input_path) if input_path.is_file() else None
    listing = sorted(os.listdir(input_path.parent)) if input_path.parent.is_dir() else None
    code, out, err = run_cli(capsys, *args)
    assert code == 2, (code, err)
    assert err.startswith("error: "), err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("hint: ") and len(lines[-1]) > len("hint: "), err  # every bad input gets a hint
    # one error line; only a spec error adds its text and a caret (indented) between error and hint
    assert all(ln.startswith("  ") for ln in lines[1:-1]), err
    assert "Traceback" not in err and "Traceback" not in out
    assert fragment in err, err
    if before is not None:
        assert sha(input_path) == before
    if listing is not None:
        assert sorted(os.listdir(input_path.parent)) == listing  # no output, no temp files
    for o in outputs:
        assert not Path(o).exists()
    return err


# Throwaway passes for exit codes 1 and 3


@dataclasses.dataclass(frozen=True)
class PerturbOptions:
    scale: float = option(1e-3, "relative change of the first big float weight")


class PerturbPass(ShrinkPass):
    """Scales one weight by (1 + scale): a small, deliberate numeric change."""

    def run(self, model: ir.Model) -> bool:
        for value in model.graph.initializers.values():
            t = value.const_value
            if t is not None and t.dtype == ir.DataType.FLOAT and t.size >= 100:
                value.const_value = ir.tensor(t.numpy() * np.float32(1 + self.options.scale), name=value.name)
                return True
        return False


@dataclasses.dataclass(frozen=True)
class NoOptions:
    pass


class BoomPass(ShrinkPass):
    def run(self, model: ir.Model) -> bool:
        raise RuntimeError("boom in the pass")


@pytest.fixture
def test_passes():
    registry.all_passes()
    registry.register("perturb", PerturbOptions, summary="test: perturb a weight")(PerturbPass)
    registry.register("boom", NoOptions, summary="test: raise")(BoomPass)
    yield
    registry.unregister("perturb")
    registry.unregister("boom")


# --------------------------------------------------------------------------------------------------
# Exit code 0


def test_optimize_ok_writes_output_and_json_report(work, capsys):
    before = sha(work / "cnn.onnx")
    code, out, err = run_cli(capsys, "optimize", "cnn.onnx", "-o", "out.onnx", "--report", "r.json")
    assert code == 0, err
    assert err == ""
    assert sha(work / "cnn.onnx") == before
    assert (work / "out.onnx").is_file()
    # the terminal report
    assert f"pipeline: {FOLD_SPEC}" in out.replace("\n", "")
    assert re.search(r"nodes\s*│\s*15\s*│\s*12", out)
    assert "validation: PASSED on 4 sample(s) from synthetic" in out
    assert "dynamic batch axis set to" in out
    assert out.rstrip().endswith("wrote out.onnx")
    # the JSON report
    rep = json.loads((work / "r.json").read_text())
    assert set(rep) == REPORT_KEYS
    assert rep["schema"] == 1 and rep["tool"] == "onnxshrink" and rep["version"] == "0.1.0"
    assert rep["input"] == "cnn.onnx" and rep["output"] == "out.onnx"
    assert rep["pipeline"] == FOLD_SPEC
    assert rep["verdict"] == "passed"
    assert rep["before"]["nodes"] == 15 and rep["after"]["nodes"] == 12
    assert rep["before"]["file_bytes"] == CNN.stat().st_size
    assert rep["after"]["file_bytes"] == (work / "out.onnx").stat().st_size
    assert rep["before"]["macs"] == rep["after"]["macs"] == 1_839_744
    assert [p["name"] for p in rep["passes"]] == ["fold"]
    assert rep["passes"][0]["counters"]["batchnorm_fused"] == 3
    assert rep["validation"]["status"] == "passed" and rep["validation"]["samples"] == 4
    assert rep["validation"]["outputs"][0]["name"] == "logits"
    assert isinstance(rep["seconds"], float) and isinstance(rep["notes"], list)
    # the output computes the same thing
    np.testing.assert_allclose(run_ort(work / "out.onnx", {"input": X16})[0],
                               run_ort(CNN, {"input": X16})[0], rtol=1e-5, atol=1e-5)
    assert sorted(os.listdir(work)) == ["cnn.onnx", "out.onnx", "r.json"]


def test_optimize_ok_markdown_report(work, capsys):
    code, out, err = run_cli(capsys, "optimize", "cnn.onnx", "-o", "out.onnx", "--report", "r.md", "-q")
    assert code == 0, err
    assert out == ""  # --quiet
    md = (work / "r.md").read_text()
    assert md.startswith("# onnxshrink report\n")
    assert "- input: `cnn.onnx`" in md and "- output: `out.onnx`" in md
    assert f"- pipeline: `{FOLD_SPEC}`" in md
    assert "- verdict: **passed**" in md
    assert "| nodes | 15 | 12 | 0.800x |" in md
    assert "## Passes" in md and "## Validation" in md
    assert re.search(r"\| logits \| [0-9.e+-]+ \| .* \| yes \|", md)


def test_optimize_default_output_name_and_data(work, capsys):
    shutil.copyfile(MODELS / "digits_calib.npz", work / "calib.npz")
    code, out, err = run_cli(capsys, "optimize", "cnn.onnx", "--data", "calib.npz", "--report", "r.json")
    assert code == 0, err
    assert (work / "cnn.small.onnx").is_file()
    rep = json.loads((work / "r.json").read_text())
    assert rep["output"] == "cnn.small.onnx"
    assert rep["validation"]["samples"] == 256 and rep["validation"]["source"] == "calib.npz"
    assert rep["validation"]["outputs"][0]["top1"] == 1.0


def test_optimize_no_validate(work, capsys):
    code, out, err = run_cli(capsys, "optimize", "cnn.onnx", "-o", "o.onnx", "--no-validate", "--report", "r.json")
    assert code == 0, err
    assert "validation: not run (--no-validate)" in out
    rep = json.loads((work / "r.json").read_text())
    assert rep["verdict"] == "not run" and rep["validation"] is None


def test_passes_lists_fold_with_options(capsys):
    code, out, err = run_cli(capsys, "passes")
    assert code == 0 and err == ""
    assert re.search(r"^fold — constant folding", out, re.M)
    for line in [
        "constants=true  evaluate nodes whose inputs are all constant",
        "noops=true  remove no-op nodes",
        "fuse_bn=true  fuse BatchNormalization",
        "dedup=true  merge initializers",
        "max_growth=0  bytes one folded node may add",
        "rounds=4  maximum rounds",
    ]:
        assert re.search(r"^\s+" + re.escape(line), out, re.M), line


def test_inspect_text(work, capsys):
    code, out, err = run_cli(capsys, "inspect", "cnn.onnx")
    assert code == 0, err
    for op, n in {"BatchNormalization": 3, "Conv": 3, "Relu": 4, "MaxPool": 2, "Gemm": 2, "Flatten": 1}.items():
        assert re.search(rf"│\s*{op}\s*│\s*{n}\s*│", out), op
    assert "nodes 15 params 47,850 weights 191,400 B file 194,908 B" in " ".join(out.split())
    assert "input  input: FLOAT ['batch', 1, 16, 16]" in out
    assert "pass fold:" in out


def test_inspect_json(work, capsys):
    code, out, err = run_cli(capsys, "inspect", "cnn.onnx", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert {"model", "opsets", "inputs", "outputs", "stats", "weight_bytes_by_consumer", "passes"} <= set(info)
    assert info["model"] == "cnn.onnx"
    assert info["opsets"] == {"": 17}
    assert info["inputs"] == [{"name": "input", "dtype": "FLOAT", "shape": ["batch", 1, 16, 16]}]
    assert info["outputs"][0]["name"] == "logits"
    st = info["stats"]
    assert st["nodes"] == 15 and st["params"] == 47_850 and st["weight_bytes"] == 191_400
    assert st["file_bytes"] == CNN.stat().st_size
    assert st["op_counts"]["BatchNormalization"] == 3
    assert sum(info["weight_bytes_by_consumer"].values()) == st["weight_bytes"]
    assert set(info["weight_bytes_by_consumer"]) == {"Conv", "BatchNormalization", "Gemm"}
    assert "fold" in info["passes"]


def test_help_exit_0(capsys):
    code, out, err = run_cli(capsys, "--help")
    assert code == 0
    assert "optimize" in out and "inspect" in out and "passes" in out
    code, out, err = run_cli(capsys, "optimize", "--help")
    assert code == 0
    assert "--passes" in out and "--validate-each" in out and "--force" in out


_CLICK_BUG = (
    "BUG: typer 0.29 vendors click as typer._click, but cli.main catches click.exceptions.*; usage "
    "errors from the parser fall into the generic handler: 'error: internal error: ...', exit 1"
)


def test_no_arguments_prints_help(capsys):
    code, out, err = run_cli(capsys)
    assert code == 0
    assert "optimize" in out + err and "inspect" in out + err
    assert "internal error" not in err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["optimize", "cnn.onnx", "--frobnicate"], "No such option: --frobnicate"),
        (["optimize"], "Missing"),
        (["frobnicate"], "No such command 'frobnicate'"),
    ],
    ids=["unknown-option", "missing-argument", "unknown-command"],
)
def test_click_usage_errors_exit_2(work, capsys, args, fragment):
    err = assert_bad_input(capsys, work / "cnn.onnx", args, fragment)
    assert "internal error" not in err
    assert "hint: see `onnxshrink --help`" in err


def test_module_entry_point_in_subprocess(tmp_path):
    shutil.copyfile(CNN, tmp_path / "cnn.onnx")
    r = subprocess.run(
        [sys.executable, "-m", "onnxshrink.cli", "optimize", "cnn.onnx", "-o", "o.onnx", "--report", "r.json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "wrote o.onnx" in r.stdout
    assert json.loads((tmp_path / "r.json").read_text())["verdict"] == "passed"
    (tmp_path / "bad.onnx").write_text("not a model")
    r = subprocess.run([sys.executable, "-m", "onnxshrink.cli", "inspect", "bad.onnx"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("error: bad.onnx is not an ONNX model")
    assert "Traceback" not in r.stderr


def test_inspect_reports_macs_in_a_fresh_process(tmp_path):
    shutil.copyfile(CNN, tmp_path / "cnn.onnx")
    r = subprocess.run([sys.executable, "-m", "onnxshrink.cli", "inspect", "cnn.onnx", "--json"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["macs"] == 1_839_744


# --------------------------------------------------------------------------------------------------
# Exit code 2: bad input, never a traceback, input untouched


def _case_text(w):
    (w / "m.onnx").write_text("hello, I am a text file\n")
    return w / "m.onnx", [], "is not an ONNX model"


def _case_empty(w):
    (w / "m.onnx").write_bytes(b"")
    return w / "m.onnx", [], "is empty (0 bytes)"


def _case_truncated(w):
    data = CNN.read_bytes()
    (w / "m.onnx").write_bytes(data[: len(data) // 2])
    return w / "m.onnx", [], "is not an ONNX model: protobuf parse failed"


def _case_missing(w):
    return w / "nope.onnx", [], "does not exist"


def _case_missing_external(w):
    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")],
    )
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(w / "m.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=True, location="m.onnx.data",
                    size_threshold=0)
    (w / "m.onnx.data").unlink()
    return w / "m.onnx", [], "external data file 'm.onnx.data' of"


def _case_invalid_graph(w):
    g = helper.make_graph(
        [helper.make_node("Relu", ["undefined_tensor"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(w / "m.onnx"))
    return w / "m.onnx", [], "is not a valid ONNX graph"


def _case_output_is_input(w):
    return w / "cnn.onnx", ["-o", "cnn.onnx"], "is the input model"


def _case_output_is_input_other_spelling(w):
    (w / "sub").mkdir()
    return w / "cnn.onnx", ["-o", str(w / "sub" / ".." / "cnn.onnx")], "is the input model"


def _case_output_folder_missing(w):
    return w / "cnn.onnx", ["-o", "nowhere/o.onnx"], "output folder nowhere does not exist"


def _npz(w, **arrays):
    np.savez(w / "d.npz", **arrays)
    return ["--data", "d.npz"]


def _case_data_wrong_name(w):
    return w / "cnn.onnx", _npz(w, images=X16), "missing input(s) 'input'; unknown name(s) 'images'"


def _case_data_wrong_shape(w):
    return w / "cnn.onnx", _npz(w, input=np.zeros((4, 1, 8, 8), np.float32)), "axis 2 is 16 in the model but 8"


def _case_data_wrong_rank(w):
    return w / "cnn.onnx", _npz(w, input=np.zeros((4, 16, 16), np.float32)), "has 3 axes"


def _case_data_wrong_dtype_kind(w):
    return (w / "cnn.onnx", _npz(w, input=np.full((2, 1, 16, 16), "a")),
            "input 'input' is float32 in the model but <U1 in the data")


def _case_data_nan(w):
    x = X16.copy()
    x[3, 0, 5, 5] = np.nan
    return w / "cnn.onnx", _npz(w, input=x), "contains 1 NaN/Inf values"


def _case_data_missing(w):
    return w / "cnn.onnx", ["--data", "nope.npz"], "data path nope.npz does not exist"


def _case_bad_input_shape(w):
    return w / "cnn.onnx", ["--input-shape", "input=1xax16x16"], "bad --input-shape 'input=1xax16x16'"


def _case_input_shape_unknown_name(w):
    return w / "cnn.onnx", ["--input-shape", "image=1x1x16x16"], "--input-shape names unknown input 'image'"


def _case_bad_tol_word(w):
    return w / "cnn.onnx", ["--tol", "abc"], "bad --tol 'abc'"


def _case_bad_tol_negative(w):
    return w / "cnn.onnx", ["--tol", "logits=-1"], "bad --tol 'logits=-1': must be a finite number >= 0"


def _case_bad_spec(w):
    return w / "cnn.onnx", ["--passes", "fold(fuse_bn=true"], "bad pass spec at column 18"


def _case_unknown_pass(w):
    return w / "cnn.onnx", ["--passes", "fold,fodl"], "unknown pass 'fodl'"


def _case_unknown_option(w):
    return w / "cnn.onnx", ["--passes", "fold(fuse_bm=true)"], "pass 'fold' has no option 'fuse_bm'"


def _case_bad_option_value(w):
    return w / "cnn.onnx", ["--passes", "fold(rounds=1.5)"], "must be an integer, not '1.5'"


def _case_bad_report_suffix(w):
    return w / "cnn.onnx", ["--report", "r.txt"], "--report r.txt: unknown format"


BAD_CASES = {f.__name__[len("_case_"):]: f for f in [
    _case_text, _case_empty, _case_truncated, _case_missing, _case_missing_external, _case_invalid_graph,
    _case_output_is_input, _case_output_is_input_other_spelling, _case_output_folder_missing,
    _case_data_wrong_name, _case_data_wrong_shape, _case_data_wrong_rank, _case_data_wrong_dtype_kind,
    _case_data_nan, _case_data_missing, _case_bad_input_shape, _case_input_shape_unknown_name,
    _case_bad_tol_word, _case_bad_tol_negative, _case_bad_spec, _case_unknown_pass, _case_unknown_option,
    _case_bad_option_value, _case_bad_report_suffix,
]}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_exit_2(work, capsys, case):
    model, extra, fragment = BAD_CASES[case](work)
    out = work / "o.onnx"
    args = ["optimize", model, *(extra if "-o" in extra else ["-o", out, *extra])]
    assert_bad_input(capsys, model, args, fragment, outputs=[out, work / "cnn.small.onnx"])


@pytest.mark.parametrize("case", ["text", "empty", "truncated", "missing", "missing_external", "invalid_graph"])
def test_inspect_bad_model_exit_2(work, capsys, case):
    model, _, fragment = BAD_CASES[case](work)
    assert_bad_input(capsys, model, ["inspect", model], fragment)


def test_hints_are_printed(work, capsys):
    err = assert_bad_input(capsys, work / "cnn.onnx", ["optimize", "cnn.onnx", "--passes", "fodl"], "unknown pass")
    assert err.splitlines() == ["error: unknown pass 'fodl'", "hint: did you mean 'fold'?"]
    err = assert_bad_input(capsys, work / "cnn.onnx", ["optimize", "cnn.onnx", "--passes", "fold,"], "column 6")
    assert err.splitlines()[:3] == ["error: bad pass spec at column 6: expected a pass name", "  fold,", "       ^"]
    np.savez(work / "d.npz", images=X16)
    err = assert_bad_input(capsys, work / "cnn.onnx", ["optimize", "cnn.onnx", "--data", "d.npz"], "missing")
    assert "hint: the model's inputs are 'input'" in err


def test_empty_passes_option_exit_2(work, capsys):
    assert_bad_input(capsys, work / "cnn.onnx", ["optimize", "cnn.onnx", "-o", "o.onnx", "--passes", ""],
                     "empty pass spec", outputs=[work / "o.onnx"])


def test_blank_passes_option_exit_2(work, capsys):
    assert_bad_input(capsys, work / "cnn.onnx", ["optimize", "cnn.onnx", "-o", "o.onnx", "--passes", "  "],
                     "bad pass spec at column 1: empty pass spec", outputs=[work / "o.onnx"])


def test_int_data_for_float_input_exit_2(work, capsys):
    np.savez(work / "d.npz", input=(X16 * 255).astype(np.uint8))
    assert_bad_input(capsys, work / "cnn.onnx", ["optimize", "cnn.onnx", "-o", "o.onnx", "--data", "d.npz"],
                     "is float32 in the model but uint8 in the data", outputs=[work / "o.onnx"])


def test_output_in_read_only_folder(work, capsys):
    ro = work / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        # refused by its mode bits even for root, whom os.access would let write
        assert_bad_input(capsys, work / "cnn.onnx", ["optimize", "cnn.onnx", "-o", ro / "o.onnx"],
                         f"output folder {ro} is not writable")
    finally:
        ro.chmod(0o755)


def test_output_in_unwritable_folder_emulated(work, capsys, monkeypatch):
    # emulates what os.access reports for a non-root user on a read-only folder (works as root too)
    ro = work / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **k: False if Path(p).resolve() == ro else real_access(p, m, **k))
    assert_bad_input(capsys, work / "cnn.onnx", ["optimize", "cnn.onnx", "-o", "ro/o.onnx"],
                     "output folder ro is not writable", outputs=[ro / "o.onnx"])


@pytest.mark.parametrize(
    "args, shown",
    [
        (["optimize", "cnn.onnx", "--passes", "fold[/b]"], "fold[/b]"),
        (["optimize", "cnn.onnx", "--passes", "a[b=1]"], "a[b=1]"),
        (["inspect", "missing[red].onnx"], "missing[red].onnx"),
    ],
    ids=["closing-tag-crash", "tag-eaten-from-spec", "tag-eaten-from-path"],
)
def test_error_text_is_printed_verbatim(work, capsys, args, shown):
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert err.startswith("error: ") and "Traceback" not in err
    assert shown in err


def test_report_render_with_bracket_path(work, capsys):
    d = work / "x[" / "b]"  # the path text is .../x[/b]/cnn.onnx
    d.mkdir(parents=True)
    shutil.copyfile(CNN, d / "cnn.onnx")
    try:
        code, out, err = run_cli(capsys, "optimize", "x[/b]/cnn.onnx", "-o", "x[/b]/o.onnx")
    except Exception as e:  # the MarkupError escapes main's own error handler
        pytest.fail(f"main raised {type(e).__name__}: {e}")
    assert code == 0, err
    assert "x[/b]/cnn.onnx" in out


def test_output_data_file_does_not_clobber_input_data(work, capsys):
    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b"),
         numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "w")],
    )
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(work / "in.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=True, location="out.onnx.data",
                    size_threshold=0)
    before = sha(work / "out.onnx.data")
    code, out, err = run_cli(capsys, "optimize", "in.onnx", "-o", "out.onnx")
    assert code in (0, 2), err
    assert sha(work / "out.onnx.data") == before


# --------------------------------------------------------------------------------------------------
# Exit code 3: validation failed


def test_validation_failure_tol_0_writes_nothing(work, capsys):
    # BatchNorm fusion changes float rounding (rel-L2 ~1e-7), which a zero tolerance refuses
    code, out, err = run_cli(capsys, "optimize", "cnn.onnx", "-o", "o.onnx", "--tol", "0", "--report", "r.json")
    assert code == 3
    lines = err.splitlines()
    assert re.fullmatch(r"error: validation failed: output 'logits' rel_l2 [0-9.e-]+ > tolerance 0", lines[0])
    assert lines[1] == "hint: nothing was written; loosen --tol, change the passes, or use --force"
    assert "Traceback" not in err
    assert not (work / "o.onnx").exists()
    assert "validation: FAILED" in out
    rep = json.loads((work / "r.json").read_text())
    assert rep["verdict"] == "failed" and rep["output"] is None
    assert sorted(os.listdir(work)) == ["cnn.onnx", "r.json"]


def test_validation_failure_with_force_writes_and_exits_3(work, capsys):
    code, out, err = run_cli(capsys, "optimize", "cnn.onnx", "-o", "o.onnx", "--tol", "0", "--force")
    assert code == 3
    assert err.splitlines()[1] == "hint: written anyway to o.onnx because of --force"
    assert (work / "o.onnx").is_file()
    onnx.checker.check_model(str(work / "o.onnx"))


def test_per_output_tol_passes(work, capsys):
    code, out, err = run_cli(capsys, "optimize", "cnn.onnx", "-o", "o.onnx", "--tol", "0", "--tol", "logits=1e-4")
    assert code == 0, err


def test_perturbing_pass_fails_validation(work, capsys, test_passes):
    code, out, err = run_cli(capsys, "optimize", "cnn.onnx", "-o", "o.onnx", "--passes", "perturb")
    assert code == 3
    assert err.startswith("error: validation failed: output 'logits' rel_l2 ")
    assert "> tolerance 1e-05" in err
    assert not (work / "o.onnx").exists()
    code, out, err = run_cli(capsys, "optimize", "cnn.onnx", "-o", "o.onnx", "--passes", "perturb", "--force")
    assert code == 3
    assert (work / "o.onnx").is_file()
    # and a tolerance that covers the change passes
    code, out, err = run_cli(capsys, "optimize", "cnn.onnx", "-o", "o2.onnx", "--passes", "perturb(scale=1e-3)",
                             "--tol", "1e-2")
    assert code == 0, err


def test_validate_each_names_the_failing_pass(work, capsys, test_passes):
    code, out, err = run_cli(capsys, "optimize", "cnn.onnx", "-o", "o.onnx", "--passes", "fold,perturb,fold",
                             "--validate-each")
    assert code == 3
    first = err.splitlines()[0]
    assert first.startswith("error: validation failed after pass 'perturb': output 'logits' rel_l2 ")
    assert "hint: this pass broke the outputs" in err
    assert "Traceback" not in err
    assert not (work / "o.onnx").exists()
    assert sorted(os.listdir(work)) == ["cnn.onnx"]
    code, out, err = run_cli(capsys, "optimize", "cnn.onnx", "-o", "o.onnx", "--validate-each", "--tol", "0")
    assert code == 3
    assert err.startswith("error: validation failed after pass 'fold': ")


# --------------------------------------------------------------------------------------------------
# Exit code 1: a pass failed


def test_failing_pass_exit_1(work, capsys, test_passes):
    code, out, err = run_cli(capsys, "optimize", "cnn.onnx", "-o", "o.onnx", "--passes", "fold,boom")
    assert code == 1
    assert err.splitlines()[0] == "error: pass 'boom' failed: RuntimeError: boom in the pass"
    assert "hint: rerun with --debug" in err
    assert "Traceback" not in err
    assert not (work / "o.onnx").exists()
    code, out, err = run_cli(capsys, "optimize", "cnn.onnx", "-o", "o.onnx", "--passes", "boom", "--debug")
    assert code == 1
    assert "Traceback" in err and "RuntimeError: boom in the pass" in err
