"""Capture intermediate tensors of an ``ir.Model`` with onnxruntime, in bounded memory.

Passes that learn from data (quant calibration, prune importance and reconstruction, low-rank whitening)
and per-layer comparison need the values of tensors inside the graph. onnxruntime only returns graph
outputs, so :class:`ActivationCapture` writes a copy of the model whose outputs are the requested values
(the ``ir.Model`` itself is left exactly as it was) to a temporary file, opens a CPU session on it and
streams the data set through it batch by batch: nothing is kept between batches, so memory is one batch
of the requested tensors. :func:`plan_groups` splits a long list of names into groups whose tensors fit a
byte budget per batch, one session per group.

Only values of the main graph can be captured (values inside If/Loop/Scan bodies are not graph
outputs); graph inputs are returned from the feed itself. Values whose element type is unknown are
refused by :class:`ActivationCapture` with a ``ValueError`` — run shape inference first.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from onnxshrink.calib import Dataset

__all__ = ["ActivationCapture", "plan_groups", "capturable", "value_bytes_per_sample"]

MAX_BATCH = 32


def capturable(model: ir.Model) -> dict[str, ir.Value]:
    """Every value of the main graph that can be captured, by name: node outputs and graph inputs with a
    known tensor element type (initializers are excluded: read them from the model)."""
    out: dict[str, ir.Value] = {}
    for v in model.graph.inputs:
        if v.name and v.const_value is None and isinstance(v.type, ir.TensorType):
            out[v.name] = v
    for node in model.graph:
        for v in node.outputs:
            if v.name and isinstance(v.type, ir.TensorType):
                out[v.name] = v
    return out


def value_bytes_per_sample(value: ir.Value) -> int:
    """Estimated bytes of ``value`` for one sample (dynamic or unknown dims count as 1, unknown rank as
    4096 elements)."""
    itemsize = value.dtype.itemsize if value.dtype is not None else 4
    if value.shape is None:
        return 4096 * itemsize
    n = 1
    for i, d in enumerate(value.shape):
        if isinstance(d, int):
            n *= max(d, 1) if i > 0 else 1  # axis 0 is the batch axis in almost every export
    return int(n * itemsize)


def plan_groups(model: ir.Model, names: Sequence[str], *, budget_bytes: int = 256 << 20,
                max_batch: int = MAX_BATCH) -> list[list[str]]:
    """Split ``names`` into groups whose tensors, for one batch of ``max_batch`` samples, fit in
    ``budget_bytes``. Order is kept; a single tensor larger than the budget gets a group of its own."""
    values = capturable(model)
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name in names:
        size = value_bytes_per_sample(values[name]) * max_batch if name in values else 0
        if current and used + size > budget_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        groups.append(current)
    return groups


class ActivationCapture:
    """A session over a copy of ``model`` whose outputs are ``names`` (plus the model's own outputs when
    ``with_outputs``).

    Use as a context manager; :meth:`run` yields one dict ``{name: array}`` per batch of the data set.
    Arrays have the batch axis first (``samples_per_batch`` of them when the model takes batches).

    Raises:
        ValueError: a name is not a capturable value of the main graph.
        RuntimeError: onnxruntime cannot load the model (the message is onnxruntime's first line).
    """

    def __init__(self, model: ir.Model, names: Iterable[str], *, with_outputs: bool = False,
                 workdir: str | os.PathLike | None = None) -> None:
        from onnxshrink.model import save_model
        from onnxshrink.validate import _batchable, _first_line, make_session

        values = capturable(model)
        self.names = list(dict.fromkeys(names))
        missing = [n for n in self.names if n not in values]
        if missing:
            raise ValueError(f"cannot capture {missing[0]!r}: not a typed value of the main graph")
        input_names = {v.name for v in model.graph.inputs}
        self._from_feed = [n for n in self.names if n in input_names]
        out_names = [v.name for v in model.graph.outputs]
        extra = [n for n in self.names if n not in input_names and n not in out_names]
        self.output_names = (out_names if with_outputs else []) + [n for n in self.names if n in out_names
                                                                    and not with_outputs] + extra
        self._own_dir = workdir is None
        self._dir = Path(tempfile.mkdtemp(prefix="onnxshrink-capture-") if workdir is None else workdir)
        path = self._dir / "capture.onnx"
        graph_outputs = model.graph.outputs
        saved = list(graph_outputs)
        try:
            for n in extra:
                graph_outputs.append(values[n])
            save_model(model, path)
        finally:
            graph_outputs.clear()
            graph_outputs.extend(saved)
        try:
            self.session = make_session(path)
        except Exception as e:
            self.close()
            raise RuntimeError(f"onnxruntime cannot load the model: {_first_line(e)}") from e
        self.batchable = _batchable(self.session)

    def run(self, data: Dataset, *, limit: int | None = None, max_batch: int = MAX_BATCH,
            progress: Callable[[str, int, int], None] | None = None,
            label: str = "capturing activations") -> Iterator[dict[str, np.ndarray]]:
        """Yield ``{name: array}`` for every batch of ``data`` (at most ``limit`` samples).

        Batches of up to ``max_batch`` samples are used when every input's axis 0 is dynamic; if the
        model refuses a batch, the rest runs one sample at a time.
        """
        total = data.num_samples if limit is None else min(limit, data.num_samples)
        done = 0
        batchable = self.batchable and max_batch > 1
        if batchable:
            try:
                for feed in data.batches(max_batch, True, limit):
                    outs = self.session.run(self.output_names, feed) if self.output_names else []
                    yield self._assemble(feed, outs)
                    done += len(next(iter(feed.values()))) if feed else 1
                    if progress:
                        progress(label, min(done, total), total)
                return
            except Exception:
                # a dynamic batch axis that only runs with batch 1: go on one sample at a time
                pass
        for i, feed in enumerate(data.samples(limit)):
            if i < done:
                continue
            outs = self.session.run(self.output_names, feed) if self.output_names else []
            yield self._assemble(feed, outs)
            done += 1
            if progress:
                progress(label, done, total)

    def _assemble(self, feed: dict[str, np.ndarray], outs: Sequence[Any]) -> dict[str, np.ndarray]:
        result = {n: np.asarray(o) for n, o in zip(self.output_names, outs)}
        for n in self._from_feed:
            result[n] = feed[n]
        return result

    def close(self) -> None:
        """Release the session and delete the temporary model."""
        self.session = None
        if self._own_dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ActivationCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def num_batches(data: Dataset, limit: int | None, max_batch: int) -> int:
    """How many batches :meth:`ActivationCapture.run` yields at most (for progress totals)."""
    n = data.num_samples if limit is None else min(limit, data.num_samples)
    return max(1, math.ceil(n / max(1, max_batch)))
