"""Determinism: the same input, options and data give a byte-identical output file.

Each registered pass runs with its defaults (passes that need data get the digits calibration data) in two
separate processes with different hash seeds, so set/dict iteration order or object ids leaking into
names, order or numbers would show up as different bytes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from onnxshrink.registry import all_passes

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"

SCRIPT = """
import sys, onnxshrink
model, spec, data, out = sys.argv[1:5]
res = onnxshrink.optimize(model, spec, data=data or None, output=out)
res.save(out, force=True)
res.close()
"""


def _run(tmp_path: Path, model: Path, spec: str, data: str, out: Path, seed: int) -> str:
    env = dict(os.environ, PYTHONHASHSEED=str(seed))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(model), spec, data, str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    digest = hashlib.sha256(out.read_bytes())
    data_file = out.parent / (out.name + ".data")
    if data_file.exists():
        digest.update(data_file.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("name", [p.name for p in all_passes()])
def test_every_pass_gives_identical_bytes(tmp_path, name):
    info = next(p for p in all_passes() if p.name == name)
    data = str(MODELS / "digits_calib.npz") if info.cls.needs_data else ""
    a = _run(tmp_path, MODELS / "digits_resnet.onnx", name, data, tmp_path / "a.onnx", seed=1)
    b = _run(tmp_path, MODELS / "digits_resnet.onnx", name, data, tmp_path / "b.onnx", seed=2)
    assert a == b, f"pass {name!r}: two runs wrote different bytes"


@pytest.mark.parametrize("model", ["bert_tiny.onnx", "cnn_opset11_const_if.onnx"])
def test_fold_gives_identical_bytes_on_transformer_and_subgraphs(tmp_path, model):
    a = _run(tmp_path, MODELS / model, "fold", "", tmp_path / "a.onnx", seed=1)
    b = _run(tmp_path, MODELS / model, "fold", "", tmp_path / "b.onnx", seed=2)
    assert a == b


def test_determinism_check_can_fail(tmp_path):
    """The comparison above really compares content: a different option gives different bytes."""
    a = _run(tmp_path, MODELS / "digits_resnet.onnx", "fold", "", tmp_path / "a.onnx", seed=1)
    b = _run(tmp_path, MODELS / "digits_resnet.onnx", "fold(fuse_bn=false)", "", tmp_path / "b.onnx", seed=1)
    assert a != b
