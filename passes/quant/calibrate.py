"""Static calibration: activation statistics streamed through onnxruntime via ``PassContext.capture``.

Pass 1 over the data (``samples`` at most, one batch at a time) records per-tensor min/max, batches with
NaN/Inf, and per-channel sums of Conv/Gemm/MatMul inputs (for bias correction); for ``percentile``,
``entropy`` and ``mse`` pass 2 fills a 2048-bin histogram over ``[min, max]``. Memory is the histograms plus
one batch, whatever the number of samples. Tensors are captured in groups whose batch fits a memory budget
(``capture.plan_groups``). Statistics are cached in ``PassContext.store`` under a hash of the graph,
its initializers, the tensor names, the sample count and the data, so a re-run with another ``calib`` or
target reuses them.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxshrink.passes.quant.ranges import TensorStats


class Calibrator:
    """Streamed activation statistics for static mode (see the module docstring)."""

    def _calibrate(self, model: ir.Model, names: list[str], mean_axes: dict[str, int]) -> dict[str, TensorStats]:
        from onnxshrink.capture import plan_groups

        o = self.options
        data = self.context.data
        need_hist = o.calib != "minmax"
        store = self.context.store
        key = None
        stats: dict[str, TensorStats] = {}
        if store is not None:
            key = calib_key(model, names, data, o.samples)
            cached = store.get(key)
            if cached is not None:
                stats = {n: TensorStats.from_arrays(d) for n, d in cached.items()}
                if all(n in stats for n in names) and (not need_hist or all(
                        stats[n].hist is not None for n in names)):
                    self.count("calibration_cache_hits")
                    self.details["calibration"] = f"cached ({len(names)} tensors)"
                    return stats
                stats = {}
        limit = min(o.samples, data.num_samples)
        groups = plan_groups(model, names)
        progress = self.context.progress
        for gi, group in enumerate(groups):
            for n in group:
                stats[n] = TensorStats()
            with self.context.capture(model, group) as cap:
                for batch in cap.run(data, limit=limit, progress=progress,
                                     label=f"calibrating (min/max, group {gi + 1}/{len(groups)})"):
                    for n in group:
                        x = batch[n]
                        if x.dtype.kind != "f":
                            continue
                        stats[n].add_minmax(x, mean_axes.get(n))
                if need_hist:
                    for batch in cap.run(data, limit=limit, progress=progress,
                                         label=f"calibrating (histograms, group {gi + 1}/{len(groups)})"):
                        for n in group:
                            x = batch[n]
                            if x.dtype.kind == "f" and math.isfinite(stats[n].lo):
                                stats[n].add_hist(x)
        self.details["calibration"] = f"{o.calib} on {limit} samples, {len(names)} tensors, {len(groups)} group(s)"
        if store is not None and key is not None:
            store.put(key, {n: s.to_arrays() for n, s in stats.items()})
        return stats


def calib_key(model: ir.Model, names: list[str], data: Any, samples: int) -> str:
    """Hash of what calibration statistics depend on: the graph, its weights, the tensors, the data."""
    h = hashlib.sha256()
    for node in model.graph:
        h.update(f"{node.domain}:{node.op_type}:{[v.name if v else '' for v in node.inputs]}:"
                 f"{[v.name for v in node.outputs]}:{sorted((k, repr(a.value)) for k, a in node.attributes.items() if a.type != ir.AttributeType.GRAPH)}".encode())
    for name, v in sorted(model.graph.initializers.items()):
        h.update(name.encode())
        if v.const_value is not None:
            h.update(v.const_value.tobytes())
    h.update(repr(names).encode())
    h.update(str(samples).encode())
    for i, sample in enumerate(data.samples(samples)):
        for k in sorted(sample):
            h.update(k.encode())
            h.update(np.ascontiguousarray(sample[k]).tobytes())
    return h.hexdigest()[:32]

