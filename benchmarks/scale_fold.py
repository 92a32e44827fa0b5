#!/usr/bin/env python
"""How onnxshrink ``fold`` time grows with graph size, on synthetic graphs of 10k to 100k nodes.

The graphs are generated here with ``onnx.helper``: a residual chain of blocks over an activation
``[batch, 8, 8, 8]`` whose batch axis is dynamic. One block (~19 nodes) holds what real exports are full of:

* ``Conv → BatchNormalization → Relu`` with small weights (every 4th Conv weight is a ``Constant`` node,
  the rest initializers);
* no-ops: an ``Identity`` (even blocks) or a ``Dropout`` (odd blocks);
* a shape subgraph on the dynamic batch dim: ``Shape → Gather(0) → Unsqueeze → Concat([b, 8, 8, 8]) →
  Reshape`` with ``Constant`` index/axes/tail (every 2nd block);
* constant arithmetic to fold: ``Add(Mul(Constant, Constant), Constant)`` added to the activation;
* a residual ``Add`` with the block input.

Each size runs in a fresh process (``--worker``) that times, separately: loading the model the way
onnxshrink does, the fold pass itself (``report.passes[0].seconds``) and the whole
``onnxshrink.optimize(path, passes="fold", validate=False)`` call, and reports peak RSS. Growth is
called linear when the per-node time at the largest size is at most 1.5x the one at the smallest.
If it is not (or with ``--profile``), the largest size is run again under cProfile and the top functions
are printed.

Usage::

    python benchmarks/scale_fold.py                        # 10k, 30k, 100k nodes
    python benchmarks/scale_fold.py --sizes 2000,5000 --profile
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
from typing import Any

LINEAR_LIMIT = 1.5
CHANNELS = 8
SPATIAL = 8


# ---------------------------------------------------------------------------------------------------
# Synthetic graph
# ---------------------------------------------------------------------------------------------------


class _Builder:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, seed: int = 0) -> None:
        import numpy as np

        self.rng = np.random.default_rng(seed)
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._next = 0

    def name(self, base: str) -> str:
        self._next += 1
        return f"{base}_{self._next}"

    def node(self, op: str, inputs: list[str], **attrs: Any) -> str:
        from onnx import helper

        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    def constant(self, array: Any) -> str:
        """A ``Constant`` node holding ``array``."""
        from onnx import helper, numpy_helper

        out = self.name("const")
        self.nodes.append(helper.make_node("Constant", [], [out], name=self.name("Constant"),
                                           value=numpy_helper.from_array(array, out)))
        return out

    def initializer(self, array: Any) -> str:
        from onnx import numpy_helper

        name = self.name("w")
        self.initializers.append(numpy_helper.from_array(array, name))
        return name


def _block(b: _Builder, x: str, index: int) -> str:
    """Append one block to ``b``; return its output (same shape as ``x``)."""
    import numpy as np

    c = CHANNELS
    f32 = np.float32
    weight = (b.rng.standard_normal((c, c, 3, 3)) * 0.1).astype(f32)
    w = b.constant(weight) if index % 4 == 0 else b.initializer(weight)
    bias = b.initializer((b.rng.standard_normal(c) * 0.1).astype(f32))
    h = b.node("Conv", [x, w, bias], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    gamma = b.initializer((1 + 0.1 * b.rng.standard_normal(c)).astype(f32))
    beta = b.initializer((0.1 * b.rng.standard_normal(c)).astype(f32))
    mean = b.initializer((0.1 * b.rng.standard_normal(c)).astype(f32))
    var = b.initializer((1 + 0.1 * b.rng.random(c)).astype(f32))
    h = b.node("BatchNormalization", [h, gamma, beta, mean, var], epsilon=1e-5)
    h = b.node("Relu", [h])
    h = b.node("Identity" if index % 2 == 0 else "Dropout", [h])
    if index % 2 == 0:
        shape = b.node("Shape", [h])
        batch = b.node("Gather", [shape, b.constant(np.array(0, dtype=np.int64))], axis=0)
        batch = b.node("Unsqueeze", [batch, b.constant(np.array([0], dtype=np.int64))])
        tail = b.constant(np.array([c, SPATIAL, SPATIAL], dtype=np.int64))
        target = b.node("Concat", [batch, tail], axis=0)
        h = b.node("Reshape", [h, target])
    scale = b.node("Mul", [b.constant(np.full((c, 1, 1), 0.5, f32)),
                           b.constant((0.01 * b.rng.standard_normal((c, 1, 1))).astype(f32))])
    shift = b.node("Add", [scale, b.constant(np.full((c, 1, 1), 0.001 * (index % 7), f32))])
    h = b.node("Add", [h, shift])
    return b.node("Add", [h, x])


def make_model(target_nodes: int) -> Any:
    """A ModelProto with at least ``target_nodes`` nodes (opset 17, dynamic batch)."""
    from onnx import TensorProto, helper

    b = _Builder(seed=target_nodes)
    x = "input"
    index = 0
    while len(b.nodes) < target_nodes:
        x = _block(b, x, index)
        index += 1
    dims = ["batch", CHANNELS, SPATIAL, SPATIAL]
    graph = helper.make_graph(
        b.nodes, f"scale_{target_nodes}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, dims)],
        initializer=b.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="scale_fold")
    model.ir_version = 8
    return model


# ---------------------------------------------------------------------------------------------------
# Worker: time one model in a fresh process
# ---------------------------------------------------------------------------------------------------


def _load(path: str) -> Any:
    """Load the model the way ``onnxshrink.optimize`` does (its loader, else onnx_ir's)."""
    try:
        from onnxshrink.model import load_model
    except ImportError:
        import onnx_ir as ir

        return ir.load(path)
    return load_model(path)


def _cpu() -> float:
    """CPU seconds (user + system) of this process so far: robust to other load on a shared machine."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _data_for(path: str, spec: str) -> Any:
    """Synthetic data when a pass of ``spec`` needs data (quant/prune with calibration), else None."""
    from onnxshrink.calib import input_specs, synthetic_data
    from onnxshrink.pipeline import parse

    if not any(s.info.cls.needs_data for s in parse(spec)):
        return None
    return synthetic_data(input_specs(_load(path)), num_samples=4)[0]


def worker_main(path: str, out: str, profile_out: str | None, spec: str = "fold") -> int:
    import resource

    import onnx

    import onnxshrink

    result: dict[str, Any] = {}
    t = time.perf_counter()
    model = _load(path)
    result["load_seconds"] = time.perf_counter() - t
    del model
    data = _data_for(path, spec)
    if profile_out:
        import cProfile

        profiler = cProfile.Profile()
        t, c = time.perf_counter(), _cpu()
        profiler.enable()
        res = onnxshrink.optimize(path, passes=spec, validate=False, data=data, latency=False)
        profiler.disable()
        result["total_seconds"] = time.perf_counter() - t
        result["total_cpu_seconds"] = _cpu() - c
        profiler.dump_stats(profile_out)
    else:
        t, c = time.perf_counter(), _cpu()
        res = onnxshrink.optimize(path, passes=spec, validate=False, data=data, latency=False)
        result["total_seconds"] = time.perf_counter() - t
        result["total_cpu_seconds"] = _cpu() - c
    report = res.report.to_dict()
    passes = report.get("passes") or [{}]
    result["fold_seconds"] = sum(p.get("seconds") or 0 for p in passes)  # all passes of the spec
    t = time.perf_counter()
    saved = res.save(out)
    result["save_seconds"] = time.perf_counter() - t
    res.close()
    result["nodes_after"] = len(onnx.load(str(saved), load_external_data=False).graph.node)
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(result))
    return 0


def run_worker(path: Path, out: Path, profile_out: Path | None, timeout: float, spec: str = "fold") -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(path), str(out), "--passes", spec]
    if profile_out:
        cmd += ["--profile-out", str(profile_out)]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    wall = time.perf_counter() - t
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    result = json.loads(lines[-1][len("RESULT "):])
    result["process_seconds"] = wall
    return result


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------


def _print_profile(stats_path: Path, top: int) -> None:
    import pstats

    stats = pstats.Stats(str(stats_path))
    for key, title in (("cumulative", "cumulative time"), ("tottime", "own time")):
        print(f"\n-- top {top} functions by {title} --")
        stats.sort_stats(key).print_stats(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,30000,100000", help="comma list of node counts")
    parser.add_argument("--profile", action="store_true", help="always profile the largest size")
    parser.add_argument("--top", type=int, default=25, help="functions shown per profile listing")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per size (default 900)")
    parser.add_argument("--json", metavar="OUT", help="write the measurements to this JSON file")
    parser.add_argument("--keep", metavar="DIR", help="keep the generated models in DIR")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--passes", default="fold",
                        help="pass spec to time (default fold); passes that need data get synthetic data")
    parser.add_argument("--each-pass", action="store_true",
                        help="time every registered pass on its own, with its defaults (overrides --passes)")
    parser.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker[0], args.worker[1], args.profile_out, args.passes)
    if args.each_pass:
        from onnxshrink.registry import all_passes

        code = 0
        for info in all_passes():
            print(f"\n===== pass {info.name} =====", flush=True)
            sub = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--each-pass"]
            if args.json:
                i = sub.index("--json")
                sub[i + 1] = str(Path(args.json).with_suffix(f".{info.name}.json"))
            code |= main(sub + ["--passes", info.name])
        return code

    import onnx

    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="scale_fold-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    try:
        for size in sizes:
            t = time.perf_counter()
            model = make_model(size)
            path = workdir / f"scale_{size}.onnx"
            onnx.save(model, str(path))
            gen = time.perf_counter() - t
            nodes = len(model.graph.node)
            del model
            print(f"generated {nodes} nodes, {path.stat().st_size / 2**20:.1f} MiB in {gen:.1f} s; running fold ...",
                  flush=True)
            result = run_worker(path, workdir / f"scale_{size}.out.onnx", None, args.timeout, args.passes)
            result.update(size=size, nodes=nodes, bytes=path.stat().st_size)
            rows.append(result)
            if "error" in result:
                print(f"  onnxshrink failed: {result['error']}")
            else:
                print(f"  load {result['load_seconds']:.2f} s, passes {result['fold_seconds']:.2f} s, "
                      f"total {result['total_seconds']:.2f} s (CPU {result['total_cpu_seconds']:.2f} s), "
                      f"{result['nodes_after']} nodes after", flush=True)

        print(f"\nonnxshrink {args.passes} on synthetic graphs (per-node times in microseconds; 'passes' = the "
              "pipeline's passes, 'total' = the whole optimize call, wall clock; 'total CPU' = its CPU time)")
        header = ["nodes", "MiB", "nodes after", "load s", "passes s", "total s", "total CPU s", "other s", "save s",
                  "peak RSS MiB", "load µs/node", "passes µs/node", "total µs/node", "CPU µs/node"]
        table = []
        for r in rows:
            if "error" in r:
                table.append([str(r["nodes"]), f"{r['bytes'] / 2**20:.1f}", "ERROR"] + [""] * (len(header) - 3))
                continue
            other = r["total_seconds"] - r["load_seconds"] - r["fold_seconds"]
            table.append([
                str(r["nodes"]), f"{r['bytes'] / 2**20:.1f}", str(r["nodes_after"]),
                f"{r['load_seconds']:.2f}", f"{r['fold_seconds']:.2f}", f"{r['total_seconds']:.2f}",
                f"{r['total_cpu_seconds']:.2f}", f"{other:.2f}", f"{r['save_seconds']:.2f}", f"{r['peak_rss'] / 2**20:.0f}",
                f"{1e6 * r['load_seconds'] / r['nodes']:.1f}", f"{1e6 * r['fold_seconds'] / r['nodes']:.1f}",
                f"{1e6 * r['total_seconds'] / r['nodes']:.1f}", f"{1e6 * r['total_cpu_seconds'] / r['nodes']:.1f}",
            ])
        widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
        print("  " + "  ".join(h.rjust(w) for h, w in zip(header, widths)))
        print("  " + "  ".join("-" * w for w in widths))
        for row in table:
            print("  " + "  ".join(c.rjust(w) for c, w in zip(row, widths)))
        print("  (other = total − load − fold: shape inference and stats before the pass, saving the result;"
              "\n   save = copying the saved result to its destination)")

        ok = [r for r in rows if "error" not in r]
        verdict: dict[str, Any] = {}
        if len(ok) >= 2:
            small, large = ok[0], ok[-1]
            print(f"\nper-node time ratio {large['nodes']} vs {small['nodes']} nodes "
                  f"(linear means ≤ {LINEAR_LIMIT}):")
            for key in ("load_seconds", "fold_seconds", "total_seconds", "total_cpu_seconds"):
                ratio = (large[key] / large["nodes"]) / (small[key] / small["nodes"])
                verdict[key] = ratio
                label = "linear" if ratio <= LINEAR_LIMIT else "SUPER-LINEAR"
                name = {"fold_seconds": "passes", "total_cpu_seconds": "total CPU"}.get(key, key.split("_")[0])
                print(f"  {name:>9}: {ratio:.2f}  {label}")
        superlinear = any(v > LINEAR_LIMIT for v in verdict.values())
        if ok and (args.profile or superlinear):
            largest = ok[-1]
            path = workdir / f"scale_{largest['size']}.onnx"
            stats = workdir / "fold.prof"
            why = "super-linear growth" if superlinear else "--profile"
            print(f"\nprofiling optimize() on {largest['nodes']} nodes ({why}) ...", flush=True)
            prof = run_worker(path, workdir / "profiled.onnx", stats, args.timeout * 2, args.passes)
            if "error" in prof:
                print(f"  profiling failed: {prof['error']}")
            else:
                print(f"  total under cProfile {prof['total_seconds']:.1f} s")
                _print_profile(stats, args.top)
        if args.json:
            Path(args.json).write_text(json.dumps({"passes": args.passes, "runs": rows, "per_node_ratio": verdict},
                                                  indent=1))
            print(f"wrote {args.json}")
    finally:
        if not args.keep:
            for p in workdir.iterdir():
                p.unlink()
            os.rmdir(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
