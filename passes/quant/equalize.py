"""Cross-layer equalization (CLE) of ``Conv₁ → Relu|Clip(0, M) → Conv₂`` pairs.

With per-channel weight ranges ``r₁ᵢ`` (output channel i of Conv₁) and ``r₂ᵢ`` (input channel i of Conv₂,
grouped and depthwise Convs included), ``sᵢ = √(r₁ᵢ / r₂ᵢ)``; ``W₁ᵢ /= sᵢ``, ``b₁ᵢ /= sᵢ``,
``W₂[:, i] *= sᵢ``, three sweeps. Exact because ``relu(x/s) = relu(x)/s`` for ``s > 0``.

``Clip(0, M)`` (ReLU6) is not scale-equivariant: channel i would need its own bound ``M/sᵢ``. So the
per-channel maxima of the Clip's input are measured on the calibration data first; after equalizing, the
Clip gets one bound ``C = maxᵢ min(maxᵢ, M)/sᵢ`` and the channels the Clip cut in calibration are rescaled
once more to ``sᵢ = M/C``: the pair is then exact for those channels on any input, and for the others on any
input within their calibrated range (where the quantized model clamps anyway).

Default ``cle=auto``: on only with per-tensor weights. With per-channel weight scales equalizing buys nothing
for the weights and widens activation ranges. Preconditions: every weight and bias touched is a constant
used only by that Conv; the Relu/Clip has no other consumer and is not a graph output.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxshrink.passes.quant.graph import attr, clip_bound, is_onnx, is_weight, sole_consumer


class Equalizer:
    """Cross-layer equalization (see the module docstring)."""

    def _cle(self, model: ir.Model) -> bool:
        """Cross-layer equalization of Conv→Relu→Conv and Conv→Clip(0, M)→Conv pairs (see module doc)."""
        pairs: list[tuple[ir.Node, ir.Node, ir.Node]] = []
        for conv1 in model.graph:
            if not is_onnx(conv1, "Conv") or self._excluded(conv1):
                continue
            act = sole_consumer(conv1.outputs[0])
            if act is None or not is_onnx(act, "Relu", "Clip") or act.outputs[0].is_graph_output():
                continue
            conv2 = sole_consumer(act.outputs[0])
            if conv2 is None or not is_onnx(conv2, "Conv") or self._excluded(conv2):
                continue
            if act.op_type == "Clip" and clip_bound(act) is None:
                self.decline("CLE: Clip is not Clip(0, M) with constant bounds", act)
                continue
            pairs.append((conv1, act, conv2))
        clips = [(c1, act) for c1, act, _ in pairs if act.op_type == "Clip"]
        seen: dict[str, np.ndarray] = {}
        if clips:
            seen = self._channel_max(model, [c1.outputs[0].name for c1, _ in clips])
        scale: dict[int, np.ndarray] = {}  # id(Clip) -> cumulative s (Conv₁ output channel i now holds x_i / s_i)
        usable = []
        for conv1, act, conv2 in pairs:
            if act.op_type == "Clip":
                m = seen.get(conv1.outputs[0].name)
                w1 = conv1.inputs[1]
                if m is None or not is_weight(w1) or m.shape[0] != w1.const_value.shape[0]:
                    self.decline("CLE: Clip input not observed per channel in calibration", act)
                    continue
                scale[id(act)] = np.ones(m.shape[0], np.float64)
            usable.append((conv1, act, conv2))
        changed = False
        for _round in range(3):
            n = 0
            for conv1, act, conv2 in usable:
                s = self._equalize(conv1, conv2)
                if s is not None:
                    n += 1
                    if id(act) in scale:
                        scale[id(act)] *= s
            if not n:
                break
            changed = True
            if _round == 0:
                self.count("cle_pairs", n)
        for conv1, act, conv2 in usable:
            if id(act) in scale and not np.allclose(scale[id(act)], 1.0):
                self._rebound_clip(conv1, act, conv2, scale[id(act)], seen[conv1.outputs[0].name])
        return changed

    def _channel_max(self, model: ir.Model, names: list[str]) -> dict[str, np.ndarray]:
        """Per-channel (axis 1) maximum of each tensor over the calibration data, streamed."""
        from onnxshrink.capture import plan_groups

        data = self.context.data
        limit = min(self.options.samples, data.num_samples)
        out: dict[str, np.ndarray] = {}
        try:
            for group in plan_groups(model, names):
                with self.context.capture(model, group) as cap:
                    for batch in cap.run(data, limit=limit, progress=self.context.progress,
                                         label="CLE: per-channel ranges"):
                        for n in group:
                            x = batch[n]
                            if x.ndim < 2 or x.dtype.kind != "f":
                                continue
                            m = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1).max(axis=1).astype(np.float64)
                            out[n] = m if n not in out else np.maximum(out[n], m)
        except (RuntimeError, ValueError):
            return {}
        return out

    def _rebound_clip(self, conv1: ir.Node, act: ir.Node, conv2: ir.Node, s: np.ndarray, seen: np.ndarray) -> None:
        """Give the equalized ``Clip(0, M)`` one new bound ``C`` that keeps the pair exact on the data.

        Channel ``i`` now holds ``x_i / s_i`` and needs the bound ``M / s_i``. Channels the Clip cut in
        calibration (``max x_i ≥ M``) get ``s_i := M / C`` (rescaled once more, exactly), so ``C`` is their
        bound; the others stayed below ``M`` and ``C ≥ max x_i / s_i`` never cuts them on such inputs.
        """
        bound = clip_bound(act)
        assert bound is not None
        c = float(np.max(np.minimum(seen, bound) / s))
        if not (c > 0 and math.isfinite(c)):
            return
        active = seen >= bound
        target = np.where(active, bound / c, s)
        t = (target / s).astype(np.float64)
        if not np.allclose(t, 1.0):
            self._scale_pair(conv1, conv2, t)
        graph = act.graph
        act.replace_input_with(2, self._new_init(graph, self._short("clip"), np.array(c, np.float32)))
        self.count("cle_clip_rebounded")

    def _equalize(self, conv1: ir.Node, conv2: ir.Node) -> np.ndarray | None:
        w1v, w2v = conv1.inputs[1], conv2.inputs[1]
        b1v = conv1.inputs[2] if len(conv1.inputs) > 2 else None
        for v in (w1v, w2v, b1v):
            if v is not None and (not is_weight(v) or len(v.uses()) != 1):
                return None
        w1, w2 = w1v.const_value.numpy(), w2v.const_value.numpy()
        c = w1.shape[0]
        g2 = attr(conv2, "group", 1)
        cpg2 = w2.shape[1]
        if cpg2 * g2 != c:
            return None
        r1 = np.abs(w1.reshape(c, -1)).max(axis=1)
        opg2 = w2.shape[0] // g2
        # input channel i of conv2 is column (i % cpg2) of the output channels of its group
        r2 = np.zeros(c, np.float32)
        for i in range(c):
            g = i // cpg2
            r2[i] = np.abs(w2[g * opg2:(g + 1) * opg2, i % cpg2]).max()
        ok = (r1 > 0) & (r2 > 0)
        s = np.ones(c, np.float64)
        s[ok] = np.sqrt(r1[ok] / r2[ok])
        if np.allclose(s, 1.0, rtol=1e-3):
            return None
        self._scale_pair(conv1, conv2, s)
        return s

    def _scale_pair(self, conv1: ir.Node, conv2: ir.Node, s: np.ndarray) -> None:
        """Output channel i of Conv₁ (weights, bias) ÷ sᵢ, input channel i of Conv₂ × sᵢ."""
        w1v, w2v = conv1.inputs[1], conv2.inputs[1]
        b1v = conv1.inputs[2] if len(conv1.inputs) > 2 else None
        w1, w2 = w1v.const_value.numpy(), w2v.const_value.numpy()
        c, cpg2 = w1.shape[0], w2.shape[1]
        opg2 = w2.shape[0] // (c // cpg2)
        w1n = w1 / s.reshape(-1, *([1] * (w1.ndim - 1)))
        w2n = w2.astype(np.float64)
        for i in range(c):
            g = i // cpg2
            w2n[g * opg2:(g + 1) * opg2, i % cpg2] *= s[i]
        w1v.const_value = ir.tensor(w1n.astype(np.float32), name=w1v.name)
        w2v.const_value = ir.tensor(w2n.astype(np.float32), name=w2v.name)
        if b1v is not None:
            b1v.const_value = ir.tensor((b1v.const_value.numpy() / s).astype(np.float32), name=b1v.name)
