"""Corpus sweep: run a pipeline (default ``fold``) over every corpus model and count the outcomes.

For each model: the pipeline runs with validation against the original in onnxruntime on the corpus's own
inputs (or synthetic ones), at the pipeline's tolerance (1e-5 relative L2 for fold). Outcomes:

* ``ok``        — ran, validated (or ORT cannot run the original: ``unverified``), file not larger;
* ``refused``   — the loader refused the input with a clear error (e.g. an invalid test graph);
* ``crashed``   — any other exception: must be 0;
* ``mismatch``  — validation failed: must be 0;
* ``grew``      — the output file is larger than the input: must be 0 for fold;
* ``invalid``   — the output fails the onnx checker although the input passed it: must be 0.

Usage: ``python benchmarks/corpus_sweep.py [--passes fold] [--node-sample N] [--json out.json]``
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import iter_corpus  # noqa: E402

import onnxshrink  # noqa: E402
from onnxshrink.errors import DataError, InputError, ShrinkError  # noqa: E402


def sweep_one(entry, passes: str, workdir: str) -> dict:
    """Run ``passes`` on one corpus entry; return its outcome record."""
    src = os.path.join(workdir, f"{entry.kind}_{entry.name}.onnx")
    onnx.save(entry.model, src)
    rec = {"kind": entry.kind, "name": entry.name, "status": None, "detail": "", "nodes_before": None,
           "nodes_after": None, "bytes_before": os.path.getsize(src), "bytes_after": None, "validation": None}
    result = None
    try:
        try:
            result = onnxshrink.optimize(src, passes, data=entry.inputs)
        except DataError:
            # the corpus inputs do not fit (e.g. optional/sequence inputs): fall back to synthetic inputs
            result = onnxshrink.optimize(src, passes)
        rep = result.report
        try:
            onnx.checker.check_model(str(result._artifact))
        except Exception as e:
            rec["status"] = "invalid"
            rec["detail"] = f"output fails the onnx checker: {str(e).splitlines()[0]}"
            return rec
        rec.update(nodes_before=rep.before.nodes, nodes_after=rep.after.nodes, bytes_after=rep.after.file_bytes,
                   validation=rep.verdict, detail=rep.validation.reason if rep.validation else "")
        if rep.verdict == "failed":
            rec["status"] = "mismatch"
        elif rep.after.file_bytes is not None and rep.after.file_bytes > rec["bytes_before"]:
            rec["status"] = "grew"
            rec["detail"] = f"{rec['bytes_before']} -> {rep.after.file_bytes} bytes"
        else:
            rec["status"] = "ok" if rep.verdict == "passed" else "unverified"
    except InputError as e:
        rec["status"] = "refused"
        rec["detail"] = str(e).splitlines()[0]
    except ShrinkError as e:
        rec["status"] = "crashed" if e.exit_code == 1 else "refused"
        rec["detail"] = str(e).splitlines()[0]
    except Exception as e:  # a bug
        rec["status"] = "crashed"
        rec["detail"] = f"{type(e).__name__}: {e}".splitlines()[0] + " | " + traceback.format_exc().splitlines()[-3].strip()
    finally:
        if result is not None:
            result.close()
        os.remove(src)
    return rec


def run_sweep(passes: str = "fold", kinds=None, node_sample_every: int = 1, verbose: bool = False) -> list[dict]:
    """Sweep the corpus; return one record per model."""
    records = []
    with tempfile.TemporaryDirectory() as workdir:
        kw = {"node_sample_every": node_sample_every}
        if kinds:
            kw["kinds"] = tuple(kinds)
        for entry in iter_corpus(**kw):
            t0 = time.perf_counter()
            rec = sweep_one(entry, passes, workdir)
            rec["seconds"] = round(time.perf_counter() - t0, 3)
            records.append(rec)
            if verbose and rec["status"] not in ("ok", "unverified"):
                print(f"  {rec['status']:9} {rec['kind']}/{rec['name']}: {rec['detail']}", flush=True)
    return records


def summarize(records: list[dict]) -> dict:
    """Totals: outcome counts and node reduction over models that ran."""
    counts = collections.Counter(r["status"] for r in records)
    ran = [r for r in records if r["nodes_before"] is not None]
    nb = sum(r["nodes_before"] for r in ran)
    na = sum(r["nodes_after"] for r in ran)
    by_kind = collections.defaultdict(lambda: [0, 0, 0])
    for r in ran:
        k = by_kind[r["kind"]]
        k[0] += 1
        k[1] += r["nodes_before"]
        k[2] += r["nodes_after"]
    return {
        "models": len(records),
        "outcomes": dict(counts),
        "nodes_before": nb,
        "nodes_after": na,
        "node_reduction": (1 - na / nb) if nb else 0.0,
        "by_kind": {k: {"models": v[0], "nodes_before": v[1], "nodes_after": v[2]} for k, v in sorted(by_kind.items())},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", default="fold")
    ap.add_argument("--node-sample", type=int, default=1, help="take every Nth node test case (1 = all)")
    ap.add_argument("--kinds", nargs="*", help="node pytorch-converted pytorch-operator simple light models")
    ap.add_argument("--json", help="write all records and the summary to this file")
    args = ap.parse_args()
    import logging

    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    t0 = time.perf_counter()
    records = run_sweep(args.passes, args.kinds, args.node_sample, verbose=True)
    summary = summarize(records)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "records": records}, indent=2))
    bad = sum(summary["outcomes"].get(k, 0) for k in ("crashed", "mismatch", "grew", "invalid"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
