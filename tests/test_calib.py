"""Data readers of onnxshrink.calib: .npz / folders / .npy, shape and dtype checks, synthetic inputs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxshrink.calib import Dataset, InputSpec, input_specs, load_data, parse_input_shapes, synthetic_data
from onnxshrink.errors import DataError, UsageError


def _model(*inputs: str) -> ir.Model:
    """A model with the given inputs (``"float[N,3,4] x"`` each); its outputs are Identity of each."""
    sig = ", ".join(inputs)
    names = [i.rsplit(" ", 1)[1] for i in inputs]
    outs = ", ".join(f"{i.split('[')[0].split(' ')[0]} y_{n}" for i, n in zip(inputs, names))
    body = "\n".join(f"y_{n} = Identity({n})" for n in names)
    return ir.from_onnx_text(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g ({sig}) => ({outs}) {{
            {body}
        }}
        """
    )


@pytest.fixture
def dyn_specs():
    return input_specs(_model("float[N,3,4] x"))


@pytest.fixture
def static_specs():
    return input_specs(_model("float[2,3,4] x"))


@pytest.fixture
def two_specs():
    return input_specs(_model("float[N,3] x", "int64[N,5] ids"))


def _all(ds: Dataset) -> list[dict[str, np.ndarray]]:
    return list(ds.samples())


def test_input_specs(two_specs):
    assert two_specs == [
        InputSpec("x", np.dtype(np.float32), (None, 3)),
        InputSpec("ids", np.dtype(np.int64), (None, 5)),
    ]
    assert two_specs[0].rank == 2


def test_input_specs_skip_initializers():
    m = ir.from_onnx_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x, float[2] w) => (float[2] y) <float[2] w = {1.0, 2.0}> {
            y = Add(x, w)
        }
        """
    )
    assert [s.name for s in input_specs(m)] == ["x"]


# --------------------------------------------------------------------------------------------------
# Reading


def test_npz_stack_of_samples(tmp_path, dyn_specs):
    arr = np.arange(5 * 2 * 3 * 4, dtype=np.float32).reshape(5, 2, 3, 4)
    np.savez(tmp_path / "d.npz", x=arr)
    ds = load_data(tmp_path / "d.npz", dyn_specs)
    assert ds.num_samples == 5
    assert ds.source == str(tmp_path / "d.npz")
    samples = _all(ds)
    assert len(samples) == 5
    for i, s in enumerate(samples):
        assert list(s) == ["x"]
        assert s["x"].shape == (2, 3, 4)
        np.testing.assert_array_equal(s["x"], arr[i])


def test_npz_input_rank_batch_with_dynamic_batch_is_split(tmp_path, dyn_specs):
    arr = np.random.default_rng(0).standard_normal((6, 3, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=arr)
    ds = load_data(tmp_path / "d.npz", dyn_specs)
    assert ds.num_samples == 6
    samples = _all(ds)
    assert [s["x"].shape for s in samples] == [(1, 3, 4)] * 6
    np.testing.assert_array_equal(np.concatenate([s["x"] for s in samples]), arr)


def test_npz_input_rank_batch_with_static_batch_is_one_sample(tmp_path, static_specs):
    arr = np.ones((2, 3, 4), np.float32)
    np.savez(tmp_path / "d.npz", x=arr)
    ds = load_data(tmp_path / "d.npz", static_specs)
    assert ds.num_samples == 1
    (s,) = _all(ds)
    assert s["x"].shape == (2, 3, 4)


def test_npz_stack_with_static_batch(tmp_path, static_specs):
    np.savez(tmp_path / "d.npz", x=np.ones((3, 2, 3, 4), np.float32))
    assert load_data(tmp_path / "d.npz", static_specs).num_samples == 3


def test_folder_of_npz_chunks(tmp_path, two_specs):
    rng = np.random.default_rng(1)
    xa, xb = rng.standard_normal((3, 3)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)
    ia, ib = rng.integers(0, 9, (3, 5)), rng.integers(0, 9, (4, 5))
    np.savez(tmp_path / "b.npz", x=xb, ids=ib)
    np.savez(tmp_path / "a.npz", x=xa, ids=ia)
    ds = load_data(tmp_path, two_specs)
    assert ds.num_samples == 7
    samples = _all(ds)
    # files are read in sorted order: a.npz first
    np.testing.assert_array_equal(np.concatenate([s["x"] for s in samples]), np.concatenate([xa, xb]))
    np.testing.assert_array_equal(np.concatenate([s["ids"] for s in samples]), np.concatenate([ia, ib]))
    assert all(s["ids"].dtype == np.int64 for s in samples)


def test_folder_of_input_named_npy(tmp_path, two_specs):
    x = np.zeros((4, 3), np.float32)
    ids = np.arange(20, dtype=np.int64).reshape(4, 5)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "ids.npy", ids)
    ds = load_data(tmp_path, two_specs)
    assert ds.num_samples == 4
    samples = _all(ds)
    np.testing.assert_array_equal(samples[2]["ids"], ids[2:3])
    assert samples[0]["x"].shape == (1, 3)


def test_single_input_folder_of_arbitrary_npy(tmp_path, dyn_specs):
    a = np.full((2, 3, 4), 1.0, np.float32)
    b = np.full((3, 1, 3, 4), 2.0, np.float32)
    np.save(tmp_path / "first.npy", a)
    np.save(tmp_path / "second.npy", b)
    ds = load_data(tmp_path, dyn_specs)
    assert ds.num_samples == 5
    vals = [float(s["x"].mean()) for s in _all(ds)]
    assert vals == [1.0, 1.0, 2.0, 2.0, 2.0]


def test_single_npy_file_for_one_input(tmp_path, dyn_specs):
    np.save(tmp_path / "anything.npy", np.ones((3, 3, 4), np.float32))
    assert load_data(tmp_path / "anything.npy", dyn_specs).num_samples == 3


def test_float64_is_accepted_as_float32(tmp_path, dyn_specs):
    arr = np.linspace(0, 1, 2 * 3 * 4).reshape(2, 3, 4)  # float64
    np.savez(tmp_path / "d.npz", x=arr)
    samples = _all(load_data(tmp_path / "d.npz", dyn_specs))
    assert all(s["x"].dtype == np.float32 for s in samples)
    np.testing.assert_allclose(samples[1]["x"][0], arr[1].astype(np.float32))


def test_int32_accepted_for_int64(tmp_path, two_specs):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3), np.float32), ids=np.ones((2, 5), np.int32))
    samples = _all(load_data(tmp_path / "d.npz", two_specs))
    assert samples[0]["ids"].dtype == np.int64


# --------------------------------------------------------------------------------------------------
# Errors


def test_missing_name_lists_model_inputs(tmp_path, two_specs):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3), np.float32))
    with pytest.raises(DataError) as exc:
        load_data(tmp_path / "d.npz", two_specs)
    e = exc.value
    assert e.exit_code == 2
    assert e.message == f"{tmp_path / 'd.npz'}: missing input(s) 'ids'"
    assert e.hint == "the model's inputs are 'x', 'ids'; save one array per input name"


def test_extra_name_lists_model_inputs(tmp_path, dyn_specs):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3, 4), np.float32), z=np.zeros(3))
    with pytest.raises(DataError) as exc:
        load_data(tmp_path / "d.npz", dyn_specs)
    assert exc.value.message.endswith(": unknown name(s) 'z'")
    assert "the model's inputs are 'x'" in exc.value.hint


def test_wrong_name_reports_both(tmp_path, dyn_specs):
    np.savez(tmp_path / "d.npz", inp=np.zeros((2, 3, 4), np.float32))
    with pytest.raises(DataError) as exc:
        load_data(tmp_path / "d.npz", dyn_specs)
    assert exc.value.message.endswith(": missing input(s) 'x'; unknown name(s) 'inp'")


def test_rank_mismatch(tmp_path, dyn_specs):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 4), np.float32))
    with pytest.raises(DataError) as exc:
        load_data(tmp_path / "d.npz", dyn_specs)
    e = exc.value
    assert "array for input 'x' has 2 axes [3, 4], the input has 3 [None, 3, 4]" in e.message
    assert e.tensor == "x"
    assert e.exit_code == 2


def test_static_dim_mismatch(tmp_path, dyn_specs):
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 1, 3, 5), np.float32))
    with pytest.raises(DataError) as exc:
        load_data(tmp_path / "d.npz", dyn_specs)
    assert "input 'x' axis 2 is 4 in the model but 5 in the data (data shape [5, 1, 3, 5])" in exc.value.message
    assert "NCHW" in exc.value.hint


def test_static_batch_mismatch(tmp_path, static_specs):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 3, 4), np.float32))
    with pytest.raises(DataError, match="axis 0 is 2 in the model but 3 in the data"):
        load_data(tmp_path / "d.npz", static_specs)


def test_dtype_kind_mismatch_float_for_int(tmp_path, two_specs):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3), np.float32), ids=np.zeros((2, 5), np.float32))
    with pytest.raises(DataError) as exc:
        load_data(tmp_path / "d.npz", two_specs)
    assert "input 'ids' is int64 in the model but float32 in the data" in exc.value.message
    assert exc.value.hint == "save the array as int64"


def test_dtype_kind_mismatch_bool_for_int(tmp_path, two_specs):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3), np.float32), ids=np.zeros((2, 5), bool))
    with pytest.raises(DataError, match="input 'ids' is int64 in the model but bool in the data"):
        load_data(tmp_path / "d.npz", two_specs)


def test_dtype_kind_mismatch_int_for_float(tmp_path, dyn_specs):
    np.savez(tmp_path / "d.npz", x=np.full((2, 3, 4), 200, np.uint8))
    with pytest.raises(DataError, match="input 'x' is float32 in the model but uint8 in the data"):
        load_data(tmp_path / "d.npz", dyn_specs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_refused(tmp_path, dyn_specs, bad):
    arr = np.zeros((2, 3, 4), np.float32)
    arr[1, 2, 3] = bad
    arr[0, 0, 0] = bad
    np.savez(tmp_path / "d.npz", x=arr)
    with pytest.raises(DataError) as exc:
        load_data(tmp_path / "d.npz", dyn_specs)
    assert "input 'x' contains 2 NaN/Inf values" in exc.value.message
    assert exc.value.exit_code == 2


def test_nan_in_float64_refused_after_cast(tmp_path, dyn_specs):
    arr = np.zeros((2, 3, 4))
    arr[0, 1, 1] = np.nan
    np.savez(tmp_path / "d.npz", x=arr)
    with pytest.raises(DataError, match="contains 1 NaN/Inf values"):
        load_data(tmp_path / "d.npz", dyn_specs)


def test_nan_in_a_later_chunk_is_found_at_load(tmp_path, dyn_specs):
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 3, 4), np.float32))
    bad = np.zeros((2, 3, 4), np.float32)
    bad[1, 0, 0] = np.nan
    np.savez(tmp_path / "b.npz", x=bad)
    with pytest.raises(DataError) as exc:
        load_data(tmp_path, dyn_specs)
    assert exc.value.message.startswith(str(tmp_path / "b.npz"))


def test_different_sample_counts(tmp_path, two_specs):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3), np.float32), ids=np.zeros((3, 5), np.int64))
    with pytest.raises(DataError, match=r"inputs have different sample counts \[2, 3\]"):
        load_data(tmp_path / "d.npz", two_specs)


def test_missing_path(tmp_path, dyn_specs):
    with pytest.raises(DataError) as exc:
        load_data(tmp_path / "nope.npz", dyn_specs)
    assert exc.value.message == f"data path {tmp_path / 'nope.npz'} does not exist"


def test_not_npz_file(tmp_path, dyn_specs):
    (tmp_path / "d.txt").write_text("1,2,3\n")
    with pytest.raises(DataError, match="is not .npz"):
        load_data(tmp_path / "d.txt", dyn_specs)


def test_corrupt_npz(tmp_path, dyn_specs):
    (tmp_path / "d.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DataError) as exc:
        load_data(tmp_path / "d.npz", dyn_specs)
    assert exc.value.message.startswith(f"cannot read {tmp_path / 'd.npz'}")
    assert exc.value.exit_code == 2


def test_pickled_object_array_refused(tmp_path, dyn_specs):
    np.save(tmp_path / "d.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="cannot read"):
        load_data(tmp_path / "d.npy", dyn_specs)


def test_folder_without_usable_files(tmp_path, two_specs):
    (tmp_path / "readme.txt").write_text("hi")
    np.save(tmp_path / "other.npy", np.zeros((2, 3), np.float32))  # not named after the inputs
    with pytest.raises(DataError) as exc:
        load_data(tmp_path, two_specs)
    assert exc.value.message == f"data folder {tmp_path} has no usable .npz/.npy files"


def test_no_samples(tmp_path, dyn_specs):
    np.savez(tmp_path / "d.npz", x=np.zeros((0, 1, 3, 4), np.float32))
    with pytest.raises(DataError, match="holds no samples"):
        load_data(tmp_path / "d.npz", dyn_specs)


# --------------------------------------------------------------------------------------------------
# Dataset.batches


def _dataset(n_chunks=(3, 4)):
    chunks, total, start = [], 0, 0
    for n in n_chunks:
        arr = np.arange(start, start + n, dtype=np.float32).reshape(n, 1, 1) * np.ones((1, 1, 2), np.float32)
        chunks.append(lambda a=arr[:, None]: {"x": a})  # [n, 1(batch), 1, 2]
        start += n
        total += n
    return Dataset(chunks, total, "mem")


def test_batches_concatenate_up_to_max_batch():
    ds = _dataset()
    batches = list(ds.batches(3, True))
    assert [b["x"].shape for b in batches] == [(3, 1, 2), (3, 1, 2), (1, 1, 2)]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches])[:, 0, 0], np.arange(7))


def test_batches_respect_limit():
    batches = list(_dataset().batches(3, True, limit=5))
    assert [len(b["x"]) for b in batches] == [3, 2]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches])[:, 0, 0], np.arange(5))


def test_batches_unbatchable_or_max_1_yield_samples():
    assert [b["x"].shape for b in _dataset().batches(32, False)] == [(1, 1, 2)] * 7
    assert [b["x"].shape for b in _dataset().batches(1, True)] == [(1, 1, 2)] * 7
    assert len(list(_dataset().samples(limit=4))) == 4


def test_batches_big_max_batch_one_feed():
    (only,) = list(_dataset().batches(100, True))
    assert only["x"].shape == (7, 1, 2)


# --------------------------------------------------------------------------------------------------
# Synthetic data


def test_synthetic_is_deterministic_and_typed(two_specs):
    a, notes_a = synthetic_data(two_specs)
    b, notes_b = synthetic_data(two_specs)
    sa, sb = _all(a), _all(b)
    assert len(sa) == a.num_samples == 4
    for x, y in zip(sa, sb):
        np.testing.assert_array_equal(x["x"], y["x"])
        np.testing.assert_array_equal(x["ids"], y["ids"])
    assert sa[0]["x"].dtype == np.float32 and sa[0]["x"].shape == (1, 3)
    assert sa[0]["ids"].dtype == np.int64 and sa[0]["ids"].shape == (1, 5)
    ids = np.concatenate([s["ids"] for s in sa])
    assert ids.min() >= 0 and ids.max() < 4
    # samples are not all the same
    assert not np.array_equal(sa[0]["x"], sa[1]["x"])
    assert notes_a == notes_b == [
        "input 'x': dynamic batch axis set to 1",
        "input 'ids': dynamic batch axis set to 1",
    ]
    assert a.source == "synthetic"


def test_synthetic_num_samples(dyn_specs):
    ds, _ = synthetic_data(dyn_specs, num_samples=9)
    assert ds.num_samples == 9 and len(_all(ds)) == 9


def test_synthetic_static_shape_no_notes(static_specs):
    ds, notes = synthetic_data(static_specs)
    assert notes == []
    assert _all(ds)[0]["x"].shape == (2, 3, 4)


def test_synthetic_honors_input_shape(dyn_specs):
    ds, notes = synthetic_data(dyn_specs, {"x": [5, 3, 4]})
    assert notes == []
    assert _all(ds)[0]["x"].shape == (5, 3, 4)


def test_synthetic_other_dynamic_axis_needs_input_shape():
    specs = input_specs(_model("float[1,S,8] x"))
    with pytest.raises(DataError) as exc:
        synthetic_data(specs)
    e = exc.value
    assert e.message == "input 'x' has a dynamic axis 1 and no data to size it"
    assert e.hint == "give --input-shape x=1x1x8 or --data"
    assert e.exit_code == 2
    ds, notes = synthetic_data(specs, {"x": [1, 7, 8]})
    assert _all(ds)[0]["x"].shape == (1, 7, 8) and notes == []


def test_synthetic_input_shape_errors(dyn_specs):
    with pytest.raises(DataError, match="--input-shape names unknown input 'y'"):
        synthetic_data(dyn_specs, {"y": [1, 3, 4]})
    with pytest.raises(DataError, match="--input-shape for 'x' has 2 dims, the input has 3"):
        synthetic_data(dyn_specs, {"x": [1, 3]})
    with pytest.raises(DataError, match="--input-shape for 'x' sets axis 2 to 5, the model fixes it to 4"):
        synthetic_data(dyn_specs, {"x": [1, 3, 5]})


def test_synthetic_unknown_rank_needs_input_shape():
    m = ir.from_onnx_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float x) => (float y) { y = Identity(x) }
        """
    )
    m.graph.inputs[0].shape = None
    specs = input_specs(m)
    with pytest.raises(DataError) as exc:
        synthetic_data(specs)
    assert exc.value.hint == "give --input-shape x=DIMS or --data"


# --------------------------------------------------------------------------------------------------
# parse_input_shapes


def test_parse_input_shapes_ok():
    assert parse_input_shapes(["x=1x3x8x8"]) == {"x": [1, 3, 8, 8]}
    assert parse_input_shapes(["x = 2, 3", "input.1=7"]) == {"x": [2, 3], "input.1": [7]}
    assert parse_input_shapes(None) == {}
    assert parse_input_shapes([]) == {}


@pytest.mark.parametrize("item", ["x=1xax8", "x=", "=1x2", "x", "x=1x", "x=-1x3", "x=1.5"])
def test_parse_input_shapes_rejects(item):
    with pytest.raises(UsageError) as exc:
        parse_input_shapes([item])
    assert exc.value.message == f"bad --input-shape {item!r}"
    assert exc.value.exit_code == 2
    assert "input=1x3x224x224" in exc.value.hint
