"""Benchmark of the prune pass on the shipped digits nets: MACs, params, top-1 and ORT CPU latency.

For each model (``digits_resnet``, ``digits_mobilenetv2``) and each configuration, the pipeline
``fold,prune(...)`` runs with ``models/digits_calib.npz`` as calibration data (256 images); top-1 is
measured on ``models/digits_test.npz`` (400 held-out images) against ``digits_test_labels.npy``, in
onnxruntime. Configurations (all at the same MAC target, so the cuts are comparable):

* ``l1, no recon`` — the baseline: plain L1 weight-magnitude pruning without reconstruction (what a
  magnitude pruner does before fine-tuning; Torch-Pruning itself needs torch and the model's source);
* ``act, no recon`` and ``act + lsq`` — the same cut (activation importance), without and with the
  least-squares reconstruction, so the effect of reconstruction is visible;
* ``l2 + lsq`` — weight-norm importance with reconstruction.

Latency: ORT CPU, one intra-op thread, sequential execution, the fp32 model (after ``fold``, which is
exact) and each pruned model in the same process; runs of the two are interleaved in rounds and the median
per-run time is reported, at batch 1 and at batch 64.

    python benchmarks/bench_prune.py [--target 0.6] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
sys.path.insert(0, str(ROOT))

import onnxshrink  # noqa: E402


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def top1(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    s = session(path)
    logits = np.concatenate([s.run(None, {"input": x[i:i + 100]})[0] for i in range(0, len(x), 100)])
    return float((logits.argmax(1) == y).mean())


def latency(paths: list[Path], x: np.ndarray, batch: int, rounds: int, per_round: int) -> list[float]:
    """Median milliseconds per run for each model, runs interleaved in rounds."""
    from onnxshrink.validate import interleaved_times

    feed = {"input": np.ascontiguousarray(x[:batch])}
    times = interleaved_times([session(p) for p in paths], feed, rounds, per_round=per_round)
    return [1000 * statistics.median(t) for t in times]


CONFIGS = [
    ("l1, no recon (baseline)", "importance=l1,recon=none"),
    ("act, no recon", "importance=act,recon=none"),
    ("act + lsq", "importance=act,recon=lsq"),
    ("l2 + lsq", "importance=l2,recon=lsq"),
    ("act + lsq, round_to=4", "importance=act,recon=lsq,round_to=4"),
]


def run(models: list[str], target: float, quick: bool) -> list[dict]:
    x_test = np.load(MODELS / "digits_test.npz")["input"]
    y_test = np.load(MODELS / "digits_test_labels.npy")
    calib = MODELS / "digits_calib.npz"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        for name in models:
            src = MODELS / f"{name}.onnx"
            base = onnxshrink.optimize(src, passes="fold", data=calib)
            base_path = base.save(tmpd / f"{name}.fold.onnx")
            fp32 = top1(src, x_test, y_test)
            pruned = []
            for label, opts in CONFIGS:
                spec = f"fold,prune(target_macs={target},{opts})"
                t = time.perf_counter()
                res = onnxshrink.optimize(src, passes=spec, data=calib)
                secs = time.perf_counter() - t
                p = res.save(tmpd / f"{name}.{len(pruned)}.onnx", force=True)
                rec = res.report.passes[-1]
                v = res.report.validation.outputs[0] if res.report.validation else None
                pruned.append((label, spec, p, res, secs, rec, v))
            rounds, per = (3, 20) if quick else (10, 40)
            paths = [base_path] + [q[2] for q in pruned]
            lat1 = latency(paths, x_test, 1, rounds, per)
            lat64 = latency(paths, x_test, 64, max(2, rounds // 2), max(4, per // 4))
            for i, (label, spec, p, res, secs, rec, v) in enumerate(pruned):
                rows.append({
                    "model": name,
                    "config": label,
                    "spec": spec,
                    "macs_before": res.report.before.macs,
                    "macs_after": res.report.after.macs,
                    "mac_reduction": round(1 - res.report.after.macs / res.report.before.macs, 4),
                    "params_before": base.report.after.params,
                    "params_after": res.report.after.params,
                    "top1_fp32": fp32,
                    "top1_pruned": top1(p, x_test, y_test),
                    "calib_rel_l2": None if v is None else round(v.rel_l2, 4),
                    "verdict": res.report.verdict,
                    "latency_ms_b1": [round(lat1[0], 4), round(lat1[i + 1], 4)],
                    "latency_ratio_b1": round(lat1[i + 1] / lat1[0], 3),
                    "latency_ms_b64": [round(lat64[0], 3), round(lat64[i + 1], 3)],
                    "latency_ratio_b64": round(lat64[i + 1] / lat64[0], 3),
                    "tool_seconds": round(secs, 2),
                    "layers_reconstructed": rec.counters.get("layers_reconstructed", 0),
                    "declines": rec.declines,
                    "layers": rec.details.get("layers", []),
                })
    return rows


def table(rows: list[dict]) -> str:
    head = ("| model | config | MACs before → after | MACs cut | params before → after | top-1 fp32 → pruned "
            "| Δ pt | ORT b1 ms (ratio) | ORT b64 ms (ratio) | calib rel-L2 | time |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = 100 * (r["top1_pruned"] - r["top1_fp32"])
        lines.append(
            f"| {r['model']} | {r['config']} | {r['macs_before']:,} → {r['macs_after']:,} | "
            f"{100 * r['mac_reduction']:.1f}% | {r['params_before']:,} → {r['params_after']:,} | "
            f"{100 * r['top1_fp32']:.2f}% → {100 * r['top1_pruned']:.2f}% | {d:+.2f} | "
            f"{r['latency_ms_b1'][0]:.3f} → {r['latency_ms_b1'][1]:.3f} ({r['latency_ratio_b1']:.2f}×) | "
            f"{r['latency_ms_b64'][0]:.2f} → {r['latency_ms_b64'][1]:.2f} ({r['latency_ratio_b64']:.2f}×) | "
            f"{r['calib_rel_l2']} | {r['tool_seconds']:.1f} s |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits_resnet,digits_mobilenetv2")
    ap.add_argument("--target", type=float, default=0.6, help="target_macs (fraction of MACs kept)")
    ap.add_argument("--json", help="write the rows (with per-layer tables) to this file")
    ap.add_argument("--quick", action="store_true", help="fewer latency runs")
    a = ap.parse_args()
    rows = run(a.models.split(","), a.target, a.quick)
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
