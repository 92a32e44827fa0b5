"""Accuracy-driven fallback (``max_drop``): the fewest, most sensitive layers go back to float.

The quantized model is scored against the float one on the data: ``top1`` (percent of samples whose
argmax changed), ``accuracy`` (labeled top-1 points lost), ``cosine`` (``1 − mean cos``) or ``rel_l2`` of the
first output. While the drop exceeds the budget, each weighted layer is ranked by how much the score
recovers when that layer alone reads its float inputs (one model run per layer), and layers fall back in
that order until the drop holds. Every rewired input was recorded by ``_replace``, so a layer is switched
by swapping inputs, never by rebuilding the graph. Model runs go through ``PassContext.capture``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from onnxshrink.errors import UsageError


class Recovery:
    """max_drop: input recording, switching layers to float, scoring (see the module docstring)."""

    def _replace(self, node: ir.Node, slot: int, new: ir.Value) -> None:
        """Rewire ``node``'s input ``slot`` and remember the float original (for fallback)."""
        rec = self._restore.setdefault(id(node), (node, {}))[1]
        if slot not in rec:
            rec[slot] = [node.inputs[slot] if slot < len(node.inputs) else None, None]
        rec[slot][1] = new
        node.replace_input_with(slot, new)

    def _set_float(self, node: ir.Node, use_float: bool) -> None:
        for slot, (orig, quant) in self._restore[id(node)][1].items():
            target = orig if use_float else quant
            if target is not None and target.const_value is not None and target.graph is None:
                node.graph.register_initializer(target)
            node.replace_input_with(slot, target)

    def _fallback(self, model: ir.Model) -> None:
        """Fall back the fewest, most sensitive layers to float until the drop is within ``max_drop``."""
        o = self.options
        ref = self._reference
        layers = [node for node, _ in self._restore.values()
                  if node.graph is model.graph and node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")]
        drop = self._score(model, ref)
        report: dict[str, Any] = {"metric": ref["metric"], "budget": o.max_drop, "drop_all_int8": round(drop, 6)}
        fallen: list[str] = []
        if drop > o.max_drop:
            sens = []
            for i, node in enumerate(layers):
                self._set_float(node, True)
                sens.append((drop - self._score(model, ref), i))
                self._set_float(node, False)
                if self.context.progress:
                    self.context.progress("ranking layer sensitivity", i + 1, len(layers))
            sens.sort(key=lambda t: (-t[0], t[1]))
            for gain, i in sens:
                node = layers[i]
                self._set_float(node, True)
                fallen.append(node.name or node.op_type)
                drop = self._score(model, ref)
                self.count("layers_float_fallback")
                if drop <= o.max_drop:
                    break
        report["drop_final"] = round(drop, 6)
        report["float_layers"] = fallen
        report["met"] = bool(drop <= o.max_drop)
        self.details["max_drop"] = report
        if not report["met"]:
            self.decline("max_drop not met even with every layer in float")

    def _score(self, model: ir.Model, ref: dict[str, Any]) -> float:
        """The drop of ``model`` against the float reference, in the metric's units."""
        outs = run_outputs(self.context, model, self.options.samples)
        return drop_of(ref, outs, self.context)


def run_outputs(context: Any, model: ir.Model, samples: int) -> list[np.ndarray]:
    """The first output of ``model`` for every sample of the context's data, one array per batch."""
    data = context.data
    first = model.graph.outputs[0].name
    with context.capture(model, [], with_outputs=True) as cap:
        chunks = [np.asarray(b[first]) for b in cap.run(data, limit=min(samples, data.num_samples))]
    return chunks


def reference(outs: list[np.ndarray], metric: str, context: Any) -> dict[str, Any]:
    labels = getattr(context, "labels", None)
    y = np.concatenate([o.reshape(len(o), -1) if o.ndim > 1 else o.reshape(1, -1) for o in outs])
    if metric == "auto":
        if labels is not None:
            metric = "accuracy"
        elif y.ndim == 2 and y.shape[1] > 1 and outs[0].ndim == 2:
            metric = "top1"
        else:
            metric = "cosine"
    if metric == "accuracy" and labels is None:
        raise UsageError("metric=accuracy needs --labels", option="metric", pass_name="quant",
                         hint="give --labels labels.npy, or metric=top1")
    ref = {"metric": metric, "y": y}
    if metric == "accuracy":
        lab = np.asarray(labels).reshape(-1)[: len(y)]
        ref["labels"] = lab
        ref["acc"] = float(np.mean(y.argmax(axis=1) == lab)) * 100
    return ref


def drop_of(ref: dict[str, Any], outs: list[np.ndarray], context: Any) -> float:
    y = ref["y"]
    c = np.concatenate([o.reshape(len(o), -1) if o.ndim > 1 else o.reshape(1, -1) for o in outs])
    m = ref["metric"]
    if m == "top1":
        return float(100.0 - np.mean(c.argmax(axis=1) == y.argmax(axis=1)) * 100)
    if m == "accuracy":
        return float(ref["acc"] - np.mean(c.argmax(axis=1) == ref["labels"]) * 100)
    if m == "cosine":
        num = np.sum(y * c, axis=1)
        den = np.linalg.norm(y, axis=1) * np.linalg.norm(c, axis=1)
        cos = np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)
        return float(1.0 - np.mean(cos))
    return float(np.linalg.norm(y - c) / max(np.linalg.norm(y), 1e-30))


