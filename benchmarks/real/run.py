"""The real-model table: onnxshrink's pipelines and the anchors on the same models and data, in one run.

    python benchmarks/real/run.py [--models ...] [--passes SPEC ...] [--tools ...] [--json out.json] [--quick]

For every case (``fetch.py`` prepares it first) and every tool:

1. the tool runs in its own child process (onnxshrink's CLI; ``anchor_tools.py`` for onnxsim, onnxslim,
   onnxruntime ``quantize_static``/``quantize_dynamic`` in this venv, NNCF and ModelOpt in their own venvs made
   by ``anchors_env.sh``); wall time and peak RSS come from ``os.wait4`` on that child (``ru_maxrss`` of the
   child and its waited-for descendants, so per tool, not cumulative); a failure keeps its last error line;
2. the result is scored in a forked child (a crash in onnxruntime on a broken result costs one row, not the
   run): the case's task metrics, the output difference to fp32 on the first eval samples (rel-L2 and
   cosine of every float output, ZipMap maps read in key order; worst over outputs), and onnxruntime CPU
   latency against fp32 with one thread at each of the case's batch sizes: both sessions timed in
   interleaved rounds (``onnxshrink.validate.interleaved_times``), ratio of the medians.

onnxshrink rows run with ``--force`` so a result that fails validation (exit 3) is still scored; its verdict
is in the row. Exit 2 (refused input) is a row with the error line. Prints one table and writes JSON with
``cpu_info()`` (CPU model, AVX2/AVX-512/VNNI/AMX flags, onnxruntime version).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import common  # noqa: E402
import fetch  # noqa: E402

log = logging.getLogger("run")
VENVS = Path(os.environ.get("ANCHOR_VENVS", "/work/venvs"))
ANCHORS = ["onnxsim", "onnxslim", "ort_static", "ort_dynamic", "nncf", "modelopt"]
TOOLS = ["onnxshrink", *ANCHORS]
NEEDS_CALIB = {"ort_static", "nncf", "modelopt"}


def default_specs(case: common.Case) -> list[str]:
    """onnxshrink pipelines for a case: the four everywhere, prune on CNNs, lowrank on MLP/attention."""
    specs = ["fold", "fold,quant(mode=static)", "quant(mode=dynamic)", "quant(mode=weights)"]
    fam = case.family.lower()
    if "cnn" in fam:
        specs.append("fold,prune(target_macs=0.7)")
    if any(k in fam for k in ("transformer", "mlp", "attention")):
        specs.append("fold,lowrank")
    return specs


@dataclasses.dataclass
class Row:
    case: str
    tool: str
    status: str = "ok"  # ok | failed | timeout | eval-failed
    error: str = ""
    verdict: str = ""  # onnxshrink's validation verdict (passed / failed / skipped)
    size_ratio: float | None = None
    bytes: int | None = None
    nodes: int | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    rel_l2: float | None = None
    cosine: float | None = None
    latency: dict[str, float] = dataclasses.field(default_factory=dict)  # "b1" -> ratio to fp32
    latency_ms: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # "b1" -> [fp32, this]
    wall_s: float | None = None
    peak_rss_mb: float | None = None


# --------------------------------------------------------------------------- child processes

def last_line(*texts: str) -> str:
    for t in texts:
        lines = [ln.strip() for ln in t.splitlines() if ln.strip()]
        errs = [ln for ln in lines if ln.startswith(("error:", "Error", "RuntimeError", "ValueError", "KeyError",
                                                     "TypeError", "AssertionError", "onnxruntime", "Exception"))
                or "Error:" in ln or "Error(" in ln]
        if errs:
            return errs[-1][:400]
        if lines:
            return lines[-1][:400]
    return ""


def run_child(cmd: list[str], log_base: Path, timeout: float) -> tuple[int, float, float, str]:
    """Run ``cmd``; returns (exit code or -signal, wall seconds, peak RSS MB, last error line)."""
    out, err = log_base.with_suffix(".stdout"), log_base.with_suffix(".stderr")
    with open(out, "w") as fo, open(err, "w") as fe:
        t0 = time.perf_counter()
        import subprocess

        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, start_new_session=True)
        timer = threading.Timer(timeout, lambda: os.killpg(p.pid, signal.SIGKILL))
        timer.start()
        _pid, status, ru = os.wait4(p.pid, 0)
        timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
    rc = p.returncode
    msg = "" if rc == 0 else last_line(err.read_text(errors="replace"), out.read_text(errors="replace"))
    if rc == -signal.SIGKILL and wall >= timeout:
        msg = f"timeout after {timeout:.0f}s"
    return rc, wall, ru.ru_maxrss / 1024.0, msg


def tool_command(tool: str, spec: str | None, case: common.Case, out: Path, report: Path) -> list[str]:
    if tool == "onnxshrink":
        exe = Path(sys.executable).parent / "onnxshrink"
        base = [str(exe)] if exe.exists() else [sys.executable, "-c", "from onnxshrink.cli import main; main()"]
        return [*base, "optimize", str(case.onnx), "-o", str(out), "-p", spec or "fold", "--data", str(case.calib),
                "--report", str(report), "--no-latency", "--force", "-q"]
    py = sys.executable
    if tool in ("nncf", "modelopt"):
        py = str(VENVS / tool / "bin" / "python")
    cmd = [py, str(HERE / "anchor_tools.py"), tool, str(case.onnx), str(out)]
    if tool in NEEDS_CALIB:
        cmd += ["--calib", str(case.calib)]
    if tool == "nncf" and "transformer" in case.family.lower():
        cmd.append("--transformer")
    return cmd


# --------------------------------------------------------------------------- scoring (in a forked child)

def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _as_float(o: Any) -> np.ndarray | None:
    if isinstance(o, list) and o and isinstance(o[0], dict):
        keys = sorted(o[0])
        return np.array([[r[k] for k in keys] for r in o], np.float64)
    a = np.asarray(o)
    return a.astype(np.float64) if a.dtype.kind == "f" else None


def _feeds(sess, npz: Path) -> dict[str, np.ndarray]:
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    names = [i.name for i in sess.get_inputs()]
    if not set(names) <= set(arrays):
        arrays = dict(zip(names, arrays.values()))
    return {k: arrays[k] for k in names}


def output_diff(ref: Path, cand: Path, npz: Path, n: int) -> tuple[float, float]:
    """Worst rel-L2 and worst cosine over the float outputs, on the first ``n`` eval samples, batch 1."""
    a, b = _session(ref), _session(cand)
    feeds = _feeds(a, npz)
    total = len(next(iter(feeds.values())))
    ra: list[list[np.ndarray]] = []
    rb: list[list[np.ndarray]] = []
    for i in range(min(n, total)):
        f = {k: v[i:i + 1] for k, v in feeds.items()}
        ra.append(a.run(None, f))
        rb.append(b.run(None, f))
    worst_rel, worst_cos = 0.0, 1.0
    for j in range(len(ra[0])):
        xs = [_as_float(r[j]) for r in ra]
        ys = [_as_float(r[j]) for r in rb]
        if any(x is None for x in xs) or any(y is None for y in ys):
            continue
        x = np.concatenate([v.ravel() for v in xs])
        y = np.concatenate([v.ravel() for v in ys])
        if x.shape != y.shape:
            return float("nan"), float("nan")
        nx = np.linalg.norm(x)
        worst_rel = max(worst_rel, float(np.linalg.norm(y - x) / nx) if nx else float(np.linalg.norm(y)))
        den = nx * np.linalg.norm(y)
        worst_cos = min(worst_cos, float(x @ y / den) if den else 1.0)
    return worst_rel, worst_cos


def latency(ref: Path, cand: Path, npz: Path, batches: tuple[int, ...], budget_s: float,
            max_runs: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median-latency ratio cand/ref per batch size, 1 thread, interleaved rounds sized to ``budget_s``."""
    from onnxshrink.validate import interleaved_times

    a, b = _session(ref), _session(cand)
    feeds = _feeds(a, npz)
    ratios, ms = {}, {}
    for bs in batches:
        dims = [i.shape[0] for i in a.get_inputs()]
        if bs > 1 and any(isinstance(d, int) and d != bs for d in dims):
            continue  # fixed batch
        f = {}
        for k, v in feeds.items():
            reps = int(np.ceil(bs / len(v)))
            f[k] = np.concatenate([v] * reps)[:bs] if reps > 1 else v[:bs]
        t = time.perf_counter()
        a.run(None, f)
        one = max(time.perf_counter() - t, 1e-4)
        runs = int(min(max_runs, max(5, budget_s / (2 * one))))
        ta, tb = interleaved_times([a, b], f, runs, warmup=2)
        ma, mb = float(np.median(ta)), float(np.median(tb))
        ratios[f"b{bs}"] = mb / ma
        ms[f"b{bs}"] = [ma * 1e3, mb * 1e3]
    return ratios, ms


def score(case: common.Case, path: Path, opts: Opts) -> dict[str, Any]:
    res: dict[str, Any] = {}
    try:
        res["metrics"] = {k: float(v) for k, v in case.evaluate(path).items()}
        res["rel_l2"], res["cosine"] = output_diff(case.onnx, path, case.eval, opts.diff_samples)
        if opts.latency_budget > 0:
            res["latency"], res["latency_ms"] = latency(case.onnx, path, case.eval, case.latency_batches,
                                                        opts.latency_budget, opts.max_runs)
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:400]
    return res


def score_in_child(case: common.Case, path: Path, opts: Opts, timeout: float) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    q = ctx.SimpleQueue()
    p = ctx.Process(target=lambda: q.put(score(case, path, opts)))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        return {"error": f"scoring timeout after {timeout:.0f}s"}
    if q.empty():
        return {"error": f"scoring process died (exit {p.exitcode})"}
    return q.get()


# --------------------------------------------------------------------------- the table

def model_facts(path: Path) -> tuple[int, int]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
    return size, len(m.graph.node)


def run_case(case: common.Case, opts: Opts, work: Path) -> list[Row]:
    rows: list[Row] = []
    work.mkdir(parents=True, exist_ok=True)
    base_bytes, base_nodes = model_facts(case.onnx)
    fp32 = Row(case.name, "fp32", bytes=base_bytes, nodes=base_nodes, size_ratio=1.0)
    got = score_in_child(case, case.onnx, dataclasses.replace(opts, latency_budget=0), opts.score_timeout)
    fp32.metrics = got.get("metrics", {})
    fp32.rel_l2, fp32.cosine = 0.0, 1.0
    if "error" in got:
        fp32.status, fp32.error = "eval-failed", got["error"]
    rows.append(fp32)
    log.info("%s fp32: %s", case.name, fp32.metrics)
    jobs: list[tuple[str, str | None]] = []
    for tool in opts.tools:
        if tool == "onnxshrink":
            jobs += [("onnxshrink", s) for s in (opts.passes or default_specs(case))]
        else:
            jobs.append((tool, None))
    for tool, spec in jobs:
        label = f"onnxshrink {spec}" if spec else tool
        slug = "".join(c if c.isalnum() else "_" for c in label)
        out, report = work / f"{slug}.onnx", work / f"{slug}.report.json"
        for stale in (out, report):
            stale.unlink(missing_ok=True)
        row = Row(case.name, label)
        if tool in ("nncf", "modelopt") and not (VENVS / tool / "bin" / "python").exists():
            row.status, row.error = "failed", f"no venv {VENVS / tool} (run benchmarks/real/anchors_env.sh)"
            rows.append(row)
            continue
        cmd = tool_command(tool, spec, case, out, report)
        rc, row.wall_s, row.peak_rss_mb, msg = run_child(cmd, work / slug, opts.tool_timeout)
        if tool == "onnxshrink" and report.exists():
            try:
                row.verdict = str(json.loads(report.read_text()).get("verdict", ""))
            except (OSError, ValueError):
                pass
        if rc != 0:
            row.error = f"exit {rc}: {msg}"
            if not (tool == "onnxshrink" and rc == 3 and out.exists()):
                row.status = "timeout" if "timeout" in msg else "failed"
                rows.append(row)
                log.info("%s %s: %s", case.name, label, row.error)
                continue
        if not out.exists():
            row.status, row.error = "failed", "tool exited 0 but wrote no model"
            rows.append(row)
            continue
        row.bytes, row.nodes = model_facts(out)
        row.size_ratio = row.bytes / base_bytes
        got = score_in_child(case, out, opts, opts.score_timeout)
        row.metrics = got.get("metrics", {})
        row.rel_l2, row.cosine = got.get("rel_l2"), got.get("cosine")
        row.latency, row.latency_ms = got.get("latency", {}), got.get("latency_ms", {})
        if "error" in got:
            row.status = "eval-failed"
            row.error = (row.error + "; " if row.error else "") + got["error"]
        rows.append(row)
        log.info("%s %s: %s %s lat=%s (%.0fs, %.0f MB)", case.name, label, case.primary,
                 row.metrics.get(case.primary), row.latency, row.wall_s or 0, row.peak_rss_mb or 0)
    return rows


@dataclasses.dataclass
class Opts:
    tools: list[str]
    passes: list[str] | None
    diff_samples: int
    latency_budget: float
    max_runs: int
    tool_timeout: float
    score_timeout: float


def _f(v: float | None, fmt: str) -> str:
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)


def table(rows: list[Row], cases: dict[str, common.Case]) -> str:
    head = ["case", "tool", "size×", "nodes", "primary", "other metrics", "relL2", "cos", "valid", "lat b1×",
            "lat bN×", "wall s", "RSS MB", "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c = cases.get(r.case)
        prim = c.primary if c else ""
        pv = r.metrics.get(prim)
        others = ", ".join(f"{k} {v:.3f}" for k, v in r.metrics.items() if k != prim)
        bn = [k for k in r.latency if k != "b1"]
        cells = [r.case, r.tool, _f(r.size_ratio, ".3f"), _f(r.nodes, "d"),
                 f"{prim} {_f(pv, '.4f')}" if prim else "", others, _f(r.rel_l2, ".3g"), _f(r.cosine, ".4f"),
                 r.verdict or ("—" if r.tool != "fp32" else ""), _f(r.latency.get("b1"), ".2f"),
                 (f"{_f(r.latency[bn[0]], '.2f')} ({bn[0]})" if bn else "—"), _f(r.wall_s, ".0f"),
                 _f(r.peak_rss_mb, ".0f"), (r.status + ": " + r.error if r.status != "ok" else r.error)[:160]]
        lines.append("| " + " | ".join(str(x).replace("|", "/") for x in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="case names (default: all)")
    ap.add_argument("--passes", nargs="*", help="onnxshrink pass specs (default: per case, see default_specs)")
    ap.add_argument("--tools", nargs="*", default=TOOLS, help=f"subset of {TOOLS}")
    ap.add_argument("--json", type=Path, default=None, help="write the rows, CPU and versions here")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    ap.add_argument("--quick", action="store_true", help="fewer diff samples and latency runs (development)")
    ap.add_argument("--tool-timeout", type=float, default=1500.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for t in args.tools:
        if t not in TOOLS:
            raise SystemExit(f"error: unknown tool {t}; known: {TOOLS}")
    opts = Opts(tools=args.tools, passes=args.passes, diff_samples=4 if args.quick else 16,
                latency_budget=1.5 if args.quick else 6.0, max_runs=10 if args.quick else 40,
                tool_timeout=min(args.tool_timeout, 600.0) if args.quick else args.tool_timeout,
                score_timeout=900.0)
    t0 = time.perf_counter()
    specs = fetch.select(fetch.case_specs(), args.models)
    cases, failed = fetch.prepare(specs)
    fetch_s = time.perf_counter() - t0
    rows: list[Row] = [Row(n, "prepare", status="failed", error=e) for n, e in failed.items()]
    for case in cases:
        rows += run_case(case, opts, common.CACHE / "runs" / case.name)
        sys.stdout.write(table([r for r in rows if r.case == case.name], {case.name: case}) + "\n\n")
        sys.stdout.flush()
    total = time.perf_counter() - t0
    by_name = {c.name: c for c in cases}
    text = table(rows, by_name)
    sys.stdout.write("\n" + text + f"\n\nfetch {fetch_s:.0f}s, total {total:.0f}s\n")
    meta = {"cpu": common.cpu_info(), "quick": args.quick, "fetch_seconds": round(fetch_s, 1),
            "total_seconds": round(total, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "cases": {c.name: {"primary": c.primary, "higher_is_better": c.higher_is_better, "family": c.family,
                               "exporter": c.exporter, "source": c.source, "notes": c.notes,
                               "latency_batches": list(c.latency_batches)} for c in cases},
            "versions": _versions()}
    if args.json:
        args.json.write_text(json.dumps({**meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1,
                                        default=str))
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for d in ("onnxshrink", "onnxruntime", "onnx", "onnxsim", "onnxslim", "scikit-learn", "skl2onnx"):
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            pass
    for tool, dist in (("nncf", "nncf"), ("modelopt", "nvidia-modelopt")):
        py = VENVS / tool / "bin" / "python"
        if py.exists():
            import subprocess

            r = subprocess.run([str(py), "-c", f"from importlib import metadata as m; print(m.version('{dist}'),"
                                " m.version('onnxruntime'))"], capture_output=True, text=True)
            out[dist] = r.stdout.strip().replace(" ", " (onnxruntime ") + ")" if r.returncode == 0 else "?"
    return out


if __name__ == "__main__":
    sys.exit(main())
