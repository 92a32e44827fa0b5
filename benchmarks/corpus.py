"""The test corpus: every model the `onnx` package ships as backend test data, plus the project's models/.

* ``node``: the ~1,900 single-operator test cases, generated in memory from ``onnx.backend.test.case.node``
  (the installed wheel no longer ships them as files) with their inputs;
* ``pytorch-converted``, ``pytorch-operator``, ``simple``, ``light`` (real architectures with stand-in
  weights): the model files under ``onnx/backend/test/data`` with their ``test_data_set_0`` inputs;
* ``models``: the project's fixtures with their digits data (the detector with its digit scenes).

Nothing is downloaded: the ``real`` directory of the wheel only holds download links and is skipped.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["CorpusModel", "iter_corpus", "DATA_DIRS"]

ROOT = Path(__file__).resolve().parent.parent
ONNX_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
DATA_DIRS = ("pytorch-converted", "pytorch-operator", "simple", "light")


@dataclasses.dataclass
class CorpusModel:
    """One corpus entry: a model and, when the corpus has them, input arrays by input name."""

    kind: str
    name: str
    model: onnx.ModelProto
    inputs: dict[str, np.ndarray] | None


def _real_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _load_pb_inputs(model: onnx.ModelProto, files: list[str]) -> dict[str, np.ndarray] | None:
    names = _real_inputs(model)
    arrays = []
    for f in files:
        t = onnx.TensorProto()
        try:
            with open(f, "rb") as fh:
                t.ParseFromString(fh.read())
            arrays.append(numpy_helper.to_array(t))
        except Exception:
            return None  # sequences/optionals: not plain tensors
    if len(arrays) != len(names):
        return None
    return dict(zip(names, arrays))


def _node_cases(sample_every: int) -> Iterator[CorpusModel]:
    from onnx.backend.test.case import node as node_cases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            cases = node_cases.collect_testcases("")
    for i, case in enumerate(sorted(cases, key=lambda c: c.name)):
        if sample_every > 1 and i % sample_every:
            continue
        if case.model is None:
            continue
        inputs = None
        if case.data_sets:
            ins = case.data_sets[0][0]
            names = _real_inputs(case.model)
            if len(ins) == len(names) and all(isinstance(a, np.ndarray) for a in ins):
                inputs = dict(zip(names, ins))
        yield CorpusModel("node", case.name, case.model, inputs)


def _data_dir_cases(kind: str) -> Iterator[CorpusModel]:
    base = ONNX_DATA / kind
    if not base.is_dir():
        return
    if kind == "light":
        for f in sorted(base.glob("*.onnx")):
            yield CorpusModel(kind, f.stem, onnx.load(str(f)), None)
        return
    for d in sorted(p for p in base.iterdir() if p.is_dir()):
        f = d / "model.onnx"
        if not f.exists():
            continue
        model = onnx.load(str(f))
        files = sorted(glob.glob(str(d / "test_data_set_0" / "input_*.pb")),
                       key=lambda s: int(Path(s).stem.split("_")[-1]))
        yield CorpusModel(kind, d.name, model, _load_pb_inputs(model, files) if files else None)


def _project_models() -> Iterator[CorpusModel]:
    models = ROOT / "models"
    for f in sorted(models.glob("*.onnx")):
        model = onnx.load(str(f))
        names = _real_inputs(model)
        inputs = None
        data_file = None
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] if names else []
        for candidate in ("digits_seq_test.npz", "digits_test.npz", "detect_test.npz"):
            if (models / candidate).exists():
                with np.load(models / candidate) as z:
                    arr = z["input"]
                # same rank, and every static non-batch dimension equal (0 = dynamic)
                if arr.ndim == len(shape) and all(d in (0, a) for d, a in zip(shape[1:], arr.shape[1:])):
                    data_file = arr
                    break
        if data_file is not None and len(names) == 1:
            inputs = {names[0]: data_file[:64]}
        yield CorpusModel("models", f.stem, model, inputs)


def iter_corpus(kinds: tuple[str, ...] = ("node", *DATA_DIRS, "models"), node_sample_every: int = 1) -> Iterator[CorpusModel]:
    """Yield every corpus model of the given kinds (node cases optionally sampled)."""
    for kind in kinds:
        if kind == "node":
            yield from _node_cases(node_sample_every)
        elif kind == "models":
            yield from _project_models()
        else:
            yield from _data_dir_cases(kind)
