"""Detection quality of a quantized YOLO-style detector: fp32 vs onnxshrink quant vs onnxruntime.quantization.

On ``models/digits_detector.onnx`` (output ``[N, cells, 15]``: cx, cy, w, h in pixels, then objectness and
10 class probabilities, decoded in the graph as YOLOv5 exports do), calibrated on
``models/detect_calib.npz`` and scored on the held-out ``models/detect_test.npz`` against
``detect_test_gt.npz`` with ``detect_eval.evaluate`` (numpy: class-wise NMS at 0.5, all-point AP).

Rows (same calibration data for all):

* ``fp32`` — the fixture;
* ``onnxshrink qdq`` / ``qop`` / ``tensorrt`` — ``fold,quant(mode=static[,format=qop|,target=tensorrt])``;
* ``ort quantize_static`` — called as ``bench_quant.py`` does (QDQ, MinMax, per-channel, uint8
  activations / int8 weights), without pre-processing;
* ``ort pre_process + quantize_static`` — the same after ``quant_pre_process`` (ORT's documented workflow:
  shape inference and ORT's graph optimizations, which fuse BN and fold constants).

Columns: mAP@0.5, mAP@0.5:0.95, mean IoU of true positives, F1 at confidence >= 0.25, rel-L2 of the box
columns (0:4) and of the score columns (4:15) against fp32, file size ratio, onnxruntime CPU latency ratio
to fp32 at batch 1 and 32 (``onnxshrink.validate.measure_latency``: one thread, runs interleaved, medians),
and the tool's own time.

``--diagnose`` (default on) finds where the accuracy goes: ablations that keep parts of the detection head
float (onnxruntime: ``nodes_to_exclude``; onnxshrink: ``quant(exclude=...)`` and swapping float weights or
inputs back into the head convs), the scale each quantizer gives the head's tensors, and the column-wise error
at the head's intermediate tensors (whole-tensor rel-L2, as ``onnxshrink compare --per-layer`` ranks layers,
is dominated by the pixel columns).

    python benchmarks/bench_detect.py [--model models/digits_detector.onnx] [--runs 300] [--no-diagnose]
                                      [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import detect_eval  # noqa: E402
from bench_quant import ort_static, ours, session, table  # noqa: E402  (the same calls, side by side)

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
BATCH = 64


# ------------------------------------------------------------------------------------------ running


def predict(path: str | Path, x: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
    """All requested outputs (default: every graph output) over ``x`` in batches of 64, concatenated."""
    s = session(path)
    name = s.get_inputs()[0].name
    parts = [s.run(outputs, {name: x[i:i + BATCH]}) for i in range(0, len(x), BATCH)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def with_outputs(src: str | Path, names: list[str], dst: Path) -> Path:
    """A copy of ``src`` that also returns the tensors ``names`` (float32, shape left to onnxruntime)."""
    m = onnx.load(str(src))
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    onnx.save(m, str(dst))
    return dst


# ------------------------------------------------------------------------------------------- tools


def ort_pre_process(model: Path, out: Path) -> float:
    from onnxruntime.quantization import quant_pre_process

    t = time.perf_counter()
    quant_pre_process(str(model), str(out))
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------- measuring


def score(label: str, path: Path | None, ref: np.ndarray, x: np.ndarray, gt: dict, base_size: int,
          secs: float, error: str = "") -> dict:
    row: dict = {"tool": label}
    out = None
    if path is not None and not error:
        try:
            out = predict(path, x)[0]
        except Exception as e:  # noqa: BLE001 - a model the runtime rejects is a result, not a crash
            error = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    if out is None:
        row.update(error=error, size_ratio=round(os.path.getsize(path) / base_size, 3) if path else None)
        return row
    r = detect_eval.evaluate(out, gt)
    e = detect_eval.output_errors(ref, out)
    row.update(map50=round(r["map50"], 4), map50_95=round(r["map50_95"], 4), mean_iou=round(r["mean_iou"], 4),
               f1_at_025=round(r["f1"], 4), box_rel_l2=round(e["box_rel_l2"], 4),
               score_rel_l2=round(e["score_rel_l2"], 4), size=os.path.getsize(path),
               size_ratio=round(os.path.getsize(path) / base_size, 3), tool_s=round(secs, 2))
    return row


def add_latency(rows: list[dict], paths: dict[str, Path], model: Path, runs: int) -> None:
    """Batch-1 and batch-32 latency (ms, candidate / fp32) of each runnable candidate against fp32
    (measure_latency: one session pair each, runs interleaved, medians)."""
    from onnxshrink.calib import input_specs, load_data
    from onnxshrink.model import load_model
    from onnxshrink.validate import measure_latency

    data = load_data(MODELS / "detect_test.npz", input_specs(load_model(str(model))))
    for row in rows:
        if row["tool"] == "fp32" or "error" in row:
            continue
        for lat in measure_latency(model, paths[row["tool"]], data, batches=(1, 32), runs=runs):
            b = lat.batch
            row[f"lat{b}_ms"] = f"{lat.after_ms:.3f} / {lat.before_ms:.3f}"
            row[f"lat{b}_ratio"] = round(lat.ratio, 3)


# ---------------------------------------------------------------------------------- head structure


def head_parts(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Name the nodes of a YOLO-style head: the last Conv on each path to the output ("heads"), and in the
    decode region after them: Reshape/Transpose straight after a head ("relayout"), "sigmoid", Concat and
    the Reshapes that follow a Concat ("concat"), everything else ("arith": Split, Mul, Add, Pow)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    region: list[onnx.NodeProto] = []
    heads: list[onnx.NodeProto] = []
    seen: set[str] = set()
    stack = [producer[o.name] for o in model.graph.output if o.name in producer]
    while stack:  # walk back from the outputs until the first Conv on every path
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        if n.op_type == "Conv":
            heads.append(n)
            continue
        region.append(n)
        stack += [producer[i] for i in n.input if i in producer]
    parts: dict[str, list[str]] = {"heads": sorted(h.name for h in heads), "relayout": [], "sigmoid": [],
                                   "concat": [], "arith": []}
    head_outs = {o for h in heads for o in h.output}
    relayout_outs = set(head_outs)
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    for n in sorted(region, key=lambda n: order[n.name]):
        if n.op_type == "Constant":
            continue
        if n.op_type in ("Reshape", "Transpose") and n.input[0] in relayout_outs:
            parts["relayout"].append(n.name)
            relayout_outs.update(n.output)
        elif n.op_type == "Sigmoid":
            parts["sigmoid"].append(n.name)
        elif n.op_type == "Concat" or (n.op_type == "Reshape" and producer.get(n.input[0]) is not None
                                       and producer[n.input[0]].op_type == "Concat"):
            parts["concat"].append(n.name)
        else:
            parts["arith"].append(n.name)
    return parts


def qparams_of(model: onnx.ModelProto, tensors: list[str]) -> dict[str, tuple[float, int, float, float]]:
    """(scale, zero point, lowest, highest representable value) of the QuantizeLinear reading each tensor."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in tensors and n.input[1] in inits:
            s = float(np.asarray(inits[n.input[1]]).reshape(-1)[0])
            z = int(np.asarray(inits[n.input[2]]).reshape(-1)[0]) if len(n.input) > 2 and n.input[2] in inits else 0
            lo, hi = (0, 255) if inits.get(n.input[2], np.zeros(1, np.uint8)).dtype == np.uint8 else (-128, 127)
            out[n.input[0]] = (s, z, (lo - z) * s, (hi - z) * s)
    return out


def as_consumed(model: onnx.ModelProto, tensors: list[str]) -> dict[str, str]:
    """For each tensor, the name its consumers read: the DequantizeLinear output when a Q/DQ pair follows it
    (the value after quantization), else the tensor itself."""
    q_of = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    dq_of = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {t: dq_of.get(q_of.get(t, ""), t) for t in tensors}


def column_errors(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """rel-L2 of the whole tensor, of its first 4 (box) and of its other (score) last-axis columns."""
    e = detect_eval.output_errors(ref, cand)
    whole = float(np.linalg.norm(cand.astype(np.float64) - ref) / np.linalg.norm(ref.astype(np.float64)))
    return {"whole_rel_l2": round(whole, 4), "box_rel_l2": round(e["box_rel_l2"], 4),
            "score_rel_l2": round(e["score_rel_l2"], 4)}


def float_head_surgery(qmodel: Path, fp32: Path, head: list[str], what: str, dst: Path) -> Path:
    """A copy of the quantized model with the head convs' weights+bias (``what="weights"``) or input
    activation (``"input"``) taken back to float: weights and bias from the fp32 model, the input from the
    float tensor in front of its QuantizeLinear/DequantizeLinear pair."""
    m = onnx.load(str(qmodel))
    ref = {i.name: i for i in onnx.load(str(fp32)).graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    ref_nodes = {n.name: n for n in onnx.load(str(fp32)).graph.node}
    for n in m.graph.node:
        if n.name not in head:
            continue
        if what == "weights":
            for slot, name in enumerate(ref_nodes[n.name].input[1:], start=1):
                t = onnx.TensorProto()
                t.CopyFrom(ref[name])
                t.name = f"{name}_float_again"
                m.graph.initializer.append(t)
                n.input[slot] = t.name
        else:
            dq = producer.get(n.input[0])
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                n.input[0] = q.input[0]
    onnx.save(m, str(dst))
    return dst


def diagnose(model: Path, calib: Path, x: np.ndarray, gt: dict, ref: np.ndarray, tmp: Path,
             ort_pre: Path | None, ort_q: Path | None, ours_q: Path, ours_trt: Path | None = None) -> dict:
    """Ablations, quantization parameters and column-wise errors in the detection head (see module doc)."""
    base = model.stat().st_size
    fp32 = onnx.load(str(model))
    parts = head_parts(fp32)
    result: dict = {"head_parts": parts, "ablations": [], "qparams": {}, "tensors": []}

    def ablate(label: str, path: Path, secs: float | None = None) -> None:
        row = score(label, path, ref, x, gt, base, secs or 0.0)
        row.pop("size", None)
        if secs is None:  # graph surgery or an already measured model: no tool time
            row.pop("tool_s", None)
        result["ablations"].append(row)

    # onnxruntime: keep parts of the head float (nodes_to_exclude), on the pre-processed model
    if ort_pre is not None:
        pre_parts = head_parts(onnx.load(str(ort_pre)))
        logits = pre_parts["heads"] + pre_parts["relayout"] + pre_parts["sigmoid"]
        sets = {
            "ort: all quantized": [],
            "ort: concats float": pre_parts["concat"],
            "ort: decode arithmetic float (Split/Mul/Add/Pow)": pre_parts["arith"],
            "ort: head convs float": pre_parts["heads"],
            "ort: logits float (head convs, relayout, Sigmoid)": logits,
            "ort: logits + concats float": logits + pre_parts["concat"],
            "ort: whole head float (convs + decode + concats)": logits + pre_parts["arith"] + pre_parts["concat"],
        }
        for label, excl in sets.items():
            out = tmp / "ablation_ort.onnx"
            ablate(label, out, ort_static(ort_pre, calib, out, exclude=excl))
        # the one uint8 scale onnxruntime gives the output, applied to the fp32 output alone
        q = onnx.load(str(ort_q))
        producer = {o: n for n in q.graph.node for o in n.output}
        dq = producer.get(q.graph.output[0].name)
        q_out = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        out_tensor = q_out.input[0] if q_out is not None and q_out.op_type == "QuantizeLinear" else ""
        qp = qparams_of(q, [out_tensor])
        if qp:
            s, z, lo, hi = next(iter(qp.values()))
            fake = (np.clip(np.round(ref / s) + z, 0, 255) - z) * s
            r = detect_eval.evaluate(fake, gt)
            e = detect_eval.output_errors(ref, fake)
            result["ablations"].append({"tool": f"fp32 output through ORT's output Q/DQ alone (scale {s:.4f})",
                                        "map50": round(r["map50"], 4), "map50_95": round(r["map50_95"], 4),
                                        "mean_iou": round(r["mean_iou"], 4), "f1_at_025": round(r["f1"], 4),
                                        "box_rel_l2": round(e["box_rel_l2"], 4),
                                        "score_rel_l2": round(e["score_rel_l2"], 4)})
        head_tensors = [o for n in q.graph.node if n.name in set(pre_parts["heads"] + pre_parts["concat"])
                        for o in n.output]
        result["qparams"]["ort"] = {k: [round(v, 5) for v in vals] for k, vals in
                                    qparams_of(q, head_tensors + [out_tensor]).items()}

    # onnxshrink: which head tensors it quantizes, and ablations of the head convs
    qm = onnx.load(str(ours_q))
    region = set(parts["relayout"] + parts["sigmoid"] + parts["concat"] + parts["arith"])
    region_inputs = {i for n in qm.graph.node if n.name in region for i in n.input}
    quantized = {n.input[0] for n in qm.graph.node if n.op_type == "QuantizeLinear"}
    result["ours_quantized_decode_tensors"] = sorted(region_inputs & quantized)
    head_out = [o for n in qm.graph.node if n.name in parts["heads"] for o in n.output]
    result["ours_quantized_head_outputs"] = sorted(set(head_out) & quantized)
    ablate("onnxshrink qdq: all quantized", ours_q)
    out = tmp / "ablation_ours.onnx"
    pattern = "|".join(parts["heads"])
    ablate("onnxshrink qdq: head convs float (exclude=)", out,
           ours(model, f"fold,quant(mode=static,exclude={pattern})", calib, out))
    ablate("onnxshrink qdq: head conv weights+bias float", float_head_surgery(
        ours_q, model, parts["heads"], "weights", tmp / "ours_w.onnx"))
    ablate("onnxshrink qdq: head conv input float", float_head_surgery(
        ours_q, model, parts["heads"], "input", tmp / "ours_in.onnx"))
    if ours_trt is not None:
        ablate("onnxshrink tensorrt: all quantized", ours_trt)
        ablate("onnxshrink tensorrt: head conv weights+bias float", float_head_surgery(
            ours_trt, model, parts["heads"], "weights", tmp / "ours_trt_w.onnx"))
        ablate("onnxshrink tensorrt: head conv input float", float_head_surgery(
            ours_trt, model, parts["heads"], "input", tmp / "ours_trt_in.onnx"))
    head_in = [n.input[0] for n in fp32.graph.node if n.name in parts["heads"]]
    result["qparams"]["ours"] = {k: [round(v, 5) for v in vals] for k, vals in qparams_of(qm, head_in).items()}

    # column-wise error of the head's [.., 15]-wide tensors: the decode inputs and the per-scale Concats
    wide = [o for n in fp32.graph.node if n.name in set(parts["relayout"] + parts["sigmoid"] + parts["concat"])
            for o in n.output]
    wide.append(fp32.graph.output[0].name)
    wide = list(dict.fromkeys(wide))
    ref_t = dict(zip(wide, predict(with_outputs(model, wide, tmp / "ref_t.onnx"), x, wide)))
    for label, path in (("onnxshrink qdq", ours_q), ("ort pre_process + quantize_static", ort_q)):
        if path is None:
            continue
        names = as_consumed(onnx.load(str(path)), wide)
        try:
            read = list(dict.fromkeys(names.values()))
            got_by_name = dict(zip(read, predict(with_outputs(path, read, tmp / "cand_t.onnx"), x, read)))
            got = {t: got_by_name[names[t]] for t in wide}
        except Exception as e:  # noqa: BLE001
            result["tensors"].append({"tool": label, "error": str(e).splitlines()[0][:160]})
            continue
        for t in wide:
            if ref_t[t].shape[-1] == ref.shape[-1]:
                result["tensors"].append({"tool": label, "tensor": t, "after_qdq": names[t] != t,
                                          **column_errors(ref_t[t], got[t])})
    return result


# ------------------------------------------------------------------------------------------ output


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=MODELS / "digits_detector.onnx")
    ap.add_argument("--calib", type=Path, default=MODELS / "detect_calib.npz")
    ap.add_argument("--test", type=Path, default=MODELS / "detect_test.npz",
                    help="held-out scenes; ground truth from the same name with _gt")
    ap.add_argument("--runs", type=int, default=300, help="latency runs per model and batch size")
    ap.add_argument("--no-diagnose", dest="diagnose", action="store_false", help="skip the ablations")
    ap.add_argument("--keep", type=Path, help="keep the quantized models in this folder")
    ap.add_argument("--json", type=Path, help="write all rows as JSON")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    os.environ.setdefault("ONNXSHRINK_CACHE_DIR", "off")
    x = np.load(args.test)["input"]
    gt = dict(np.load(args.test.with_name(args.test.stem + "_gt.npz")))
    with tempfile.TemporaryDirectory() as d:
        tmp = args.keep or Path(d)
        tmp.mkdir(parents=True, exist_ok=True)
        model = args.model
        ref = predict(model, x)[0]
        base = model.stat().st_size
        paths: dict[str, Path] = {"fp32": model}
        secs: dict[str, float] = {"fp32": 0.0}
        for label, spec in (("onnxshrink qdq", "fold,quant(mode=static)"),
                            ("onnxshrink qop", "fold,quant(mode=static,format=qop)"),
                            ("onnxshrink tensorrt", "fold,quant(mode=static,target=tensorrt)")):
            paths[label] = tmp / (label.replace(" ", "_") + ".onnx")
            secs[label] = ours(model, spec, args.calib, paths[label])
        label = "ort quantize_static"
        paths[label] = tmp / "ort.onnx"
        secs[label] = ort_static(model, args.calib, paths[label])
        pre = tmp / "ort_pre.onnx"
        pre_secs = ort_pre_process(model, pre)
        label = "ort pre_process + quantize_static"
        paths[label] = tmp / "ort_pre_q.onnx"
        secs[label] = pre_secs + ort_static(pre, args.calib, paths[label])
        rows = [score(k, p, ref, x, gt, base, secs[k]) for k, p in paths.items()]
        add_latency(rows, paths, model, args.runs)
        print(table(rows), "\n", flush=True)
        result: dict = {"model": str(model), "rows": rows}
        if args.diagnose:
            ours_q = paths["onnxshrink qdq"]
            ort_q = paths["ort pre_process + quantize_static"]
            diag = diagnose(model, args.calib, x, gt, ref, tmp, pre, ort_q, ours_q, paths["onnxshrink tensorrt"])
            result["diagnose"] = diag
            print("head parts:", json.dumps(diag["head_parts"]))
            print("onnxshrink quantizes decode-region inputs:", diag["ours_quantized_decode_tensors"] or "none",
                  "| head conv outputs:", diag["ours_quantized_head_outputs"] or "none")
            print("\n" + table(diag["ablations"]) + "\n")
            print("quantization parameters (scale, zero point, lowest, highest):")
            for tool, qp in diag["qparams"].items():
                for t, v in qp.items():
                    print(f"  {tool:5s} {t}: {v}")
            print("\n" + table(diag["tensors"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
