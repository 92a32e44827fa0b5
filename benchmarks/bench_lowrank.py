"""Benchmark of the lowrank pass on the shipped models (fit on the calib split, measured on the test split).

* bert_tiny: plain svd vs activation-whitened asvd, at the same parameter budget (uniform ``ratio``) and at
  the same output-error budget (``budget``): parameter reduction, cosine and relative L2 of the logits to
  fp32 on the held-out test set, top-1 with labels.
* digits CNNs: Conv/Gemm MAC reduction, top-1 vs fp32, ORT CPU latency of the whole model before/after
  (batch 1 and batch 64, best of interleaved rounds), with and without the ``min_speedup`` latency gate,
  with and without ``refit`` (default ``rrr`` with data). Top-1 is also given on the calibration samples the
  pass never reads (``samples=128`` of the 256: indices 128–255), as a second held-out set.

The reference ("fp32") is the model after ``fold`` (exact), so lowrank's effect is measured alone.

    python benchmarks/bench_lowrank.py [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import onnxshrink

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


def session(path: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def logits(path: str, x: np.ndarray) -> np.ndarray:
    s = session(path)
    return np.concatenate([s.run(None, {"input": x[i:i + 100]})[0] for i in range(0, len(x), 100)])


def latency_pair_ms(ref_path: str, path: str, x: np.ndarray, batch: int, rounds: int = 15) -> tuple[float, float]:
    """Best per-run ms of the reference and the candidate, timed in interleaved rounds (the machine is
    shared: interleaving and taking the best of each makes other load hurt both alike)."""
    from onnxshrink.validate import best_of_rounds

    best = best_of_rounds([session(ref_path), session(path)], {"input": x[:batch]}, rounds, min_seconds=0.03)
    return best[0] * 1e3, best[1] * 1e3


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def rel_l2(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref))


def run(model: str, spec: str, calib: str, out_dir: str, tag: str) -> tuple[str, object, float]:
    t0 = time.perf_counter()
    res = onnxshrink.optimize(str(MODELS / model), passes=spec, data=calib, validate=False)
    seconds = time.perf_counter() - t0
    path = os.path.join(out_dir, f"{tag}.onnx")
    res.save(path, force=True)
    return path, res.report, seconds


def bench_bert(out_dir: str, quick: bool) -> list[dict]:
    calib = str(MODELS / "digits_seq_calib.npz")
    x = np.load(MODELS / "digits_seq_test.npz")["input"]
    y = np.load(MODELS / "digits_test_labels.npy")
    ref_path, ref_rep, _ = run("bert_tiny.onnx", "fold", calib, out_dir, "bert_ref")
    ref = logits(ref_path, x)
    rows = [{"model": "bert_tiny", "config": "fold (fp32 reference)", "params": ref_rep.after.params,
             "param_reduction": 0.0, "cosine": 1.0, "rel_l2": 0.0, "top1": float((ref.argmax(1) == y).mean()),
             "seconds": None}]
    configs = [f"lowrank(method={m},ratio={r},round_to=4)" for r in ((0.3,) if quick else (0.3, 0.4, 0.5))
               for m in ("svd", "asvd")]
    configs += [f"lowrank(method={m},budget={b})" for b in ((0.1,) if quick else (0.05, 0.1, 0.2))
                for m in ("svd", "asvd")]
    if not quick:
        configs.append("lowrank(method=asvd,budget=0.05,refit=none)")
    for i, c in enumerate(configs):
        path, rep, secs = run("bert_tiny.onnx", f"fold,{c}", calib, out_dir, f"bert_{i}")
        out = logits(path, x)
        rows.append({"model": "bert_tiny", "config": c, "params": rep.after.params,
                     "param_reduction": 1 - rep.after.params / ref_rep.after.params,
                     "cosine": cosine(ref, out), "rel_l2": rel_l2(ref, out),
                     "top1": float((out.argmax(1) == y).mean()), "seconds": secs})
    return rows


#: Configurations of every CNN, then the extra ones of each model (the headline rows and their refit=none twins).
CNN_CONFIGS = ["budget=0.1,objective=macs", "budget=0.2,objective=macs", "budget=0.2,objective=macs,min_speedup=1.05",
               "budget=0.2,objective=macs,tucker=true", "energy=0.95"]
CNN_EXTRA = {
    "digits_cnn": ["budget=0.2,objective=macs,refit=none"],
    "digits_resnet": ["budget=0.1,objective=macs,refit=none"],
    "digits_mobilenetv2": ["budget=0.3,objective=macs", "budget=0.35,objective=macs", "budget=0.4,objective=macs",
                           "budget=0.35,objective=macs,refit=none", "budget=0.4,objective=macs,refit=none",
                           "budget=0.3,objective=macs,round_to=4", "budget=0.35,objective=macs,round_to=4"],
}
#: Calibration samples the pass reads (its ``samples`` default); the rest of digits_calib is unseen by it.
SAMPLES_READ = 128


def bench_cnn(out_dir: str, quick: bool) -> list[dict]:
    calib = str(MODELS / "digits_calib.npz")
    x = np.load(MODELS / "digits_test.npz")["input"]
    y = np.load(MODELS / "digits_test_labels.npy")
    xu = np.load(MODELS / "digits_calib.npz")["input"][SAMPLES_READ:]
    yu = np.load(MODELS / "digits_calib_labels.npy")[SAMPLES_READ:]
    rows = []
    models = ["digits_cnn.onnx"] if quick else ["digits_cnn.onnx", "digits_resnet.onnx", "digits_mobilenetv2.onnx"]
    for model in models:
        name = model[:-5]
        configs = [f"lowrank({c})" for c in ([CNN_CONFIGS[1]] if quick else CNN_CONFIGS + CNN_EXTRA.get(name, []))]
        ref_path, ref_rep, _ = run(model, "fold", calib, out_dir, f"{name}_ref")
        ref = logits(ref_path, x)
        ref_top1 = float((ref.argmax(1) == y).mean())
        ref_unseen = float((logits(ref_path, xu).argmax(1) == yu).mean())
        rows.append({"model": name, "config": "fold (fp32 reference)", "macs": ref_rep.after.macs,
                     "mac_reduction": 0.0, "params": ref_rep.after.params, "top1": ref_top1, "top1_delta_pt": 0.0,
                     "top1_unseen": ref_unseen, "unseen_delta_pt": 0.0, "splits": 0, "seconds": None})
        for i, c in enumerate(configs):
            path, rep, secs = run(model, f"fold,{c}", calib, out_dir, f"{name}_{i}")
            out = logits(path, x)
            top1 = float((out.argmax(1) == y).mean())
            unseen = float((logits(path, xu).argmax(1) == yu).mean())
            lr = rep.passes[-1]
            b1 = latency_pair_ms(ref_path, path, x, 1)
            b64 = latency_pair_ms(ref_path, path, x, 64)
            rows.append({"model": name, "config": c, "macs": rep.after.macs,
                         "mac_reduction": 1 - rep.after.macs / ref_rep.after.macs, "params": rep.after.params,
                         "top1": top1, "top1_delta_pt": 100 * (top1 - ref_top1), "rel_l2": rel_l2(ref, out),
                         "top1_unseen": unseen, "unseen_delta_pt": 100 * (unseen - ref_unseen),
                         "lat_b1_ms": b1, "lat_b64_ms": b64, "speedup_b1": b1[0] / b1[1], "speedup_b64": b64[0] / b64[1],
                         "splits": lr.counters.get("split", 0), "seconds": secs,
                         "layers": [{k: r[k] for k in ("layer", "rank", "macs_saved", "refit_error", "latency_ms",
                                                       "reason")}
                                    for r in lr.layers if r.get("shape")]})
    return rows


def fmt_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" if i == 0 or c[0] == "config" else "---:" for i, c in enumerate(cols)) + "|"
    out = [head, sep]
    for r in rows:
        cells = []
        for key, _, f in cols:
            v = r.get(key)
            cells.append("-" if v is None else (f.format(v) if f else str(v)))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write all figures to this JSON file")
    ap.add_argument("--quick", action="store_true", help="one configuration per model")
    args = ap.parse_args(argv)
    print(f"onnxruntime {ort.__version__}, {os.cpu_count()} CPU(s)")
    with tempfile.TemporaryDirectory(prefix="bench-lowrank-") as d:
        bert = bench_bert(d, args.quick)
        cnn = bench_cnn(d, args.quick)
    print("\n## bert_tiny (fit on digits_seq_calib, measured on digits_seq_test, 400 samples)\n")
    print(fmt_table(bert, [("config", "config", ""), ("params", "params", "{:,}"),
                           ("param_reduction", "params removed", "{:.1%}"), ("cosine", "cosine to fp32", "{:.4f}"),
                           ("rel_l2", "rel L2", "{:.3f}"), ("top1", "top-1", "{:.4f}"), ("seconds", "pass time s", "{:.1f}")]))
    print("\n## digits CNNs (fit on digits_calib, measured on digits_test, 400 samples)\n")
    print(fmt_table(cnn, [("model", "model", ""), ("config", "config", ""), ("macs", "Conv/Gemm MACs", "{:,}"),
                          ("mac_reduction", "MACs removed", "{:.1%}"), ("splits", "splits", "{}"),
                          ("top1", "top-1", "{:.4f}"), ("top1_delta_pt", "Δ top-1 pt", "{:+.2f}"),
                          ("rel_l2", "rel L2", "{:.3f}"), ("unseen_delta_pt", "Δ top-1 pt unseen calib", "{:+.2f}"),
                          ("lat_b1_ms", "ORT ms b=1 fp32→lowrank", "{0[0]:.3f} → {0[1]:.3f}"),
                          ("lat_b64_ms", "ORT ms b=64 fp32→lowrank", "{0[0]:.2f} → {0[1]:.2f}"),
                          ("seconds", "pass time s", "{:.1f}")]))
    if args.json:
        Path(args.json).write_text(json.dumps({"bert_tiny": bert, "cnn": cnn}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
