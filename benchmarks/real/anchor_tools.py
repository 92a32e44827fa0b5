"""Run ONE competing tool on one model, as a user of that tool would; a child process of ``run.py``.

    python anchor_tools.py TOOL MODEL.onnx OUT.onnx [--calib CALIB.npz] [--transformer]

Standalone on purpose (numpy, onnx and the tool itself; nothing from onnxshrink or the case modules), so it
runs unchanged in the isolated NNCF and ModelOpt venvs. TOOL is one of:

- ``onnxsim``: ``onnxsim.simplify(model)``, checked result.
- ``onnxslim``: ``onnxslim.slim(model_path, out_path)``.
- ``ort_static``: ``quant_pre_process`` (skipped with a note if it fails), then ``quantize_static`` with
  QDQ, per-channel, MinMax, int8 activations and weights (the S8S8 the ORT docs recommend on CPU).
- ``ort_dynamic``: ``quantize_dynamic`` with its defaults (int8 weights).
- ``nncf``: ``nncf.quantize`` (ONNX backend), every calibration sample (``subset_size``), and
  ``model_type=TRANSFORMER`` when ``--transformer``.
- ``modelopt``: ``modelopt.onnx.quantization.quantize(quantize_mode='int8', calibration_eps=['cpu'],
  high_precision_dtype='fp32')`` with the calibration arrays.

Calibration feeds are batch-1 slices of the ``.npz`` (one stacked array per model input, keyed by input name
or, failing that, in input order), each array read once. Exit 0 when OUT was written; on failure the last
stderr line is the reason (``run.py`` keeps it).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def _feeds(model_path: str, calib: str) -> list[dict[str, np.ndarray]]:
    import onnx

    m = onnx.load(model_path, load_external_data=False)
    init = {i.name for i in m.graph.initializer}
    names = [i.name for i in m.graph.input if i.name not in init]
    with np.load(calib) as z:
        arrays = {k: z[k] for k in z.files}
    if not set(names) <= set(arrays):
        arrays = dict(zip(names, arrays.values()))
    n = len(next(iter(arrays.values())))
    return [{k: arrays[k][i:i + 1] for k in names} for i in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("tool")
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--calib")
    ap.add_argument("--transformer", action="store_true")
    a = ap.parse_args()
    import onnx

    if a.tool == "onnxsim":
        import onnxsim

        m, ok = onnxsim.simplify(onnx.load(a.model))
        if not ok:
            raise RuntimeError("onnxsim: simplified model failed its check")
        onnx.save(m, a.out)
    elif a.tool == "onnxslim":
        import onnxslim

        onnxslim.slim(a.model, a.out)
    elif a.tool in ("ort_static", "ort_dynamic"):
        from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                              quantize_static)

        if a.tool == "ort_dynamic":
            quantize_dynamic(a.model, a.out, weight_type=QuantType.QInt8)
            return 0
        from onnxruntime.quantization.shape_inference import quant_pre_process

        src = a.out + ".pre.onnx"
        try:
            quant_pre_process(a.model, src)
        except Exception as e:  # the docs make it optional; a user would go on without it
            sys.stderr.write(f"note: quant_pre_process failed ({type(e).__name__}: {e}); quantizing the original\n")
            src = a.model
        feeds = iter(_feeds(a.model, a.calib))

        class Reader:
            def get_next(self):
                return next(feeds, None)

        quantize_static(src, a.out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8)
    elif a.tool == "nncf":
        import nncf

        feeds = _feeds(a.model, a.calib)
        kw = {"model_type": nncf.ModelType.TRANSFORMER} if a.transformer else {}
        q = nncf.quantize(onnx.load(a.model), nncf.Dataset(feeds), subset_size=len(feeds), **kw)
        onnx.save(q, a.out)
    elif a.tool == "modelopt":
        from modelopt.onnx.quantization import quantize

        feeds = _feeds(a.model, a.calib)
        data = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
        quantize(onnx_path=a.model, quantize_mode="int8", calibration_data=data, calibration_eps=["cpu"],
                 high_precision_dtype="fp32", output_path=a.out)
    else:
        raise SystemExit(f"unknown tool {a.tool}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
