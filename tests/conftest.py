"""Shared fixtures: paths, onnxruntime helpers, model builders."""

from __future__ import annotations

import sys
from pathlib import Path

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
sys.path.insert(0, str(ROOT / "benchmarks"))  # the corpus helpers live beside the benchmarks


def run_ort(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model (proto or path) in onnxruntime's CPU provider and return all outputs."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def rel_l2(ref: np.ndarray, cand: np.ndarray) -> float:
    """‖cand − ref‖ / ‖ref‖ (0 when both are zero)."""
    ref = np.asarray(ref, dtype=np.float64)
    cand = np.asarray(cand, dtype=np.float64)
    den = np.linalg.norm(ref)
    num = np.linalg.norm(cand - ref)
    return float(num / den) if den else float(num)


@pytest.fixture
def models_dir() -> Path:
    return MODELS


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI sets logger levels (root, onnx_ir, onnxscript): put them back after each test."""
    names = ["", "onnx_ir", "onnxscript"]
    levels = {n: logging.getLogger(n or None).level for n in names}
    yield
    for n, lvl in levels.items():
        logging.getLogger(n or None).setLevel(lvl)


def cli_exit(*args) -> int:
    """Run the CLI in-process; return its exit code."""
    from onnxshrink.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return 0 if exc.value.code is None else exc.value.code


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli_exit(*args)
    out, err = capsys.readouterr()
    return code, out, err


def make(nodes, inputs, outputs, inits=(), opset=17, ir_version=8) -> onnx.ModelProto:
    """A checked single-graph model (IR 8 unless ``ir_version``) from onnx.helper pieces."""
    from onnx import helper

    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir_version
    onnx.checker.check_model(m)
    return m


def vi(name, shape, dtype=None) -> onnx.ValueInfoProto:
    """A tensor value info (float32 unless ``dtype``)."""
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT if dtype is None else dtype, shape)
