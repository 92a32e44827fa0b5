#!/usr/bin/env python
"""A model over 2 GB (external data) through onnxshrink: peak memory relative to the model's size.

The model is generated here without ever holding its weights in memory: a chain of ``MatMul`` layers with
``[D, D]`` float32 weights (``D = 8192`` → 256 MiB each; ``--gb`` sets the total, default 2.25 GiB) plus a
little to fold (an ``Identity``, a ``Constant`` product added to the activations), written straight into
``big.onnx.data`` in chunks, with the ONNX file holding only references.

Each ``--passes`` spec then runs as ``onnxshrink optimize big.onnx --passes SPEC -o out.onnx`` in a fresh
process, with and without validation (``--no-validate``), and the process's peak RSS (``ru_maxrss`` from
``wait4``: resident anonymous memory *plus* the memory-mapped weight pages it touched) is divided by the
model's size (ONNX file + external data). The target is a ratio below 1.5.

Usage::

    python benchmarks/big_model.py                                   # fold, 2.25 GiB, with/without validation
    python benchmarks/big_model.py --passes fold "quant(mode=weights)" --keep /tmp/big
    python benchmarks/big_model.py --gb 0.5 --no-validate-only        # quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

D = 8192
CHUNK_ROWS = 512


def make_model(folder: Path, total_bytes: int, dim: int = D) -> Path:
    """Write ``big.onnx`` + ``big.onnx.data`` into ``folder``; weights are generated chunk by chunk."""
    import onnx
    from onnx import TensorProto, helper

    per = dim * dim * 4
    layers = max(1, -(-total_bytes // per))
    data_path = folder / "big.onnx.data"
    inits = []
    offset = 0
    with open(data_path, "wb") as f:
        for i in range(layers):
            rng = np.random.default_rng(1000 + i)
            for _ in range(0, dim, CHUNK_ROWS):
                chunk = rng.standard_normal((CHUNK_ROWS, dim), dtype=np.float32)
                chunk *= np.float32(1.0 / np.sqrt(dim))
                f.write(chunk.tobytes())
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[dim, dim])
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_path.name), ("offset", str(offset)), ("length", str(per))):
                e = t.external_data.add()
                e.key, e.value = k, v
            inits.append(t)
            offset += per
    nodes = [helper.make_node("Identity", ["x"], ["h0"], name="identity")]
    cur = "h0"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [f"m{i}"], name=f"matmul{i}"))
        cur = f"m{i}"
    small = [helper.make_tensor("c1", TensorProto.FLOAT, [dim], np.full(dim, 0.5, np.float32)),
             helper.make_tensor("c2", TensorProto.FLOAT, [dim], np.full(dim, 0.25, np.float32))]
    nodes += [helper.make_node("Mul", ["c1", "c2"], ["c"], name="const_mul"),
              helper.make_node("Add", [cur, "c"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])], inits + small)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "big.onnx"
    onnx.save(model, str(path))  # only references: the weights are already in big.onnx.data
    return path


def model_bytes(path: Path) -> int:
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))


def run_cli(model: Path, spec: str, validate: bool, out: Path, timeout: float) -> dict:
    """Run the CLI in a child process; return exit code, seconds, peak RSS (bytes), stderr tail."""
    exe = Path(sys.executable).with_name("onnxshrink")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "onnxshrink.cli"]),
           "optimize", str(model), "--passes", spec, "-o", str(out), "--quiet"]
    if not validate:
        cmd.append("--no-validate")
    else:
        cmd += ["--report", str(out.with_suffix(".json"))]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"spec": spec, "validate": validate, "error": f"timeout after {timeout:.0f} s"}
    seconds = time.perf_counter() - t
    # the child has been reaped by communicate(); RUSAGE_CHILDREN holds the largest child's peak so far,
    # so every measurement runs in order from the smallest expected peak (see main) — and we record it
    import resource

    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    rec = {"spec": spec, "validate": validate, "exit": proc.returncode, "seconds": round(seconds, 1),
           "peak_rss": peak, "stderr": stderr.strip().splitlines()[-3:]}
    if validate and out.with_suffix(".json").exists():
        rep = json.loads(out.with_suffix(".json").read_text())
        rec["verdict"] = rep["verdict"]
        rec["validation_reason"] = (rep.get("validation") or {}).get("reason")
    if out.exists():
        rec["out_bytes"] = model_bytes(out)
    return rec


def _child_main(argv: list[str]) -> int:
    """Run one measurement in its own process so RUSAGE_CHILDREN sees only that CLI run."""
    model, spec, validate, out, timeout = argv
    rec = run_cli(Path(model), spec, validate == "1", Path(out), float(timeout))
    print("RESULT " + json.dumps(rec))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.25, help="total weight size in GiB (default 2.25, > 2 GB)")
    ap.add_argument("--passes", nargs="+", default=["fold"], help="pass specs to measure (each in its own run)")
    ap.add_argument("--no-validate-only", action="store_true", help="skip the runs with validation")
    ap.add_argument("--keep", help="generate into / keep this folder (reuses big.onnx if present)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", help="write the measurements here")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child_main(args.child)

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="big_model-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        model = folder / "big.onnx"
        if not model.exists():
            t = time.perf_counter()
            make_model(folder, int(args.gb * 2**30))
            print(f"generated {model} in {time.perf_counter() - t:.1f} s", flush=True)
        size = model_bytes(model)
        print(f"model: {size / 2**30:.2f} GiB ({size:,} bytes, external data)", flush=True)
        rows = []
        for spec in args.passes:
            for validate in ([False] if args.no_validate_only else [False, True]):
                out = folder / "out" / "big.small.onnx"
                shutil.rmtree(out.parent, ignore_errors=True)
                out.parent.mkdir()
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(model), spec,
                       "1" if validate else "0", str(out), str(args.timeout)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                rec = json.loads(lines[-1][7:]) if lines else {"spec": spec, "validate": validate,
                                                                 "error": proc.stderr[-500:]}
                rec["model_bytes"] = size
                if "peak_rss" in rec:
                    rec["ratio"] = round(rec["peak_rss"] / size, 3)
                rows.append(rec)
                print(f"  {spec:24} validate={'yes' if validate else 'no ':3}  exit {rec.get('exit')}  "
                      f"{rec.get('seconds', '-')} s  peak RSS {rec.get('peak_rss', 0) / 2**30:.2f} GiB  "
                      f"ratio {rec.get('ratio', '-')}  {rec.get('verdict', '')} {rec.get('error', '')}", flush=True)
                shutil.rmtree(out.parent, ignore_errors=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"model_bytes": size, "runs": rows}, indent=1))
        bad = [r for r in rows if r.get("exit") not in (0,) or r.get("ratio", 9) >= 1.5]
        print("\ntarget: exit 0 and peak RSS < 1.5x model size:", "met" if not bad else f"NOT met ({len(bad)} run(s))")
        return 1 if bad else 0
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
