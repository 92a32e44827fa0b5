"""Scale: linear shape inference, big weights kept unread, memory-light validation.

The real measurements (100k nodes, a > 2 GB model) are benchmarks (benchmarks/scale_fold.py,
benchmarks/big_model.py); these tests pin the mechanisms they rely on, on small inputs.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxshrink
from onnxshrink.model import infer_shapes, load_model
from onnxshrink.passes import fold as fold_mod


def _chain(n_layers: int, dim: int = 8, big: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], "x"
    for i in range(n_layers):
        inits.append(nh.from_array(rng.standard_normal((dim, dim)).astype(np.float32), f"w{i}"))
        nodes.append(h.make_node("MatMul", [cur, f"w{i}"], [f"m{i}"]))
        nodes.append(h.make_node("Relu", [f"m{i}"], [f"r{i}"]))
        cur = f"r{i}"
    nodes.append(h.make_node("Identity", [cur], ["y"]))
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", dim])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", dim])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def test_infer_shapes_fills_every_value_and_keeps_weights():
    m = ir.from_proto(_chain(3, dim=64))  # 16 KiB weights: handed to onnx as data-less stand-ins
    tensors = {n: v.const_value for n, v in m.graph.initializers.items()}
    assert infer_shapes(m)
    for node in m.graph:
        for v in node.outputs:
            assert v.dtype == ir.DataType.FLOAT and v.shape is not None and v.shape[1] == 64, v
            assert str(v.shape[0]) == "N"
    for n, v in m.graph.initializers.items():
        assert v.const_value is tensors[n]  # the very same tensor objects are back
    assert not infer_shapes(m)  # nothing new the second time


def test_infer_shapes_walks_subgraphs():
    m = load_model(onnxshrink.model.Path(__file__).resolve().parent.parent / "models" / "cnn_opset11_const_if.onnx")
    infer_shapes(m)
    sub_values = [v for g in m.graphs() if g is not m.graph for n in g for v in n.outputs]
    assert sub_values and any(v.shape is not None for v in sub_values)


def test_infer_shapes_is_linear():
    """Per-node time at 8x the size stays within 2.5x (the old path was quadratic in initializers)."""
    def per_node(n):
        m = ir.from_proto(_chain(n))
        t = time.perf_counter()
        infer_shapes(m)
        return (time.perf_counter() - t) / n

    per_node(200)  # warm-up
    small = min(per_node(500) for _ in range(3))
    large = min(per_node(4000) for _ in range(2))
    assert large / small < 2.5, (small, large)


def _big_weights_model(tmp_path, same: bool, differ_in_middle_only: bool = False):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1024, 512)).astype(np.float32)  # 2 MiB: the sampled path
    b = a.copy() if same else rng.standard_normal((1024, 512)).astype(np.float32)
    if differ_in_middle_only:
        b = a.copy()
        b[100, 7] += 1.0  # outside the sampled start/middle/end slices
    g = h.make_graph([h.make_node("MatMul", ["x", "a"], ["p"]), h.make_node("MatMul", ["x", "b"], ["q"]),
                      h.make_node("Add", ["p", "q"], ["y"])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [1, 1024])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 512])],
                     [nh.from_array(a, "a"), nh.from_array(b, "b")])
    path = tmp_path / "m.onnx"
    onnx.save_model(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), str(path),
                    save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    return path


@pytest.mark.parametrize("same,middle,merged", [(True, False, 1), (False, False, 0), (False, True, 0)])
def test_dedup_of_big_weights(tmp_path, monkeypatch, same, middle, merged):
    full = []
    real = fold_mod._full_digest
    monkeypatch.setattr(fold_mod, "_full_digest", lambda t: full.append(t.name) or real(t))
    res = onnxshrink.optimize(_big_weights_model(tmp_path, same, middle), "fold")
    assert res.report.validation.status == "passed"
    assert res.report.passes[0].counters.get("initializers_merged", 0) == merged
    # distinct weights whose samples differ are never hashed in full (their pages stay unread)
    assert bool(full) == (same or middle), full


def test_big_model_validation_opens_one_session_at_a_time(tmp_path, monkeypatch):
    from onnxshrink import validate

    monkeypatch.setattr(validate, "SEQUENTIAL_BYTES", 1)  # every model counts as big
    live, peak = [0], [0]
    real = validate.make_session

    class Tracked:
        def __init__(self, sess):
            self._s = sess
            live[0] += 1
            peak[0] = max(peak[0], live[0])

        def __getattr__(self, k):
            return getattr(self._s, k)

        def __del__(self):
            live[0] -= 1

    monkeypatch.setattr(validate, "make_session", lambda p, **k: Tracked(real(p, **k)))
    res = onnxshrink.optimize(_big_weights_model(tmp_path, True), "fold")
    v = res.report.validation
    assert v.status == "passed" and v.samples > 0
    assert peak[0] == 1
    assert any("one onnxruntime session at a time" in n for n in v.notes)


# --------------------------------------------------------------------------------------------------
# The benchmarks themselves, small enough to run on demand (pytest -m slow)


@pytest.mark.slow
def test_big_model_benchmark_peak_memory(tmp_path):
    """A 1.25 GiB external-data model (over the one-session validation threshold) through fold."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "big_model.py"
    out = tmp_path / "big.json"
    proc = subprocess.run([sys.executable, str(script), "--gb", "1.25", "--json", str(out)],
                          capture_output=True, text=True, timeout=1800)
    runs = json.loads(out.read_text())["runs"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(r["exit"] == 0 and r["ratio"] < 1.5 for r in runs), runs
    assert [r.get("verdict") for r in runs if r["validate"]] == ["passed"]


@pytest.mark.slow
def test_fold_time_is_linear_in_graph_size(tmp_path):
    """CPU time per node at 20k nodes within 1.5x of the one at 2k (benchmarks/scale_fold.py)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "scale_fold.py"
    out = tmp_path / "scale.json"
    subprocess.run([sys.executable, str(script), "--sizes", "2000,20000", "--json", str(out)],
                   capture_output=True, text=True, timeout=1800, check=True)
    ratio = json.loads(out.read_text())["per_node_ratio"]["total_cpu_seconds"]
    assert ratio < 1.5, ratio
