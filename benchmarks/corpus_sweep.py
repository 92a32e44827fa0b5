"""Corpus sweep: every registered pass, with its default options, over every corpus model; count outcomes.

The corpus (``corpus.py``) is every model the ``onnx`` package ships as backend test data plus ``models/``.
Each pass runs alone (``optimize(model, "<pass>")``) and is validated against the original in onnxruntime
on the corpus's own inputs (or deterministic synthetic ones) at the pass's declared tolerance. A pass that
needs data gets the corpus inputs, else synthetic inputs. Outcome of one (pass, model):

* ``applied``   — the pass changed the model, and the result validated (or could not be run: see
  ``unverified``), passes the onnx checker and, for ``fold``, is not larger than the input;
* ``declined``  — the pass left the model as it was; its decline reasons are counted;
* ``refused``   — the loader or the pass refused the input with a clear error (exit code 2);
* ``crashed``   — any other exception or exit code 1: **must be 0**;
* ``mismatch``  — validation failed (output changed beyond the pass's declared tolerance): **must be 0**;
* ``invalid``   — the output fails the onnx checker although the input passed it: **must be 0**;
* ``grew``      — ``fold`` only (it promises never to grow a model): the output file is larger: **must be 0**.

``unverified`` counts applied/declined results onnxruntime could not check (it cannot run the original:
old-opset kernels, training ops, exotic types).

Usage::

    python benchmarks/corpus_sweep.py                       # every registered pass, whole corpus
    python benchmarks/corpus_sweep.py --passes fold,quant   # some passes
    python benchmarks/corpus_sweep.py --node-sample 10 --json out.json
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
from onnxshrink.registry import all_passes, get_pass  # noqa: E402

BAD = ("crashed", "mismatch", "invalid", "grew")
STATUSES = ("applied", "declined", "refused", *BAD)


def _synthetic(src: str):
    from onnxshrink.calib import input_specs, synthetic_data
    from onnxshrink.model import load_model

    return synthetic_data(input_specs(load_model(src)), num_samples=4)[0]


def sweep_one(entry, pass_name: str, src: str) -> dict:
    """Run one pass (defaults) on one saved corpus model; return its outcome record."""
    rec = {"pass": pass_name, "kind": entry.kind, "name": entry.name, "status": None, "detail": "",
           "declines": {}, "verified": False, "nodes_before": None, "nodes_after": None,
           "bytes_before": os.path.getsize(src), "bytes_after": None}
    needs_data = get_pass(pass_name).cls.needs_data
    result = None
    try:
        try:
            data = entry.inputs
            if data is None and needs_data:
                data = _synthetic(src)
            result = onnxshrink.optimize(src, pass_name, data=data, latency=False, cache=False)
        except DataError:
            # the corpus inputs do not fit (optional/sequence inputs), or there are none: synthetic inputs
            result = onnxshrink.optimize(src, pass_name, data=_synthetic(src) if needs_data else None,
                                         latency=False, cache=False)
        rep = result.report
        record = rep.passes[0]
        rec.update(nodes_before=rep.before.nodes, nodes_after=rep.after.nodes, bytes_after=rep.after.file_bytes,
                   declines=dict(record.declines), verified=rep.verdict == "passed")
        try:
            onnx.checker.check_model(str(result._artifact))
        except Exception as e:
            rec["status"] = "invalid"
            rec["detail"] = f"output fails the onnx checker: {str(e).splitlines()[0]}"
            return rec
        if rep.verdict == "failed":
            rec["status"] = "mismatch"
            rec["detail"] = rep.validation.reason
        elif pass_name == "fold" and rep.after.file_bytes is not None and rep.after.file_bytes > rec["bytes_before"]:
            rec["status"] = "grew"
            rec["detail"] = f"{rec['bytes_before']} -> {rep.after.file_bytes} bytes"
        else:
            rec["status"] = "applied" if record.modified else "declined"
            if rep.verdict != "passed" and rep.validation is not None:
                rec["detail"] = rep.validation.reason
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
    return rec


def run_sweep(passes: list[str] | str | None = None, kinds=None, node_sample_every: int = 1,
              verbose: bool = False) -> list[dict]:
    """Sweep the corpus with each pass (default: every registered pass); one record per (pass, model)."""
    if passes is None:
        names = [p.name for p in all_passes()]
    elif isinstance(passes, str):
        names = [p.strip() for p in passes.split(",") if p.strip()]
    else:
        names = list(passes)
    for n in names:
        get_pass(n)  # unknown names fail before the sweep
    records = []
    with tempfile.TemporaryDirectory() as workdir:
        kw = {"node_sample_every": node_sample_every}
        if kinds:
            kw["kinds"] = tuple(kinds)
        for entry in iter_corpus(**kw):
            src = os.path.join(workdir, f"{entry.kind}_{entry.name}.onnx")
            onnx.save(entry.model, src)
            before = os.path.getsize(src), os.stat(src).st_mtime_ns
            for name in names:
                t0 = time.perf_counter()
                rec = sweep_one(entry, name, src)
                rec["seconds"] = round(time.perf_counter() - t0, 3)
                if (os.path.getsize(src), os.stat(src).st_mtime_ns) != before:
                    rec["status"], rec["detail"] = "crashed", "the input file was modified"
                records.append(rec)
                if verbose and rec["status"] in BAD:
                    print(f"  {rec['status']:9} {name:8} {rec['kind']}/{rec['name']}: {rec['detail']}", flush=True)
            os.remove(src)
    return records


def summarize(records: list[dict]) -> dict:
    """Per-pass totals: outcome counts, verified count, top decline reasons, node reduction."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["pass"] for r in records):
        rs = [r for r in records if r["pass"] == name]
        counts = collections.Counter(r["status"] for r in rs)
        reasons: collections.Counter[str] = collections.Counter()
        for r in rs:
            reasons.update(r["declines"])
        ran = [r for r in rs if r["nodes_before"] is not None]
        nb = sum(r["nodes_before"] for r in ran)
        na = sum(r["nodes_after"] for r in ran)
        by_kind = collections.defaultdict(lambda: [0, 0, 0])
        for r in ran:
            k = by_kind[r["kind"]]
            k[0] += 1
            k[1] += r["nodes_before"]
            k[2] += r["nodes_after"]
        out[name] = {
            "models": len(rs),
            "outcomes": {s: counts.get(s, 0) for s in STATUSES},
            "verified": sum(1 for r in rs if r["verified"]),
            "unverified": sum(1 for r in rs if r["status"] in ("applied", "declined") and not r["verified"]),
            "top_declines": dict(reasons.most_common(8)),
            "nodes_before": nb,
            "nodes_after": na,
            "node_reduction": (1 - na / nb) if nb else 0.0,
            "by_kind": {k: {"models": v[0], "nodes_before": v[1], "nodes_after": v[2]} for k, v in sorted(by_kind.items())},
        }
    return out


def print_table(summary: dict) -> None:
    cols = ["pass", "models", *STATUSES, "verified", "unverified", "nodes before", "nodes after"]
    rows = [[name, str(s["models"]), *(str(s["outcomes"][k]) for k in STATUSES), str(s["verified"]),
             str(s["unverified"]), f"{s['nodes_before']:,}", f"{s['nodes_after']:,}"] for name, s in summary.items()]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    for name, s in summary.items():
        if s["top_declines"]:
            print(f"\n{name}: top decline reasons")
            for reason, n in s["top_declines"].items():
                print(f"  {n:6}  {reason}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", help="comma list of pass names (default: every registered pass)")
    ap.add_argument("--node-sample", type=int, default=1, help="take every Nth node test case (1 = all)")
    ap.add_argument("--kinds", nargs="*", help="node pytorch-converted pytorch-operator simple light models")
    ap.add_argument("--json", help="write all records and the summary to this file")
    args = ap.parse_args()
    import logging

    for name in ("onnx_ir", "onnxscript", "onnxshrink"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    t0 = time.perf_counter()
    records = run_sweep(args.passes, args.kinds, args.node_sample, verbose=True)
    summary = summarize(records)
    print_table(summary)
    seconds = round(time.perf_counter() - t0, 1)
    print(f"\n{len(records)} runs in {seconds} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "seconds": seconds, "records": records}, indent=2))
    bad = sum(s["outcomes"][k] for s in summary.values() for k in BAD)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
