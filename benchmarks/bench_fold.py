#!/usr/bin/env python
"""Side-by-side benchmark of onnxshrink ``fold`` against onnxsim and onnxslim.

For every model, each tool runs in its own fresh Python process (this same file, ``--worker`` mode), so
its wall time and peak resident memory are its own and not polluted by the other tools or by this driver.
A separate ``--check`` process then runs the original model and every tool's output in onnxruntime on the
same deterministic synthetic inputs (dynamic dims = 1) and calls an output *correct* when every graph
output matches the original within a relative L2 error of 1e-5 (non-float outputs: exactly).

Per model it prints node count (subgraphs included), file size, tool time, peak RSS and correctness; the
summary says for each model whether onnxshrink's node count is <= the smallest node count among the
competitors whose output stayed correct, lists the models where it is not (with the op types that
differ), and prints geometric-mean ratios onnxshrink/onnxsim and onnxshrink/onnxslim.

Usage::

    python benchmarks/bench_fold.py                       # project models + onnx backend test models
    python benchmarks/bench_fold.py --quick               # a small subset, a minute or two
    python benchmarks/bench_fold.py --models 'light/*' models/digits_cnn.onnx --json out.json
    python benchmarks/bench_fold.py --all-node            # every onnx node test (when the wheel has them)
    python benchmarks/bench_fold.py --from-json out.json  # re-print the summary of a saved run

Internal modes (used by the driver, handy for debugging one case)::

    python benchmarks/bench_fold.py --worker TOOL MODEL OUT     # run one tool, write OUT and OUT.json
    python benchmarks/bench_fold.py --check MODEL OUT...        # compare outputs, print JSON
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import glob
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path
from typing import Any

TOOLS = ("onnxshrink", "onnxsim", "onnxslim")
REPO = Path(__file__).resolve().parent.parent
PROJECT_MODELS = REPO / "models"
#: Sub-folders of onnx/backend/test/data scanned for models, in this order.
BACKEND_DIRS = ("real", "light", "pytorch-converted", "pytorch-operator", "simple", "node")
DEFAULT_NODE_SAMPLE = 60
REL_L2_TOL = 1e-5
DEFAULT_TIMEOUT = 300.0
#: Models at least this big get a second row of ratios (on tiny models imports and start-up dominate time).
BIG_MODEL_NODES = 50


# ---------------------------------------------------------------------------------------------------
# Model inspection (driver side, plain onnx protobuf)
# ---------------------------------------------------------------------------------------------------


def _subgraphs(node: Any) -> list[Any]:
    import onnx

    graphs = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attr.graphs)
    return graphs


def op_counts(path: str | Path) -> collections.Counter:
    """Op-type histogram of a model, If/Loop/Scan bodies included (custom domains as ``domain::Op``)."""
    import onnx

    return _op_counts(onnx.load(str(path), load_external_data=False))


def _op_counts(model: Any) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        for node in graph.node:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            counts[key] += 1
            stack.extend(_subgraphs(node))
    return counts


def file_bytes(path: str | Path) -> int:
    """Bytes of a model file plus the external-data files it references."""
    import onnx

    path = Path(path)
    total = path.stat().st_size
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return total
    locations = {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    for loc in locations:
        data = path.parent / loc
        if data.is_file():
            total += data.stat().st_size
    return total


# ---------------------------------------------------------------------------------------------------
# Model discovery
# ---------------------------------------------------------------------------------------------------


def backend_data_dir() -> Path | None:
    """``onnx/backend/test/data`` of the installed onnx package, if present."""
    try:
        import onnx
    except ImportError:
        return None
    path = Path(onnx.__file__).parent / "backend" / "test" / "data"
    return path if path.is_dir() else None


def discover_models(all_node: bool, node_sample: int, quick: bool) -> tuple[list[tuple[str, Path]], list[str]]:
    """(label, path) of the default model set, and notes about what was (not) found."""
    notes: list[str] = []
    models: list[tuple[str, Path]] = [
        (f"models/{p.stem}", p) for p in sorted(PROJECT_MODELS.glob("*.onnx"))
    ]
    data = backend_data_dir()
    if data is None:
        notes.append("onnx backend test data not found in the installed onnx package")
        return models, notes
    seen: set[Path] = set()
    per_dir: dict[str, list[tuple[str, Path]]] = {}
    for sub in BACKEND_DIRS:
        root = data / sub
        found: list[tuple[str, Path]] = []
        if not root.is_dir():
            notes.append(f"onnx backend data has no {sub}/ folder in this onnx wheel")
            per_dir[sub] = found
            continue
        candidates = sorted(root.glob("*/model.onnx")) + sorted(root.glob("*.onnx"))
        # real/ in the wheel holds only data.json pointers to the light/ copies of the same models.
        for pointer in sorted(root.glob("*/data.json")):
            try:
                url = json.loads(pointer.read_text()).get("url", "")
            except (OSError, ValueError):
                continue
            if url.startswith("onnx/backend/test/data/"):
                target = data / url[len("onnx/backend/test/data/"):]
                if target.is_file() and target.suffix == ".onnx":
                    candidates.append(target)
        for path in candidates:
            real = path.resolve()
            if real in seen:
                continue
            seen.add(real)
            found.append((_label_for(path), path))
        if sub == "real" and not found and any(root.glob("*/data.json")):
            notes.append("real/ holds only download pointers (data.json); their light/ copies are used")
        per_dir[sub] = found
    node = per_dir.get("node", [])
    if node and not all_node:
        rng = random.Random(0)
        per_dir["node"] = sorted(rng.sample(node, min(node_sample, len(node))))
        notes.append(f"node/: a fixed sample of {len(per_dir['node'])} of {len(node)} (--all-node for all)")
    if quick:
        models = models[:]
        for sub in BACKEND_DIRS:
            models += per_dir.get(sub, [])[:3]
        return models, notes
    for sub in BACKEND_DIRS:
        models += per_dir.get(sub, [])
    return models, notes


def select_models(patterns: list[str], default: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """Models matching ``patterns``: existing file globs, else fnmatch against the default labels."""
    chosen: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for pattern in patterns:
        hits = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if p.endswith(".onnx")]
        if hits:
            pairs = [(_label_for(p), p) for p in hits]
        else:
            pairs = [(label, p) for label, p in default if fnmatch.fnmatch(label, pattern)]
            pairs = pairs or [(label, p) for label, p in default if fnmatch.fnmatch(label, f"*{pattern}*")]
        if not pairs:
            print(f"warning: --models {pattern!r} matched nothing", file=sys.stderr)
        for label, path in pairs:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                chosen.append((label, path))
    return chosen


def _label_for(path: Path) -> str:
    if path.name == "model.onnx":
        return f"{path.parent.parent.name}/{path.parent.name}"
    return f"{path.parent.name}/{path.stem}"


# ---------------------------------------------------------------------------------------------------
# Worker: one tool, one model, fresh process
# ---------------------------------------------------------------------------------------------------


def _run_onnxshrink(src: str, dst: str) -> dict[str, Any]:
    import onnxshrink

    result = onnxshrink.optimize(src, passes="fold", validate=False)
    try:
        result.save(dst)
        report = result.report.to_dict()
    finally:
        result.close()
    fold = (report.get("passes") or [{}])[0]
    return {"pass_seconds": fold.get("seconds"), "counters": fold.get("counters"),
            "declines": fold.get("declines")}


def _run_onnxsim(src: str, dst: str) -> dict[str, Any]:
    import onnx
    import onnxsim

    model, check = onnxsim.simplify(src)
    onnx.save(model, dst)
    return {"tool_check": bool(check)}


def _run_onnxslim(src: str, dst: str) -> dict[str, Any]:
    import onnxslim

    onnxslim.slim(src, output_model=dst)
    return {}


RUNNERS = {"onnxshrink": _run_onnxshrink, "onnxsim": _run_onnxsim, "onnxslim": _run_onnxslim}
TOOL_MODULES = {"onnxshrink": "onnxshrink", "onnxsim": "onnxsim", "onnxslim": "onnxslim"}


def worker_main(tool: str, src: str, dst: str) -> int:
    """Run ``tool`` on ``src`` → ``dst``; write timings to ``dst + '.json'``. Time excludes imports."""
    import importlib
    import resource

    import psutil

    out: dict[str, Any] = {"tool": tool}
    t0 = time.perf_counter()
    module = importlib.import_module(TOOL_MODULES[tool])
    import onnx  # noqa: F401  (imported by every tool anyway; keeps the baseline comparable)

    out["import_seconds"] = time.perf_counter() - t0
    out["version"] = getattr(module, "__version__", None)
    out["baseline_rss"] = psutil.Process().memory_info().rss
    start = time.perf_counter()
    try:
        out.update(RUNNERS[tool](src, dst) or {})
        out["status"] = "ok" if os.path.isfile(dst) else "no-output"
    except BaseException as e:  # noqa: BLE001 - any failure of the tool is a result, not a crash
        out["status"] = "error"
        out["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        out["traceback"] = traceback.format_exc()[-3000:]
    out["seconds"] = time.perf_counter() - start
    out["peak_rss_self"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(dst + ".json").write_text(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------------------------------
# Checker: outputs of the original vs. each tool's output, on the same inputs
# ---------------------------------------------------------------------------------------------------

_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int8)": "int8", "tensor(int16)": "int16", "tensor(int32)": "int32", "tensor(int64)": "int64",
    "tensor(uint8)": "uint8", "tensor(uint16)": "uint16", "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64", "tensor(bool)": "bool", "tensor(string)": "object",
}


class Runner:
    """One model loaded in an inference backend: its feedable inputs, its outputs, and ``run``.

    ``onnxruntime`` (graph optimisations off, one thread) is the reference backend. ``onnx.reference``
    is used only when onnxruntime cannot run the *original* (e.g. ops of opset 1 that onnxruntime no
    longer implements); the outputs are then run there too, so both sides use the same backend.
    """

    def __init__(self, path: str, backend: str) -> None:
        self.backend = backend
        if backend == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            #: (name, numpy dtype name or None if not a tensor, shape with None for dynamic dims)
            self.inputs = [(i.name, _ORT_DTYPES.get(i.type), _dims(i.shape)) for i in sess.get_inputs()]
            self.outputs = [o.name for o in sess.get_outputs()]
            self._run = lambda feeds: sess.run(None, feeds)
        else:
            import onnx
            from onnx.reference import ReferenceEvaluator

            model = onnx.load(path)
            ev = ReferenceEvaluator(model)
            inits = {t.name for t in model.graph.initializer}
            self.inputs = [(i.name, _proto_dtype(i.type), _proto_dims(i.type))
                           for i in model.graph.input if i.name not in inits]
            self.outputs = [o.name for o in model.graph.output]
            self._run = lambda feeds: ev.run(None, feeds)

    def run(self, feeds: dict[str, Any]) -> list[Any]:
        return self._run(feeds)


def _dims(shape: Any) -> list[int | None]:
    return [d if isinstance(d, int) and d >= 0 else None for d in (shape or [])]


def _proto_dtype(type_proto: Any) -> str | None:
    from onnx import helper

    if not type_proto.HasField("tensor_type"):
        return None
    np_dtype = helper.tensor_dtype_to_np_dtype(type_proto.tensor_type.elem_type)
    return "object" if np_dtype.kind in "OUS" else np_dtype.name


def _proto_dims(type_proto: Any) -> list[int | None]:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else None for d in type_proto.tensor_type.shape.dim]


def synthetic_inputs(inputs: list[tuple[str, str | None, list[int | None]]]) -> dict[str, Any]:
    """Deterministic inputs: seeded by input name, dynamic dims = 1.

    Floats ~ N(0, 1); integers in [0, 3) (safe as indices and sizes); booleans fair coins; strings
    short words.
    """
    import numpy as np

    feeds: dict[str, Any] = {}
    for name, dtype, dims in inputs:
        if dtype is None:
            raise ValueError(f"cannot synthesize non-tensor input {name!r}")
        shape = [1 if d is None else d for d in dims]
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        if dtype.startswith("float"):
            arr = rng.standard_normal(shape).astype(dtype)
        elif dtype == "bool":
            arr = rng.integers(0, 2, size=shape).astype(bool)
        elif dtype == "object":
            words = np.array(["monday", "Tuesday", "apple", "THE"], dtype=object)
            arr = words[rng.integers(0, len(words), size=shape)]
        else:
            arr = rng.integers(0, 3, size=shape).astype(dtype)
        feeds[name] = arr
    return feeds


def bundled_inputs(model_path: Path, names: list[str]) -> dict[str, Any] | None:
    """Inputs from ``test_data_set_0/input_*.pb`` next to a backend test model, if any."""
    import onnx
    from onnx import numpy_helper

    data_dir = model_path.parent / "test_data_set_0"
    files = sorted(data_dir.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        return None
    values = []
    for f in files:
        raw = f.read_bytes()
        tensor = onnx.TensorProto()
        tensor.ParseFromString(raw)
        if tensor.data_type or tensor.dims:
            values.append((tensor.name, numpy_helper.to_array(tensor)))
            continue
        seq = onnx.SequenceProto()
        seq.ParseFromString(raw)
        values.append((seq.name, numpy_helper.to_list(seq)))
    feeds = {}
    for i, (name, value) in enumerate(values):
        key = name if name in names else (names[i] if i < len(names) else None)
        if key is not None:
            feeds[key] = value
    return feeds if set(feeds) == set(names) else None


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flatten(v)]
    return [value]


def rel_l2(ref: Any, got: Any) -> float:
    """Relative L2 error of ``got`` vs ``ref`` (inf on shape/type mismatch; exact match for non-floats)."""
    import numpy as np

    refs, gots = _flatten(ref), _flatten(got)
    if len(refs) != len(gots):
        return math.inf
    num = den = 0.0
    for a, b in zip(refs, gots):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return math.inf
        if a.dtype.kind in "fc" and b.dtype.kind in "fc":
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            both_nan = np.isnan(a64) & np.isnan(b64)
            same_inf = np.isinf(a64) & (a64 == b64)
            mask = ~(both_nan | same_inf)
            if np.any(~np.isfinite(a64[mask])) or np.any(~np.isfinite(b64[mask])):
                return math.inf
            num += float(np.sum((a64[mask] - b64[mask]) ** 2))
            den += float(np.sum(a64[mask] ** 2))
        elif a.dtype != b.dtype and not (a.dtype.kind in "OUS" and b.dtype.kind in "OUS"):
            return math.inf
        elif not np.array_equal(a, b):
            return math.inf
    if num == 0.0:
        return 0.0
    return math.sqrt(num) / math.sqrt(den) if den > 0 else math.inf


def _error_text(e: BaseException, limit: int = 300) -> str:
    return f"{type(e).__name__}: {str(e).strip()[:limit]}"


def check_main(original: str, outputs: list[str]) -> int:
    """Print ``STATS {json}`` (nodes, op types, bytes of every model), then ``CHECK {json}`` (per output:
    correct / worst rel L2 / error).

    Both run here, in a child process, so that the driver never holds a model in memory: a forked
    worker starts with its parent's peak RSS as its own high-water mark.
    """
    stats = {}
    for path in [original, *outputs]:
        try:
            import onnx

            model = onnx.load(path, load_external_data=False)
            counts = _op_counts(model)
            stats[path] = {"nodes": sum(counts.values()), "ops": dict(counts), "bytes": file_bytes(path),
                           "ir_version": model.ir_version}
            del model
        except Exception as e:  # noqa: BLE001
            stats[path] = {"error": _error_text(e, 200)}
    print("STATS " + json.dumps(stats), flush=True)
    result: dict[str, Any] = {"backend": None, "inputs": None, "reference_error": None, "outputs": {}}
    if not outputs:
        print("CHECK " + json.dumps(result))
        return 0

    # The original, its inputs and its outputs: onnxruntime first, onnx.reference if that fails.
    errors: list[str] = []
    ref = feeds = runner = None
    for backend in ("onnxruntime", "onnx.reference"):
        try:
            runner = Runner(original, backend)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{backend}: {_error_text(e, 200)}")
            continue
        candidates = []
        try:
            candidates.append(("synthetic", synthetic_inputs(runner.inputs)))
        except Exception as e:  # noqa: BLE001
            errors.append(f"synthetic inputs: {_error_text(e, 200)}")
        try:
            bundled = bundled_inputs(Path(original), [name for name, _, _ in runner.inputs])
            if bundled is not None:
                candidates.append(("bundled test_data_set_0", bundled))
        except Exception as e:  # noqa: BLE001
            errors.append(f"bundled inputs: {_error_text(e, 200)}")
        for kind, candidate in candidates:
            try:
                ref = runner.run(candidate)
                feeds, result["inputs"], result["backend"] = candidate, kind, backend
                break
            except Exception as e:  # noqa: BLE001
                errors.append(f"{backend} on {kind} inputs: {_error_text(e, 200)}")
        if feeds is not None:
            break
    if feeds is None or runner is None:
        result["reference_error"] = "; ".join(errors) or "no usable inputs"
        print("CHECK " + json.dumps(result))
        return 0

    for out in outputs:
        verdict: dict[str, Any] = {}
        try:
            other = Runner(out, runner.backend)
            names = [name for name, _, _ in other.inputs]
            missing = [n for n in names if n not in feeds]
            if missing:
                raise ValueError(f"optimized model needs new inputs {missing}")
            got = other.run({n: feeds[n] for n in names})
            by_name = dict(zip(other.outputs, got))
            if set(other.outputs) != set(runner.outputs):
                if len(other.outputs) != len(runner.outputs):
                    raise ValueError(f"outputs changed: {runner.outputs} -> {other.outputs}")
                by_name = dict(zip(runner.outputs, got))
                verdict["note"] = "output names changed; compared by position"
            errs = [rel_l2(r, by_name[n]) for n, r in zip(runner.outputs, ref)]
            worst = max(errs) if errs else 0.0
            verdict["rel_l2"] = worst if math.isfinite(worst) else None
            verdict["correct"] = bool(worst <= REL_L2_TOL)
            if not verdict["correct"]:
                bad = [n for n, e in zip(runner.outputs, errs) if not e <= REL_L2_TOL]
                verdict["error"] = f"outputs differ: {bad[:4]} (rel L2 {worst:.3g})"
        except Exception as e:  # noqa: BLE001
            verdict["correct"] = False
            verdict["error"] = _error_text(e)
        result["outputs"][out] = verdict
    print("CHECK " + json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------


def run_child(args: list[str], timeout: float, log_path: Path) -> dict[str, Any]:
    """Run this script with ``args`` in a fresh process; return exit code, wall time, peak RSS, timeout.

    Peak RSS is the child's ``ru_maxrss`` from ``wait4`` (so it is known even if the child crashes). On
    Linux a forked child inherits its parent's RSS high-water mark, so the driver itself never loads a
    model (the checker process counts nodes) and stays far below any tool's footprint. On timeout the
    child's own process group (and only it) is killed.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    env = dict(os.environ, PYTHONHASHSEED="0", TQDM_DISABLE="1")
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": proc.returncode,
        "wall_seconds": time.perf_counter() - start,
        "peak_rss": usage.ru_maxrss * 1024,
        "timed_out": timed_out,
    }


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])[:300]


def _tagged_json(log: Path, tag: str) -> dict[str, Any] | None:
    """The JSON after the last line starting with ``tag + ' '`` in ``log``."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith(tag + " "):
            try:
                return json.loads(line[len(tag) + 1:])
            except ValueError:
                return None
    return None


def bench_model(label: str, path: Path, tools: list[str], workdir: Path, timeout: float) -> dict[str, Any]:
    """Run every tool on one model, then count and check the outputs; return the model's record."""
    record: dict[str, Any] = {"model": label, "path": str(path), "original": {}, "tools": {}}
    mdir = workdir / label.replace("/", "__")
    mdir.mkdir(parents=True, exist_ok=True)
    outputs = []
    for tool in tools:
        out = mdir / f"{tool}.onnx"
        child = run_child(["--worker", tool, str(path), str(out)], timeout, mdir / f"{tool}.log")
        info: dict[str, Any] = {"peak_rss": child["peak_rss"], "wall_seconds": child["wall_seconds"]}
        meta_path = Path(str(out) + ".json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        info.update({k: v for k, v in meta.items() if k not in ("tool", "traceback")})
        if child["timed_out"]:
            info["status"] = "timeout"
            info["error"] = f"killed after {timeout:.0f} s"
        elif not meta:
            info["status"] = "crash"
            info["error"] = f"exit code {child['returncode']}: {_tail(mdir / f'{tool}.log')}"
        if info.get("status") == "ok":
            outputs.append(str(out))
        record["tools"][tool] = info

    log = mdir / "check.log"
    child = run_child(["--check", str(path), *outputs], timeout, log)
    stats = _tagged_json(log, "STATS") or {}
    verdict = _tagged_json(log, "CHECK")
    if str(path) not in stats or "error" in stats[str(path)]:
        raise RuntimeError(f"cannot read the original model: {stats.get(str(path), {}).get('error', _tail(log))}")
    record["original"] = stats[str(path)]
    if verdict is None:
        verdict = {"reference_error": f"checker failed (exit {child['returncode']}"
                   f"{', timeout' if child['timed_out'] else ''}): {_tail(log)}"}
    record["check_inputs"] = verdict.get("inputs")
    record["check_backend"] = verdict.get("backend")
    record["reference_error"] = verdict.get("reference_error")
    for tool in tools:
        info = record["tools"][tool]
        out = str(mdir / f"{tool}.onnx")
        if info.get("status") != "ok":
            continue
        st = stats.get(out, {"error": "not counted"})
        if "error" in st:
            info["status"], info["error"] = "bad-output", f"output unreadable: {st['error']}"
            continue
        info.update(st)
        if verdict.get("reference_error"):
            info["correct"] = None
            continue
        v = verdict.get("outputs", {}).get(out, {"correct": False, "error": "not checked"})
        info["correct"] = v.get("correct")
        info["rel_l2"] = v.get("rel_l2")
        if v.get("error"):
            info["check_error"] = v["error"]
    return record


# ---------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    def fmt(row: list[str]) -> str:
        return indent + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                  for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([fmt(headers), indent + "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def _correct_mark(info: dict[str, Any]) -> str:
    if info.get("status") != "ok":
        return info.get("status", "?").upper()
    c = info.get("correct")
    return "yes" if c else ("?" if c is None else "NO")


def print_model(record: dict[str, Any], tools: list[str]) -> None:
    orig = record["original"]
    print(f"\n== {record['model']}  ({orig['nodes']} nodes, {_bytes(orig['bytes'])})")
    rows = [["original", str(orig["nodes"]), str(orig["bytes"]), "-", "-", "-"]]
    for tool in tools:
        info = record["tools"][tool]
        ok = info.get("status") == "ok"
        rows.append([
            tool,
            str(info["nodes"]) if ok else "-",
            str(info["bytes"]) if ok else "-",
            f"{info['seconds']:.3f}" if info.get("seconds") is not None else "-",
            _bytes(info.get("peak_rss")),
            _correct_mark(info),
        ])
    print(_table(["tool", "nodes", "bytes", "time s", "peak RSS", "correct"], rows))
    for tool in tools:
        info = record["tools"][tool]
        msg = info.get("error") or info.get("check_error")
        if msg:
            print(f"  ! {tool}: {msg}")
    if record.get("reference_error"):
        print(f"  ! original model could not be run: {record['reference_error'][:300]}")
    else:
        if record.get("check_backend") not in (None, "onnxruntime"):
            print(f"  (checked in {record['check_backend']}: onnxruntime cannot run the original)")
        if record.get("check_inputs") not in (None, "synthetic"):
            print(f"  (checked with {record['check_inputs']} inputs: synthetic inputs were rejected)")


def verdict_for(record: dict[str, Any], max_bytes: int | None = None) -> tuple[str, int | None]:
    """('ok' | 'more' | 'shrink-failed' | 'shrink-incorrect' | 'no-competitor', best competitor nodes).

    Competitors count when they ran and their output is correct (or unverifiable because the original
    itself does not run); with ``max_bytes``, only those whose output file is at most that big.
    """
    tools = record["tools"]
    shrink = tools.get("onnxshrink", {})
    if shrink.get("status") != "ok":
        return "shrink-failed", None
    if shrink.get("correct") is False:
        return "shrink-incorrect", None
    unknown = record.get("reference_error") is not None
    rivals = [t for name, t in tools.items() if name != "onnxshrink" and t.get("status") == "ok"
              and (t.get("correct") or (unknown and t.get("correct") is None))
              and (max_bytes is None or t["bytes"] <= max_bytes)]
    if not rivals:
        return "no-competitor", None
    best = min(t["nodes"] for t in rivals)
    return ("ok" if shrink["nodes"] <= best else "more"), best


def op_diff(a: dict[str, int], b: dict[str, int]) -> str:
    """``Op a→b`` for every op type whose count differs."""
    parts = []
    for op in sorted(set(a) | set(b)):
        if a.get(op, 0) != b.get(op, 0):
            parts.append(f"{op} {a.get(op, 0)}→{b.get(op, 0)}")
    return ", ".join(parts) or "(same op counts)"


def geomean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not vals:
        return None
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def print_problems(records: list[dict[str, Any]], tools: list[str]) -> None:
    """Crashes, timeouts, incorrect outputs and size growth: onnxshrink's one by one, the competitors'
    grouped by kind and message (the same onnxslim/onnxsim bug often hits dozens of old models)."""
    print("\nCrashes, timeouts, incorrect outputs, size growth:")
    for tool in tools:
        found: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
        for rec in records:
            info = rec["tools"].get(tool, {})
            if info.get("status") in ("error", "crash", "timeout", "no-output", "bad-output"):
                found[(info["status"], str(info.get("error")))].append(rec["model"])
            elif info.get("correct") is False:
                found[("incorrect", str(info.get("check_error")))].append(rec["model"])
            elif info.get("status") == "ok" and info["bytes"] > rec["original"]["bytes"]:
                before, after = rec["original"]["bytes"], info["bytes"]
                kind = "grew > 2x" if after > 2 * before else "grew ≤ 2x"
                found[(kind, "")].append(f"{rec['model']} ({before} → {after} B)")
        total = sum(len(v) for v in found.values())
        print(f"  {tool}: {total or 'none'}")
        for (kind, message), models in sorted(found.items(), key=lambda kv: -len(kv[1])):
            shown = models if tool == "onnxshrink" else models[:4]
            more = f" ... and {len(models) - len(shown)} more" if len(shown) < len(models) else ""
            print(f"    - {kind} on {len(models)} model(s){': ' + message if message else ''}")
            print(f"      {', '.join(shown)}{more}")


def _metric(info: dict[str, Any], key: str) -> float | None:
    """One measurement of a tool run; derived keys: ``seconds+import`` and ``rss_above_imports``."""
    if key == "seconds+import":
        if info.get("seconds") is None or info.get("import_seconds") is None:
            return None
        return info["seconds"] + info["import_seconds"]
    if key == "rss_above_imports":
        if info.get("peak_rss") is None or info.get("baseline_rss") is None:
            return None
        return max(info["peak_rss"] - info["baseline_rss"], 1 << 20)
    value = info.get(key)
    if key == "nodes" and value is not None:
        return max(value, 1)
    return value


#: (column title, metric key, needs both outputs correct)
RATIO_COLUMNS = [
    ("nodes", "nodes", True),
    ("size", "bytes", True),
    ("time", "seconds", False),
    ("time+import", "seconds+import", False),
    ("peak RSS", "peak_rss", False),
    ("RSS above imports", "rss_above_imports", False),
]


def print_ratios(records: list[dict[str, Any]], tools: list[str]) -> dict[str, Any]:
    """Geometric means of onnxshrink / competitor per metric, over all models and over bigger ones."""
    big = [r for r in records if r["original"]["nodes"] >= BIG_MODEL_NODES]
    subsets = [("all", records)] + ([(f">= {BIG_MODEL_NODES} nodes", big)] if big else [])
    print("\nGeometric-mean ratios onnxshrink / competitor, over the models where both ran (nodes and size: "
          "only where\nneither output is known to be incorrect; nodes counted as max(n, 1)):")
    rows, ratios = [], {}
    for subset, recs in subsets:
        for rival in [t for t in tools if t != "onnxshrink"]:
            both = [r for r in recs if r["tools"]["onnxshrink"].get("status") == "ok"
                    and r["tools"][rival].get("status") == "ok"]
            good = [r for r in both if r["tools"]["onnxshrink"].get("correct") is not False
                    and r["tools"][rival].get("correct") is not False]
            entry: dict[str, Any] = {"models": len(both), "models_correct": len(good)}
            for _, key, needs_correct in RATIO_COLUMNS:
                pairs = [(_metric(r["tools"]["onnxshrink"], key), _metric(r["tools"][rival], key))
                         for r in (good if needs_correct else both)]
                entry[key] = geomean([a / b for a, b in pairs if a is not None and b])
            ratios.setdefault(subset, {})[rival] = entry
            rows.append([subset, f"onnxshrink / {rival}", f"{len(both)} ({len(good)})",
                         *("-" if entry[key] is None else f"{entry[key]:.3f}" for _, key, _ in RATIO_COLUMNS)])
    print(_table(["models", "ratio", "n (correct)", *(title for title, _, _ in RATIO_COLUMNS)], rows))
    print("  (< 1 favours onnxshrink. time = the tool call, file to file, after `import tool`; time+import adds"
          "\n   the import. peak RSS = the whole tool process; 'above imports' = peak − RSS after the import,"
          "\n   floored at 1 MiB)")
    return ratios


def print_totals(records: list[dict[str, Any]], tools: list[str]) -> None:
    rows = []
    for tool in tools:
        ran = [r["tools"][tool] for r in records if r["tools"][tool].get("seconds") is not None]
        imp = [i["import_seconds"] for i in ran if i.get("import_seconds") is not None]
        base = [i["baseline_rss"] for i in ran if i.get("baseline_rss") is not None]
        ok = sum(1 for i in ran if i.get("status") == "ok")
        rows.append([tool, f"{ok}/{len(records)}", f"{sum(i['seconds'] for i in ran):.1f}",
                     f"{(sum(imp) / len(imp)) if imp else 0:.2f}",
                     _bytes(sum(base) / len(base)) if base else "-",
                     _bytes(max((i.get("peak_rss") or 0) for i in ran)) if ran else "-"])
    print("\nPer tool totals:")
    print(_table(["tool", "ran ok", "sum time s", "mean import s", "RSS after import", "max peak RSS"], rows))


def print_summary(records: list[dict[str, Any]], tools: list[str]) -> dict[str, Any]:
    print("\n" + "=" * 100 + "\nSUMMARY\n")
    rows = []
    not_ok = []
    counts = collections.Counter()
    for rec in records:
        verdict, best = verdict_for(rec)
        counts[verdict] += 1
        rec["verdict"] = verdict
        t = rec["tools"]
        def n(tool: str) -> str:
            info = t.get(tool, {})
            if info.get("status") != "ok":
                return info.get("status", "-")
            mark = "" if info.get("correct") else ("?" if info.get("correct") is None else "✗")
            return f"{info['nodes']}{mark}"
        label = {"ok": "yes", "more": "NO", "shrink-failed": "NO (onnxshrink failed)",
                 "shrink-incorrect": "NO (onnxshrink incorrect)", "no-competitor": "yes (no correct competitor)"}
        rows.append([rec["model"], str(rec["original"]["nodes"]), *[n(x) for x in tools], label[verdict]])
        if verdict != "ok" and verdict != "no-competitor":
            not_ok.append(rec)
    print(_table(["model", "orig", *tools, "shrink ≤ min(correct rivals)"], rows))
    print("\n  (✗ = output incorrect, ? = not verifiable: the original runs neither in onnxruntime nor in "
          "onnx.reference)")
    lean = 0
    for rec in records:
        v, _ = verdict_for(rec, max_bytes=rec["original"]["bytes"])
        lean += v in ("ok", "no-competitor")
    print(f"\nonnxshrink nodes ≤ min(correct competitors): {counts['ok'] + counts['no-competitor']}"
          f"/{len(records)} models"
          + (f" ({counts['no-competitor']} without a correct competitor)" if counts["no-competitor"] else ""))
    print(f"onnxshrink nodes ≤ min(correct competitors whose output is not larger than the original): "
          f"{lean}/{len(records)} models")
    if not_ok:
        print(f"\nModels where onnxshrink is NOT ≤ min ({len(not_ok)}):")
        for rec in not_ok:
            t = rec["tools"]
            nodes = ", ".join(f"{x}={t[x].get('nodes', t[x].get('status'))}" for x in tools)
            sizes = ", ".join(f"{x} {_bytes(t[x]['bytes'])}" for x in tools if t[x].get("status") == "ok")
            print(f"  - {rec['model']}: {nodes} [{rec['verdict']}]  (IR {rec['original'].get('ir_version')}; "
                  f"size: original {_bytes(rec['original']['bytes'])}, {sizes})")
            shrink = t.get("onnxshrink", {})
            if shrink.get("status") != "ok":
                print(f"      onnxshrink: {shrink.get('error')}")
                continue
            if shrink.get("correct") is False:
                print(f"      onnxshrink: {shrink.get('check_error')}")
            for rival in tools:
                if rival == "onnxshrink" or t[rival].get("status") != "ok":
                    continue
                if t[rival].get("nodes", 0) < shrink["nodes"]:
                    print(f"      onnxshrink vs {rival}: {op_diff(shrink['ops'], t[rival]['ops'])}")

    print_problems(records, tools)

    ratios = print_ratios(records, tools) if "onnxshrink" in tools else {}
    print_totals(records, tools)
    return {"verdicts": dict(counts), "ratios": ratios}


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", metavar="GLOB",
                        help="model files (globs) or patterns matched against labels such as 'light/*', "
                             "'models/digits_cnn', 'pytorch-converted/test_Conv*'")
    parser.add_argument("--quick", action="store_true",
                        help="project models plus the first 3 models of each backend-test folder")
    parser.add_argument("--all-node", action="store_true", help="every onnx node/ test model (default: a sample)")
    parser.add_argument("--node-sample", type=int, default=DEFAULT_NODE_SAMPLE,
                        help=f"node/ models sampled without --all-node (default {DEFAULT_NODE_SAMPLE})")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma list, default {','.join(TOOLS)}")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per tool run (default 300)")
    parser.add_argument("--json", metavar="OUT", help="write every measurement to this JSON file")
    parser.add_argument("--keep", metavar="DIR", help="keep the optimized models and logs in DIR")
    parser.add_argument("--from-json", metavar="FILE",
                        help="print the summary of a run saved with --json (runs nothing)")
    parser.add_argument("--per-model", action="store_true", help="with --from-json: also the per-model tables")
    parser.add_argument("--worker", nargs=3, metavar=("TOOL", "MODEL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--check", nargs="+", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        tool, src, dst = args.worker
        if tool not in RUNNERS:
            parser.error(f"unknown tool {tool!r}")
        return worker_main(tool, src, dst)
    if args.check:
        if len(args.check) < 2:
            parser.error("--check needs the original model and at least one output")
        return check_main(args.check[0], args.check[1:])

    if args.from_json:
        payload = json.loads(Path(args.from_json).read_text())
        tools = payload.get("tools") or list(TOOLS)
        if args.per_model:
            for record in payload["models"]:
                print_model(record, tools)
        print_summary(payload["models"], tools)
        return 0

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in tools if t not in RUNNERS]
    if unknown:
        parser.error(f"unknown tool(s) {unknown}; choose from {', '.join(TOOLS)}")
    default, notes = discover_models(args.all_node, args.node_sample, args.quick)
    if args.models:
        everything, _ = discover_models(all_node=True, node_sample=0, quick=False)
        models = select_models(args.models, everything)
    else:
        models = default
    if not models:
        print("no models selected", file=sys.stderr)
        return 2
    versions = {}
    for tool in tools:
        try:
            from importlib.metadata import version
            versions[tool] = version(tool)
        except Exception:  # noqa: BLE001
            versions[tool] = "?"
    print(f"bench_fold: {len(models)} models, tools {', '.join(f'{t} {versions[t]}' for t in tools)}, "
          f"timeout {args.timeout:.0f} s, correct = rel L2 ≤ {REL_L2_TOL:g} in onnxruntime "
          f"(onnx.reference where onnxruntime cannot run the original)")
    for note in notes:
        print(f"  note: {note}")

    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_fold-"))
    workdir.mkdir(parents=True, exist_ok=True)
    records = []
    started = time.perf_counter()
    try:
        for i, (label, path) in enumerate(models, 1):
            print(f"\n[{i}/{len(models)}] {label}", flush=True)
            try:
                record = bench_model(label, path, tools, workdir, args.timeout)
            except Exception as e:  # noqa: BLE001 - e.g. an unreadable original: skip the model
                print(f"  skipped: {type(e).__name__}: {e}")
                continue
            records.append(record)
            print_model(record, tools)
            sys.stdout.flush()
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = print_summary(records, tools) if records else {}
    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f} s")
    if args.json:
        payload = {"tools": tools, "versions": versions, "tolerance": REL_L2_TOL, "notes": notes,
                   "summary": summary, "models": records}
        Path(args.json).write_text(json.dumps(payload, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
