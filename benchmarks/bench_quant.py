"""quant vs onnxruntime.quantization, side by side in one run, on the project's models and data.

For each digits CNN: fp32, onnxshrink ``fold,quant(mode=static)`` (QDQ and QOp) and ORT's
``quantize_static`` (QDQ, MinMax, per-channel, uint8 activations / int8 weights, the documented
defaults plus per_channel=True) calibrated on the same ``digits_calib.npz``; top-1 on the held-out
``digits_test.npz`` with labels, file size ratio, ORT CPU latency ratio (1 thread, batch 1 and 32, runs
interleaved, medians) and the tool's own time. For bert_tiny: dynamic and static int8, cosine to fp32
on held-out inputs. Finally the calibration peak RSS (a fresh process per run) for 16 vs 256 samples,
ours (streaming histograms) and ORT's percentile calibrator.

    python benchmarks/bench_quant.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


def session(path: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def predict(path: str, x: np.ndarray) -> np.ndarray:
    s = session(path)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 64]})[0] for i in range(0, len(x), 64)])


def latency(paths: list[str], x: np.ndarray, batch: int, runs: int) -> list[float]:
    """Median ms per run of each model, runs interleaved so machine load hits all alike."""
    from onnxshrink.validate import interleaved_times

    sessions = [session(p) for p in paths]
    times = interleaved_times(sessions, {sessions[0].get_inputs()[0].name: x[:batch]}, runs)
    return [float(np.median(t) * 1000) for t in times]


def ours(model: Path, spec: str, calib: Path, out: Path) -> float:
    import onnxshrink

    t = time.perf_counter()
    r = onnxshrink.optimize(str(model), passes=spec, data=str(calib), validate=False, latency=False, cache=False)
    r.save(out)
    r.close()
    return time.perf_counter() - t


def ort_static(model: Path, calib: Path, out: Path, method: str = "MinMax", exclude: list[str] | None = None) -> float:
    """``quantize_static`` with its documented defaults plus per-channel (QDQ, u8 activations, s8 weights)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static

    x = np.load(calib)["input"]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(range(0, len(x), 32))

        def get_next(self):
            i = next(self.it, None)
            return None if i is None else {"input": x[i:i + 32]}

    t = time.perf_counter()
    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method), nodes_to_exclude=list(exclude or []))
    return time.perf_counter() - t


def ort_dynamic(model: Path, out: Path) -> float:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t = time.perf_counter()
    quantize_dynamic(str(model), str(out), weight_type=QuantType.QInt8, per_channel=True)
    return time.perf_counter() - t


def cnn_rows(name: str, runs: int, tmp: Path) -> list[dict]:
    model = MODELS / f"{name}.onnx"
    calib = MODELS / "digits_calib.npz"
    x = np.load(MODELS / "digits_test.npz")["input"]
    y = np.load(MODELS / "digits_test_labels.npy")
    candidates = {
        "fp32": (str(model), 0.0),
        "onnxshrink qdq": (str(tmp / f"{name}.qdq.onnx"), ours(model, "fold,quant(mode=static)", calib, tmp / f"{name}.qdq.onnx")),
        "onnxshrink qop": (str(tmp / f"{name}.qop.onnx"),
                           ours(model, "fold,quant(mode=static,format=qop)", calib, tmp / f"{name}.qop.onnx")),
        "ort quantize_static": (str(tmp / f"{name}.ort.onnx"), ort_static(model, calib, tmp / f"{name}.ort.onnx")),
    }
    paths = [p for p, _ in candidates.values()]
    lat1 = latency(paths, x, 1, runs)
    lat32 = latency(paths, x, 32, max(10, runs // 4))
    base_size = os.path.getsize(model)
    rows = []
    for i, (label, (path, secs)) in enumerate(candidates.items()):
        acc = float(np.mean(predict(path, x).argmax(1) == y) * 100)
        rows.append({"model": name, "tool": label, "top1": round(acc, 2), "size": os.path.getsize(path),
                     "size_ratio": round(os.path.getsize(path) / base_size, 3),
                     "lat1_ms": round(lat1[i], 4), "lat1_ratio": round(lat1[i] / lat1[0], 3),
                     "lat32_ms": round(lat32[i], 4), "lat32_ratio": round(lat32[i] / lat32[0], 3),
                     "tool_s": round(secs, 2)})
    return rows


def bert_rows(runs: int, tmp: Path) -> list[dict]:
    model = MODELS / "bert_tiny.onnx"
    calib = MODELS / "digits_seq_calib.npz"
    x = np.load(MODELS / "digits_seq_test.npz")["input"]
    y = np.load(MODELS / "digits_test_labels.npy")
    ref = predict(str(model), x)
    candidates = {
        "fp32": (str(model), 0.0),
        "onnxshrink dynamic": (str(tmp / "bert.dyn.onnx"), ours(model, "fold,quant(mode=dynamic)", calib, tmp / "bert.dyn.onnx")),
        "ort quantize_dynamic": (str(tmp / "bert.ortdyn.onnx"), ort_dynamic(model, tmp / "bert.ortdyn.onnx")),
        "onnxshrink static": (str(tmp / "bert.st.onnx"), ours(model, "fold,quant(mode=static)", calib, tmp / "bert.st.onnx")),
        "ort quantize_static": (str(tmp / "bert.ortst.onnx"), ort_static(model, calib, tmp / "bert.ortst.onnx")),
    }
    paths = [p for p, _ in candidates.values()]
    lat1 = latency(paths, x, 1, runs)
    rows = []
    for i, (label, (path, secs)) in enumerate(candidates.items()):
        out = predict(path, x)
        cos = float(np.mean(np.sum(out * ref, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))))
        rows.append({"model": "bert_tiny", "tool": label, "cosine": round(cos, 5),
                     "top1": round(float(np.mean(out.argmax(1) == y) * 100), 2),
                     "size_ratio": round(os.path.getsize(path) / os.path.getsize(model), 3),
                     "lat1_ratio": round(lat1[i] / lat1[0], 3), "tool_s": round(secs, 2)})
    return rows


_CHILD = r"""
import resource, sys, numpy as np, os
tool, n, model, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
x = np.load(sys.argv[5])["input"]
x = np.concatenate([x] * (1 + n // len(x)))[:n]
if tool == "onnxshrink":
    import onnxshrink
    os.environ["ONNXSHRINK_CACHE_DIR"] = "off"
    r = onnxshrink.optimize(model, passes=f"quant(mode=static,calib=percentile,samples={n})",
                            data={"input": x}, validate=False, latency=False, cache=False)
    r.save(out)
else:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static
    class R(CalibrationDataReader):
        def __init__(self): self.it = iter(range(0, len(x), 32))
        def get_next(self):
            i = next(self.it, None)
            return None if i is None else {"input": x[i:i + 32]}
    quantize_static(model, out, R(), quant_format=QuantFormat.QDQ, per_channel=True,
                    calibrate_method=CalibrationMethod.Percentile)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def calib_memory(tmp: Path, sizes=(16, 256)) -> list[dict]:
    rows = []
    model = str(MODELS / "digits_resnet.onnx")
    for tool in ("onnxshrink", "ort"):
        peaks = {}
        for n in sizes:
            out = subprocess.run([sys.executable, "-c", _CHILD, tool, str(n), model, str(tmp / f"mem_{tool}_{n}.onnx"),
                                  str(MODELS / "digits_calib.npz")], capture_output=True, text=True, check=True)
            peaks[n] = int(out.stdout.strip().splitlines()[-1]) / 1024
        rows.append({"tool": tool, **{f"peak_mib_{n}": round(v, 1) for n, v in peaks.items()},
                     "growth": round(peaks[sizes[-1]] / peaks[sizes[0]] - 1, 4)})
    return rows


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = [" | ".join(keys), " | ".join("---" for _ in keys)]
    lines += [" | ".join(str(r.get(k, "")) for k in keys) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer latency runs, digits_cnn only")
    ap.add_argument("--json", type=Path, help="write all rows as JSON")
    args = ap.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    runs = 50 if args.quick else 300
    names = ["digits_cnn"] if args.quick else ["digits_cnn", "digits_resnet", "digits_mobilenetv2"]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        result = {"cnn": [r for n in names for r in cnn_rows(n, runs, tmp)]}
        print(table(result["cnn"]), "\n")
        result["bert"] = bert_rows(runs, tmp)
        print(table(result["bert"]), "\n")
        result["calib_memory"] = calib_memory(tmp)
        print(table(result["calib_memory"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
