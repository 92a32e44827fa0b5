"""onnxshrink.validate: metrics against hand-computed numpy values, tolerances, failure and skip paths."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.calib import Dataset
from onnxshrink.errors import UsageError
from onnxshrink.validate import Tolerances, ValidationResult, compare_models, parse_tolerances

# Rows chosen so that scaling column 0 by 1.2 flips the argmax of row 2 only: top-1 agreement 3/4.
X = np.array(
    [[1, 2, 3, 4, 5], [5, 4, 3, 2, 1], [4, 0, 0, 0, 4.5], [0, 0, 0, 0, 1]],
    dtype=np.float32,
)
W_REF = np.ones(5, np.float32)
W_CAND = np.array([1.2, 1, 1, 1, 1], np.float32)


def _mul_model(path, w: np.ndarray, v: np.ndarray | None = None, batch="N"):
    """y = x * w (and z = x * v if v is given); x float[batch, 5]."""
    nodes = [helper.make_node("Mul", ["x", "w"], ["y"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])]
    inits = [numpy_helper.from_array(w, "w")]
    if v is not None:
        nodes.append(helper.make_node("Mul", ["x", "v"], ["z"]))
        outs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [batch, 5]))
        inits.append(numpy_helper.from_array(v, "v"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 5])], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def _data(x: np.ndarray, name="x") -> Dataset:
    """One sample per row, each a [1, ...] feed."""
    return Dataset([lambda: {name: x[:, None]}], len(x), "test-data")


def _expected(ref: np.ndarray, cand: np.ndarray) -> dict:
    r, c = ref.astype(np.float64), cand.astype(np.float64)
    d = c - r
    return {
        "rel_l2": np.linalg.norm(d) / np.linalg.norm(r),
        "max_abs": np.abs(d).max(),
        "mean_abs": np.abs(d).mean(),
        "cosine": (r * c).sum() / (np.linalg.norm(r) * np.linalg.norm(c)),
        "snr_db": 10 * np.log10((r * r).sum() / (d * d).sum()),
        "top1": float(np.mean(r.argmax(-1) == c.argmax(-1))),
    }


@pytest.mark.parametrize("batch", [True, False])
def test_metrics_match_numpy(tmp_path, batch):
    ref = _mul_model(tmp_path / "ref.onnx", W_REF)
    cand = _mul_model(tmp_path / "cand.onnx", W_CAND)
    res = compare_models(ref, cand, _data(X), Tolerances(1e-3), batch=batch)
    exp = _expected(X * W_REF, X * W_CAND)
    assert res.status == "failed"
    assert res.samples == 4
    assert res.source == "test-data"
    (o,) = res.outputs
    assert o.name == "y" and o.kind == "float" and o.tolerance == 1e-3 and not o.passed
    assert o.rel_l2 == pytest.approx(exp["rel_l2"], rel=1e-6)
    assert o.max_abs == pytest.approx(exp["max_abs"], rel=1e-6)
    assert o.mean_abs == pytest.approx(exp["mean_abs"], rel=1e-6)
    assert o.cosine == pytest.approx(exp["cosine"], rel=1e-9)
    assert o.snr_db == pytest.approx(exp["snr_db"], rel=1e-6)
    assert o.top1 == exp["top1"] == 0.75
    # the hand-derived figures: the only differences are 0.2 * X[:, 0]
    assert o.max_abs == pytest.approx(0.2 * 5, rel=1e-6)
    assert o.rel_l2 == pytest.approx(0.2 * math.sqrt(1 + 25 + 16) / math.sqrt(55 + 55 + 36.25 + 1), rel=1e-6)
    assert res.reason == f"output 'y' rel_l2 {o.rel_l2:.3g} > tolerance 0.001"


def test_tolerance_is_inclusive_gate_on_rel_l2(tmp_path):
    ref = _mul_model(tmp_path / "ref.onnx", W_REF)
    cand = _mul_model(tmp_path / "cand.onnx", W_CAND)
    rel = _expected(X * W_REF, X * W_CAND)["rel_l2"]
    assert compare_models(ref, cand, _data(X), Tolerances(rel * 1.01)).status == "passed"
    assert compare_models(ref, cand, _data(X), Tolerances(rel * 0.99)).status == "failed"


def test_identical_models_pass(tmp_path):
    ref = _mul_model(tmp_path / "ref.onnx", W_CAND)
    cand = _mul_model(tmp_path / "cand.onnx", W_CAND)
    res = compare_models(ref, cand, _data(X), Tolerances(0.0))
    assert res.status == "passed" and res.passed and res.reason == ""
    (o,) = res.outputs
    assert o.rel_l2 == 0.0 and o.max_abs == 0.0 and o.mean_abs == 0.0
    assert o.cosine == pytest.approx(1.0, abs=1e-12)
    assert o.snr_db is None
    assert o.top1 == 1.0
    d = res.to_dict()
    assert d["status"] == "passed" and d["samples"] == 4 and d["outputs"][0]["rel_l2"] == 0.0


def test_per_output_tolerance(tmp_path):
    v_ref = np.full(5, 2.0, np.float32)
    v_cand = np.array([2.0, 2.0, 2.0, 2.0, 2.02], np.float32)  # z off by 1 %  on column 4
    ref = _mul_model(tmp_path / "ref.onnx", W_REF, v_ref)
    cand = _mul_model(tmp_path / "cand.onnx", np.array([1, 1, 1, 1, 1.001], np.float32), v_cand)
    exp_y = _expected(X * W_REF, X * np.array([1, 1, 1, 1, 1.001], np.float32))["rel_l2"]
    exp_z = _expected(X * v_ref, X * v_cand)["rel_l2"]
    assert exp_y < 1e-3 < exp_z < 1e-2

    res = compare_models(ref, cand, _data(X), Tolerances(1e-3))
    assert [(o.name, o.passed) for o in res.outputs] == [("y", True), ("z", False)]
    assert res.status == "failed" and res.reason.startswith("output 'z' rel_l2")
    assert res.worst().name == "z"

    tol = Tolerances(1e-3, per_output={"z": 1e-2})
    res = compare_models(ref, cand, _data(X), tol)
    assert res.status == "passed"
    assert {o.name: o.tolerance for o in res.outputs} == {"y": 1e-3, "z": 1e-2}
    assert res.outputs[1].rel_l2 == pytest.approx(exp_z, rel=1e-6)

    tol = Tolerances(1e-3, per_output={"y": 1e-5})
    res = compare_models(ref, cand, _data(X), tol)
    assert [(o.name, o.passed) for o in res.outputs] == [("y", False), ("z", False)]


def _int_model(path, c: list[int]):
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["N", 4])],
        [numpy_helper.from_array(np.array(c, np.int64), "c")],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_integer_outputs_use_exact_mismatch_fraction(tmp_path):
    ref = _int_model(tmp_path / "ref.onnx", [1, 2, 3, 4])
    cand = _int_model(tmp_path / "cand.onnx", [1, 2, 3, 5])  # one of four columns differs
    xi = np.arange(12, dtype=np.int64).reshape(3, 4)
    res = compare_models(ref, cand, _data(xi), Tolerances(0.3))
    (o,) = res.outputs
    assert o.kind == "exact" and o.mismatch == 0.25 and o.passed and res.status == "passed"
    assert math.isnan(o.max_abs)
    res = compare_models(ref, cand, _data(xi), Tolerances(0.2))
    assert res.status == "failed"
    assert res.reason == "output 'y' mismatch 0.25 > tolerance 0.2"
    # an int difference of 1 on values ~10 would be a tiny rel_l2 but is not gated that way
    same = compare_models(ref, _int_model(tmp_path / "same.onnx", [1, 2, 3, 4]), _data(xi), Tolerances(0.0))
    assert same.status == "passed" and same.outputs[0].mismatch == 0.0 and same.outputs[0].max_abs == 0.0


def test_nan_in_one_model_only_fails(tmp_path):
    ref = _mul_model(tmp_path / "ref.onnx", W_REF)
    w_nan = W_REF.copy()
    w_nan[2] = np.nan
    cand = _mul_model(tmp_path / "cand.onnx", w_nan)
    res = compare_models(ref, cand, _data(X), Tolerances(1.0))  # even a huge tolerance
    (o,) = res.outputs
    assert res.status == "failed" and not o.passed
    assert o.rel_l2 == math.inf
    assert o.note.endswith(" elements are NaN/Inf in only one model")
    assert o.to_dict()["rel_l2"] == "inf"
    assert res.reason == "output 'y' rel_l2 inf > tolerance 1"


def test_inf_in_one_model_only_is_counted_once(tmp_path):
    ref = _mul_model(tmp_path / "ref.onnx", W_REF)
    w_inf = W_REF.copy()
    w_inf[2] = np.inf
    cand = _mul_model(tmp_path / "cand.onnx", w_inf)
    res = compare_models(ref, cand, _data(X + 1), Tolerances(1.0))
    # (X + 1)[:, 2] > 0: four elements are +inf in the candidate only
    assert res.status == "failed"
    assert res.outputs[0].note == "4 elements are NaN/Inf in only one model"


def test_nan_in_one_model_only_count_in_note(tmp_path):
    ref = _mul_model(tmp_path / "ref.onnx", W_REF)
    w_nan = W_REF.copy()
    w_nan[2] = np.nan
    cand = _mul_model(tmp_path / "cand.onnx", w_nan)
    res = compare_models(ref, cand, _data(X), Tolerances(1.0))
    assert res.outputs[0].note == "4 elements are NaN/Inf in only one model"


def test_nan_in_both_models_at_same_place_is_equal(tmp_path):
    w_nan = W_REF.copy()
    w_nan[2] = np.nan
    ref = _mul_model(tmp_path / "ref.onnx", w_nan)
    cand = _mul_model(tmp_path / "cand.onnx", w_nan)
    res = compare_models(ref, cand, _data(X), Tolerances(0.0))
    assert res.status == "passed"
    assert res.outputs[0].rel_l2 == 0.0


def test_candidate_that_does_not_load_fails(tmp_path):
    ref = _mul_model(tmp_path / "ref.onnx", W_REF)
    bad = tmp_path / "cand.onnx"
    bad.write_bytes(b"not an onnx model at all")
    res = compare_models(ref, bad, _data(X), Tolerances(1e-3))
    assert res.status == "failed" and not res.passed
    assert res.reason.startswith("onnxruntime cannot load the optimized model: ")
    assert res.outputs == []


def test_candidate_missing_an_output_fails(tmp_path):
    ref = _mul_model(tmp_path / "ref.onnx", W_REF, np.ones(5, np.float32))
    cand = _mul_model(tmp_path / "cand.onnx", W_REF)
    res = compare_models(ref, cand, _data(X), Tolerances(1e-3))
    assert res.status == "failed"
    assert res.reason == "optimized model lacks output(s) z"


def test_reference_that_onnxruntime_cannot_load_is_skipped(tmp_path):
    g = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example.custom")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
    )
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example.custom", 1)]
    )
    ref = tmp_path / "ref.onnx"
    onnx.save(m, str(ref))
    cand = _mul_model(tmp_path / "cand.onnx", W_REF)
    res = compare_models(ref, cand, _data(X), Tolerances(1e-3))
    assert res.status == "skipped"
    assert res.passed  # skipped is not a failure
    assert res.reason.startswith("onnxruntime cannot load the original model: ")
    assert len(res.reason) > len("onnxruntime cannot load the original model: ")


def test_candidate_with_other_output_shape_fails(tmp_path):
    ref = _mul_model(tmp_path / "ref.onnx", W_REF)
    g = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    cand = tmp_path / "cand.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(cand))
    res = compare_models(ref, cand, _data(X), Tolerances(1e-3), batch=False)
    assert res.status == "failed"
    assert res.reason == "output 'y' has shape [], the original [1, 5]"


def test_static_batch_models_are_fed_sample_by_sample(tmp_path):
    ref = _mul_model(tmp_path / "ref.onnx", W_REF, batch=1)
    cand = _mul_model(tmp_path / "cand.onnx", W_CAND, batch=1)
    res = compare_models(ref, cand, _data(X), Tolerances(1e-3))
    assert res.samples == 4
    assert res.outputs[0].top1 == 0.75
    assert res.outputs[0].rel_l2 == pytest.approx(_expected(X * W_REF, X * W_CAND)["rel_l2"], rel=1e-6)


def test_limit(tmp_path):
    ref = _mul_model(tmp_path / "ref.onnx", W_REF)
    cand = _mul_model(tmp_path / "cand.onnx", W_CAND)
    res = compare_models(ref, cand, _data(X), Tolerances(1e-3), limit=2)
    assert res.samples == 2
    assert res.outputs[0].top1 == 1.0  # rows 0 and 1 agree


def test_sample_count_same_batched_or_not(tmp_path):
    ref = _mul_model(tmp_path / "ref.onnx", W_REF)
    cand = _mul_model(tmp_path / "cand.onnx", W_CAND)
    ds = Dataset([lambda: {"x": X.reshape(2, 2, 5)}], 2, "pairs")  # 2 samples, each a batch of 2 rows
    batched = compare_models(ref, cand, ds, Tolerances(1e-3), batch=True)
    unbatched = compare_models(ref, cand, ds, Tolerances(1e-3), batch=False)
    assert batched.outputs[0].rel_l2 == pytest.approx(unbatched.outputs[0].rel_l2, rel=1e-9)
    assert unbatched.samples == ds.num_samples == 2
    assert batched.samples == ds.num_samples == 2


def test_validation_result_passed_property():
    assert ValidationResult("passed").passed
    assert ValidationResult("skipped").passed
    assert not ValidationResult("failed").passed
    assert ValidationResult("passed").worst() is None


# --------------------------------------------------------------------------------------------------
# parse_tolerances


def test_parse_tolerances():
    t = parse_tolerances(["1e-3"], 1e-5)
    assert t.default == 1e-3 and t.per_output == {}
    t = parse_tolerances(["out=1e-2"], 1e-5)
    assert t.default == 1e-5 and t.per_output == {"out": 1e-2}
    assert t.for_output("out") == 1e-2 and t.for_output("other") == 1e-5
    t = parse_tolerances(["2e-4", "logits=0", "a.b:0=0.5"], 1e-5)
    assert t.default == 2e-4 and t.per_output == {"logits": 0.0, "a.b:0": 0.5}
    t = parse_tolerances(None, 0.25)
    assert t.default == 0.25 and t.per_output == {}


@pytest.mark.parametrize("item", ["-1", "abc", "out=-1e-3", "out=", "nan", "inf", "x=nan", ""])
def test_parse_tolerances_rejects(item):
    with pytest.raises(UsageError) as exc:
        parse_tolerances([item], 1e-5)
    assert exc.value.exit_code == 2
    assert exc.value.message.startswith(f"bad --tol {item!r}")


@pytest.mark.parametrize("batch", [True, False])
def test_worst_slice_finds_a_damaged_small_column(tmp_path, batch):
    """A detector-like output: four large 'pixel' columns and one small 'score' column. Scaling the score
    column by 1.5 moves the whole tensor's rel_l2 by ~0.3% (passes), but that column is 50% off: it is
    reported (index, value) and named in a note, without failing the gate."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(100, 200, (16, 4)), rng.uniform(0, 1, (16, 1))], 1).astype(np.float32)
    ref = _mul_model(tmp_path / "ref.onnx", np.ones(5, np.float32))
    cand = _mul_model(tmp_path / "cand.onnx", np.array([1, 1, 1, 1, 1.5], np.float32))
    res = compare_models(str(ref), str(cand), _data(x), Tolerances(0.05), batch=batch)
    m = res.outputs[0]
    assert res.status == "passed" and m.rel_l2 < 0.01
    assert m.worst_slice == "axis 1 index 4"
    assert m.worst_slice_rel_l2 == pytest.approx(0.5, rel=1e-6)
    assert len(res.notes) == 1 and "axis 1 index 4" in res.notes[0] and "0.5" in res.notes[0]
    # an even error (every column 1% off) is no finding
    even = _mul_model(tmp_path / "even.onnx", np.full(5, 1.01, np.float32))
    res = compare_models(str(ref), str(even), _data(x), Tolerances(0.05), batch=batch)
    assert res.notes == [] and res.outputs[0].worst_slice_rel_l2 == pytest.approx(0.01, rel=1e-4)


class _FakeSession:
    """Counts runs into a shared log (its name per run); each run takes ``seconds``."""

    def __init__(self, name: str, log: list[str], seconds: float = 0.0) -> None:
        self.name, self.log, self.seconds = name, log, seconds

    def run(self, _outputs, _feed):
        import time

        self.log.append(self.name)
        if self.seconds:
            time.sleep(self.seconds)


def test_interleaved_times_warms_up_then_alternates():
    from onnxshrink.validate import interleaved_times

    log: list[str] = []
    times = interleaved_times([_FakeSession("a", log), _FakeSession("b", log)], {}, 3, warmup=2, per_round=2)
    assert log == ["a", "a", "b", "b"] + ["a", "a", "b", "b"] * 3
    assert [len(t) for t in times] == [6, 6] and all(t >= 0 for ts in times for t in ts)


def test_best_of_rounds_keeps_the_fastest_per_run_time():
    from onnxshrink.validate import best_of_rounds

    log: list[str] = []
    slow, fast = _FakeSession("s", log, 0.004), _FakeSession("f", log, 0.001)
    best = best_of_rounds([slow, fast], {}, 2, min_seconds=0.0, max_runs=3, warmup=1)
    # min_seconds 0: every round stops after its first run; warm-up once each, then 2 interleaved rounds
    assert log == ["s", "f", "s", "f", "s", "f"]
    assert 0.004 <= best[0] < 0.05 and 0.001 <= best[1] < best[0]
    log.clear()
    best_of_rounds([fast], {}, 1, min_seconds=10.0, max_runs=3, warmup=0)
    assert log == ["f"] * 3  # max_runs ends a round that min_seconds would keep going
