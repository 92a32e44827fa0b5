#!/usr/bin/env python
"""Peak memory and time of per-layer comparison: ``onnxshrink compare --per-layer`` (grouped capture,
and all tensors at once) vs Polygraphy's ``--onnx-outputs mark all`` (when installed).

The model is generated: a chain of ``--layers`` blocks ``Conv 1x1 -> Relu -> Add (residual)`` on
``[N, C, H, W]`` activations, so it has 3 intermediate tensors per block (600 with the defaults). The
candidate is the same graph with small noise on every weight and one block (``--bad``) perturbed
strongly, so there is a layer to find. Both see the same ``--samples`` inputs, in batches of 32.

Every measurement runs in a fresh process of this file (``--worker``); its peak RSS is ``ru_maxrss``
from ``wait4``, so it is that process's own, interpreter and imports included.

* ``onnxshrink grouped``: ``compare(ref, cand, data, per_layer=True, budget_bytes=--budget-mb)``;
* ``onnxshrink all-at-once``: the same with an unlimited budget (one group: every tensor is a graph
  output of one session — what "mark all" does);
* ``polygraphy``: ``polygraphy run REF --onnxrt --onnx-outputs mark all --save-outputs ref.json`` then
  ``polygraphy run CAND ... --load-outputs ref.json`` (how its docs compare two models layer by layer);
  the peak is the larger of the two processes, the time their sum.

Usage::

    python benchmarks/bench_compare.py                 # defaults: 200 blocks, 16x24x24, 64 samples
    python benchmarks/bench_compare.py --layers 400 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def build(out: Path, layers: int, channels: int, hw: int, samples: int, bad: int) -> tuple[Path, Path, Path, Path]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def chain(path: Path, noise: float, bad_noise: float) -> Path:
        rng = np.random.default_rng(3)
        noise_rng = np.random.default_rng(11)
        nodes, inits, x = [], [], "x"
        for i in range(layers):
            # small block gain (x + relu(Wx) grows at most ~1.05x per block): no overflow at 1000s of blocks
            w = (np.eye(channels) + 0.5 * rng.standard_normal((channels, channels))) / 20
            w = w + (bad_noise if i == bad else noise) * noise_rng.standard_normal(w.shape)
            inits.append(numpy_helper.from_array(w.astype(np.float32).reshape(channels, channels, 1, 1), f"w{i}"))
            nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}"),
                      helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"),
                      helper.make_node("Add", [x, f"r{i}"], [f"a{i}"], name=f"add{i}")]
            x = f"a{i}"
        nodes.append(helper.make_node("Mul", [x, "scale"], ["y"], name="out"))
        inits.append(numpy_helper.from_array(np.array(0.5, np.float32), "scale"))
        g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, hw, hw])], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        onnx.checker.check_model(m)
        onnx.save(m, str(path))
        return path

    out.mkdir(parents=True, exist_ok=True)
    ref = chain(out / "chain_ref.onnx", 0.0, 0.0)
    cand = chain(out / "chain_cand.onnx", 1e-5, 0.01)
    x = np.random.default_rng(0).uniform(0, 1, (samples, channels, hw, hw)).astype(np.float32)
    data = out / "chain_data.npz"
    np.savez(data, x=x)
    loader = out / "chain_loader.py"
    loader.write_text(
        "import numpy as np\n"
        f"def load_data():\n    x = np.load({str(data)!r})['x']\n"
        "    for i in range(0, len(x), 32):\n        yield {'x': x[i:i + 32]}\n"
    )
    return ref, cand, data, loader


def measure(cmd: list[str], timeout: float = 1800) -> dict:
    """Run ``cmd``; return seconds, peak RSS (MiB, from wait4), exit code, and its stdout/stderr tails."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        secs = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        o, e = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    return {"seconds": secs, "peak_mib": usage.ru_maxrss / 1024, "code": p.returncode, "stdout": o, "stderr": e}


def worker_shrink(ref: str, cand: str, data: str, budget_mb: float) -> None:
    from onnxshrink.compare import compare

    t0 = time.perf_counter()
    res = compare(ref, cand, data=data, per_layer=True, budget_bytes=int(budget_mb * (1 << 20)), tolerance=1.0,
                  size=False)
    pl = res.per_layer
    top = pl.ranked()[:3]
    print(json.dumps({"seconds": time.perf_counter() - t0, "groups": pl.groups, "matched": len(pl.layers),
                      "peak_batch_mib": pl.peak_batch_bytes / (1 << 20),
                      "top": [(x.match.ref_node, round(x.added_rel_l2, 6)) for x in top]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--hw", type=int, default=24)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--bad", type=int, default=120, help="index of the strongly perturbed block")
    ap.add_argument("--budget-mb", type=float, default=64)
    ap.add_argument("--out", type=Path, default=HERE / "out" / "compare")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-polygraphy", action="store_true")
    ap.add_argument("--grouped-only", action="store_true", help="skip all-at-once and Polygraphy (big graphs)")
    ap.add_argument("--worker", nargs=4, metavar=("REF", "CAND", "DATA", "BUDGET_MB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_shrink(*args.worker[:3], float(args.worker[3]))
        return
    ref, cand, data, loader = build(args.out, args.layers, args.channels, args.hw, args.samples, args.bad)
    tensors = 3 * args.layers
    per_tensor = args.channels * args.hw * args.hw * 4 * min(32, args.samples)
    print(f"model: {args.layers} blocks, {tensors} intermediate tensors of [N,{args.channels},{args.hw},{args.hw}] "
          f"float32; {args.samples} samples in batches of 32 → {per_tensor / 2**20:.2f} MiB per tensor per batch, "
          f"{2 * tensors * per_tensor / 2**20:.0f} MiB for every tensor of both models at once")
    rows = []
    me = [sys.executable, str(Path(__file__).resolve())]
    runs = [(f"onnxshrink grouped ({args.budget_mb:g} MiB)", args.budget_mb), ("onnxshrink all-at-once", 1e9)]
    for label, budget in runs[:1] if args.grouped_only else runs:
        r = measure(me + ["--worker", str(ref), str(cand), str(data), str(budget)])
        if r["code"] != 0:
            print(f"{label}: FAILED\n{r['stderr'][-2000:]}")
            continue
        info = json.loads(r["stdout"].strip().splitlines()[-1])
        rows.append({"tool": label, "seconds": r["seconds"], "peak_mib": r["peak_mib"], **info})
    poly = shutil.which("polygraphy") or str(Path(sys.executable).with_name("polygraphy"))
    if not (args.no_polygraphy or args.grouped_only) and Path(poly).exists():
        saved = args.out / "poly_ref.json"
        base = [poly, "run", "--onnxrt", "--onnx-outputs", "mark", "all", "--data-loader-script", str(loader)]
        r1 = measure([poly, "run", str(ref)] + base[2:] + ["--save-outputs", str(saved)])
        r2 = measure([poly, "run", str(cand)] + base[2:] + ["--load-outputs", str(saved)])
        failed = len(set(re.findall(r"FAILED \| Output: '([^']+)'", r2["stdout"] + r2["stderr"])))
        if r1["code"] != 0:
            print(f"polygraphy: FAILED\n{r1['stderr'][-2000:]}")
        else:
            rows.append({"tool": "polygraphy mark all (save + compare)", "seconds": r1["seconds"] + r2["seconds"],
                         "peak_mib": max(r1["peak_mib"], r2["peak_mib"]), "groups": 1,
                         "saved_mib": saved.stat().st_size / 2**20 if saved.exists() else None,
                         "tensors_failed": failed, "exit": r2["code"]})
    print(f"\n{'tool':42} {'time s':>8} {'peak RSS MiB':>13} {'groups':>7}  top layer by added error / note")
    for r in rows:
        note = (f"{r['top'][0][0]} (+{r['top'][0][1]:.3g}); peak tensors/batch {r['peak_batch_mib']:.0f} MiB"
                if "top" in r else f"{r.get('tensors_failed')} tensors flagged FAILED at default tolerance; "
                f"saved outputs {r.get('saved_mib') or 0:.0f} MiB on disk")
        print(f"{r['tool']:42} {r['seconds']:8.1f} {r['peak_mib']:13.0f} {r.get('groups', ''):>7}  {note}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
