"""Input data: reading ``--data`` and making deterministic synthetic inputs.

``--data`` is an ``.npz`` with one array per input name, or a folder of ``.npz`` files (each one chunk of
samples) or ``.npy`` files (named after the inputs, or any names for a one-input model). An array with one
more axis than its input is a stack of samples (``[N, *input_shape]``); one with the input's own rank is
split along the batch axis into samples of batch 1 when that axis is dynamic, else taken as one sample. Names, ranks, static dims and dtypes are checked
against the graph; NaN/Inf are refused.

A :class:`Dataset` reads its files one chunk at a time, so memory does not grow with the number of files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx_ir as ir

from onnxshrink.errors import DataError, UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "InputSpec",
    "Dataset",
    "input_specs",
    "load_data",
    "synthetic_data",
    "parse_input_shapes",
]

SYNTHETIC_SAMPLES = 4


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype and shape (ints for static dims, None for dynamic ones)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None

    @property
    def rank(self) -> int | None:
        """Number of axes, or None if the rank is unknown."""
        return None if self.shape is None else len(self.shape)


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The model's real inputs (graph inputs that are not initializers)."""
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        dtype = value.dtype
        if dtype is None:
            raise DataError(f"input {value.name!r} has no declared type", tensor=value.name,
                            hint="the model must declare its inputs' types; re-export it")
        try:
            np_dtype = np.dtype(dtype.numpy())
        except Exception:
            np_dtype = np.dtype(object)
        shape = None
        if value.shape is not None:
            shape = tuple(d if isinstance(d, int) else None for d in value.shape)
        specs.append(InputSpec(value.name or "", np_dtype, shape))
    return specs


def parse_input_shapes(items: list[str] | None) -> dict[str, list[int]]:
    """Parse ``name=1x3x224x224`` items (``--input-shape``) into ``{name: [1, 3, 224, 224]}``.

    Raises:
        UsageError: malformed item.
    """
    shapes: dict[str, list[int]] = {}
    for item in items or []:
        m = re.fullmatch(r"\s*([^=\s]+)\s*=\s*(\d+(?:\s*[x,]\s*\d+)*)\s*", item)
        if not m:
            raise UsageError(
                f"bad --input-shape {item!r}", hint="write NAME=DIMS with dims joined by x, e.g. input=1x3x224x224"
            )
        shapes[m.group(1)] = [int(d) for d in re.split(r"\s*[x,]\s*", m.group(2))]
    return shapes


class Dataset:
    """Samples for every model input, read chunk by chunk.

    Every chunk is a dict ``{input_name: array[n, *feed_shape]}``: ``n`` samples, each a complete feed
    for that input (including its own batch axis).
    """

    def __init__(self, chunks: list[Callable[[], dict[str, np.ndarray]]], num_samples: int, source: str):
        self._chunks = chunks
        self.num_samples = num_samples
        self.source = source

    def samples(self, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield one feed dict per sample (arrays with the model's input rank)."""
        done = 0
        for load in self._chunks:
            chunk = load()
            if not chunk:  # a model without inputs: one empty feed
                yield {}
                return
            n = len(next(iter(chunk.values())))
            for i in range(n):
                if limit is not None and done >= limit:
                    return
                yield {k: np.asarray(v[i]) for k, v in chunk.items()}
                done += 1

    def batches(self, max_batch: int, batchable: bool, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield feeds; if ``batchable`` (axis 0 dynamic everywhere) up to ``max_batch`` samples are
        concatenated along axis 0 into one feed."""
        if not batchable or max_batch <= 1:
            yield from self.samples(limit)
            return
        pending: list[dict[str, np.ndarray]] = []
        for sample in self.samples(limit):
            pending.append(sample)
            if len(pending) == max_batch:
                yield {k: np.concatenate([p[k] for p in pending], axis=0) for k in pending[0]}
                pending = []
        if pending:
            yield {k: np.concatenate([p[k] for p in pending], axis=0) for k in pending[0]}


def _fit_array(spec: InputSpec, arr: np.ndarray, origin: str) -> np.ndarray:
    """Check one array against its input and return it as ``[n, *feed_shape]`` in the input's dtype."""
    if not isinstance(arr, np.ndarray) or arr.dtype == object:
        raise DataError(f"{origin}: array for input {spec.name!r} is not numeric", tensor=spec.name,
                        hint="save plain numeric arrays (np.savez)")
    rank = spec.rank
    if rank is None:
        stacked = arr[None]
    elif arr.ndim == rank + 1:
        stacked = arr
    elif arr.ndim == rank and rank >= 1 and spec.shape is not None and spec.shape[0] is None:
        stacked = arr[:, None]  # a batch along a dynamic axis 0: split into samples of batch 1
    elif arr.ndim == rank:
        stacked = arr[None]  # one complete feed
    else:
        raise DataError(
            f"{origin}: array for input {spec.name!r} has {arr.ndim} axes {list(arr.shape)}, "
            f"the input has {rank} {list(spec.shape or [])}",
            tensor=spec.name,
            hint=f"give [N, *input_shape] ({rank + 1} axes) or a batch with the input's {rank} axes",
        )
    if spec.shape is not None:
        feed = stacked.shape[1:]
        for axis, (want, got) in enumerate(zip(spec.shape, feed)):
            if want is not None and want != got:
                raise DataError(
                    f"{origin}: input {spec.name!r} axis {axis} is {want} in the model but {got} in the data "
                    f"(data shape {list(arr.shape)})",
                    tensor=spec.name,
                    hint="check the preprocessing (layout NCHW vs NHWC, image size)",
                )
    want_dt = spec.dtype
    if stacked.dtype != want_dt:
        # float64 -> float32 and int32 -> int64 are the usual numpy defaults: accepted. Integers for a
        # float input (e.g. uint8 images for a normalized model) are a preprocessing mistake: refused.
        kinds_ok = (stacked.dtype.kind == want_dt.kind) or (stacked.dtype.kind in "iu" and want_dt.kind in "iu")
        if not kinds_ok:
            raise DataError(
                f"{origin}: input {spec.name!r} is {want_dt} in the model but {stacked.dtype} in the data",
                tensor=spec.name,
                hint=f"save the array as {want_dt}",
            )
        stacked = stacked.astype(want_dt)
    if stacked.dtype.kind == "f" and not np.isfinite(stacked).all():
        bad = int((~np.isfinite(stacked)).sum())
        raise DataError(
            f"{origin}: input {spec.name!r} contains {bad} NaN/Inf values",
            tensor=spec.name,
            hint="clean the data; NaN/Inf inputs make every comparison meaningless",
        )
    return stacked


def _fit_chunk(specs: list[InputSpec], arrays: dict[str, np.ndarray], origin: str) -> dict[str, np.ndarray]:
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"unknown name(s) {', '.join(map(repr, extra))}")
        raise DataError(
            f"{origin}: {'; '.join(parts)}",
            hint=f"the model's inputs are {', '.join(map(repr, names))}; save one array per input name",
        )
    out = {s.name: _fit_array(s, arrays[s.name], origin) for s in specs}
    counts = {len(v) for v in out.values()}
    if len(counts) > 1:
        raise DataError(f"{origin}: inputs have different sample counts {sorted(counts)}",
                        hint="give every input the same number of samples")
    return out


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}", hint="is it an .npz made by numpy.savez?") from e


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}", hint="save the data with np.savez / np.save") from e


def load_data(path: str | os.PathLike, specs: list[InputSpec]) -> Dataset:
    """Open ``--data`` and check it against the inputs (the first chunk is read and checked now).

    Raises:
        DataError: missing file, unreadable file, or data that does not fit the inputs.
    """
    p = Path(os.fspath(path))
    if not p.exists():
        raise DataError(f"data path {p} does not exist", hint="check the --data path")
    chunks: list[Callable[[], dict[str, np.ndarray]]] = []
    if p.is_file():
        if p.suffix == ".npy" and len(specs) == 1:
            files_npy = [p]
            chunks = [lambda f=f: _fit_chunk(specs, {specs[0].name: _read_npy(f)}, str(f)) for f in files_npy]
        elif p.suffix == ".npz":
            chunks = [lambda: _fit_chunk(specs, _read_npz(p), str(p))]
        else:
            raise DataError(f"data file {p} is not .npz", hint="save one array per input name with numpy.savez")
    else:
        npz = sorted(p.glob("*.npz"))
        npy = sorted(p.glob("*.npy"))
        names = {s.name for s in specs}
        if npz:
            chunks = [lambda f=f: _fit_chunk(specs, _read_npz(f), str(f)) for f in npz]
        elif npy and {f.stem for f in npy} == names:
            chunks = [lambda: _fit_chunk(specs, {f.stem: _read_npy(f) for f in npy}, str(p))]
        elif npy and len(specs) == 1:
            chunks = [lambda f=f: _fit_chunk(specs, {specs[0].name: _read_npy(f)}, str(f)) for f in npy]
        else:
            raise DataError(
                f"data folder {p} has no usable .npz/.npy files",
                hint="put .npz files (one array per input) or <input_name>.npy files in it",
            )
    # Count samples by reading each chunk once (and check every chunk, so errors show up early).
    total = 0
    for load in chunks:
        chunk = load()
        total += len(next(iter(chunk.values())))
        del chunk
    if total == 0:
        raise DataError(f"data {p} holds no samples", hint="give at least one sample per input")
    return Dataset(chunks, total, str(p))


def resolve_shape(spec: InputSpec, input_shapes: dict[str, list[int]]) -> tuple[list[int], list[str]]:
    """The concrete shape to synthesize for ``spec`` and notes about assumed dims.

    Raises:
        DataError: a dynamic dim other than the leading (batch) one with no ``--input-shape``.
    """
    notes: list[str] = []
    if spec.name in input_shapes:
        shape = list(input_shapes[spec.name])
        if spec.shape is not None:
            if len(shape) != len(spec.shape):
                raise DataError(
                    f"--input-shape for {spec.name!r} has {len(shape)} dims, the input has {len(spec.shape)}",
                    tensor=spec.name,
                    hint=f"give {len(spec.shape)} dims, e.g. {spec.name}=" + "x".join(str(d or 1) for d in spec.shape),
                )
            for axis, (want, got) in enumerate(zip(spec.shape, shape)):
                if want is not None and want != got:
                    raise DataError(
                        f"--input-shape for {spec.name!r} sets axis {axis} to {got}, the model fixes it to {want}",
                        tensor=spec.name,
                        hint="set only the dynamic axes differently; keep the model's fixed ones",
                    )
        return shape, notes
    if spec.shape is None:
        raise DataError(
            f"input {spec.name!r} has no declared shape",
            tensor=spec.name,
            hint=f"give --input-shape {spec.name}=DIMS or --data",
        )
    shape = []
    for axis, d in enumerate(spec.shape):
        if d is not None:
            shape.append(d)
        elif axis == 0:
            shape.append(1)
            notes.append(f"input {spec.name!r}: dynamic batch axis set to 1")
        else:
            raise DataError(
                f"input {spec.name!r} has a dynamic axis {axis} and no data to size it",
                tensor=spec.name,
                hint=f"give --input-shape {spec.name}=" + "x".join(str(x or 1) for x in spec.shape) + " or --data",
            )
    return shape, notes


def synthetic_data(
    specs: list[InputSpec], input_shapes: dict[str, list[int]] | None = None, num_samples: int = SYNTHETIC_SAMPLES
) -> tuple[Dataset, list[str]]:
    """Deterministic synthetic inputs from the declared types and shapes (seeded per input name).

    Floats are standard normal, integers in [0, 4), booleans fair coins, strings short words.

    Returns:
        The dataset and notes about assumed dims.

    Raises:
        DataError: unknown dynamic dims or an input type that cannot be synthesized.
    """
    input_shapes = input_shapes or {}
    unknown = [k for k in input_shapes if k not in {s.name for s in specs}]
    if unknown:
        raise DataError(
            f"--input-shape names unknown input {unknown[0]!r}",
            hint=f"the model's inputs are {', '.join(repr(s.name) for s in specs)}",
        )
    arrays: dict[str, np.ndarray] = {}
    notes: list[str] = []
    if not specs:
        return Dataset([lambda: {}], 1, "synthetic"), notes
    for spec in specs:
        shape, spec_notes = resolve_shape(spec, input_shapes)
        notes += spec_notes
        seed = sum(ord(c) * (i + 1) for i, c in enumerate(spec.name)) % (2**31)
        rng = np.random.default_rng(seed)
        full = [num_samples, *shape]
        kind = spec.dtype.kind
        if kind == "f":
            arr = rng.standard_normal(full).astype(spec.dtype)
        elif kind in "iu":
            arr = rng.integers(0, 4, size=full).astype(spec.dtype)
        elif kind == "b":
            arr = rng.integers(0, 2, size=full).astype(bool)
        elif kind in "OUS":
            words = np.array(["onnx", "shrink", "Monday", "the", "a", "model"], dtype=object)
            arr = words[rng.integers(0, len(words), size=full)]
        elif spec.dtype.name.startswith(("float", "bfloat")):  # ml_dtypes: bfloat16, float8/float4 variants
            arr = rng.standard_normal(full).astype(np.float32).astype(spec.dtype)
        elif spec.dtype.name.startswith(("int", "uint")):  # ml_dtypes: int4/int2 variants
            arr = rng.integers(0, 2, size=full).astype(spec.dtype)
        else:
            raise DataError(
                f"cannot make synthetic data for input {spec.name!r} of type {spec.dtype}",
                tensor=spec.name,
                hint="give --data",
            )
        arrays[spec.name] = arr
    return Dataset([lambda: arrays], num_samples, "synthetic"), notes


class StatsStore:
    """A folder of ``<key>.npz`` files holding statistics worth keeping between runs (calibration).

    Each entry is a dict ``{tensor_name: {field: array}}``. Writes are atomic (temp file + rename); a
    corrupt or unreadable entry is treated as missing. The default folder is ``$ONNXSHRINK_CACHE_DIR``
    or ``~/.cache/onnxshrink``; ``ONNXSHRINK_CACHE_DIR=off`` disables the store.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @classmethod
    def default(cls) -> StatsStore | None:
        """The store the CLI and :func:`onnxshrink.optimize` use, or None when disabled."""
        env = os.environ.get("ONNXSHRINK_CACHE_DIR")
        if env is not None and env.strip().lower() in ("", "off", "0", "none"):
            return None
        root = Path(env) if env else Path.home() / ".cache" / "onnxshrink"
        return cls(root / "calib")

    def get(self, key: str) -> dict[str, dict[str, np.ndarray]] | None:
        path = self.root / f"{key}.npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                out: dict[str, dict[str, np.ndarray]] = {}
                for k in z.files:
                    tensor, _, field = k.rpartition("::")
                    out.setdefault(tensor, {})[field] = z[k]
                return out
        except (OSError, ValueError, KeyError):
            return None

    def put(self, key: str, entry: dict[str, dict[str, np.ndarray]]) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            flat = {f"{t}::{f}": a for t, d in entry.items() for f, a in d.items()}
            tmp = self.root / f".{key}.{os.getpid()}.tmp.npz"
            np.savez(tmp, **flat)
            os.replace(tmp, self.root / f"{key}.npz")
        except OSError as e:  # a cache that cannot be written is not an error
            logger.debug("calibration cache not written: %s", e)
