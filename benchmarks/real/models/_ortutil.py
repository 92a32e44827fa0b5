"""Small helpers shared by the audio, face and transformer cases (no ``CASES`` here: not a case module).

- ``common``: the ``benchmarks/real/common.py`` module, importable whether the case module runs as a script,
  as ``models.x`` with ``benchmarks/real`` on ``sys.path``, or as ``benchmarks.real.models.x``.
- ``run_batched``: onnxruntime CPU, one intra-op thread (the machine is shared; one thread keeps eval times
  predictable), the eval set in fixed chunks so a model with a fixed batch of 1 still works (chunk=1).
- ``fp32_outputs``: the fp32 model's outputs on the eval set, computed once and cached next to the data,
  so every variant is scored against the same reference.
- ``write_wav``: float32 mono WAV (IEEE float, format 3) with the standard library only, for the ``raw`` files.
"""

from __future__ import annotations

import importlib
import struct
import sys
from pathlib import Path

import numpy as np

try:  # imported as benchmarks.real.models.x
    from .. import common  # type: ignore[no-redef]
except ImportError:  # run as a script, or imported with benchmarks/real on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    common = importlib.import_module("common")


def session(model: Path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def run_batched(model: Path, feeds: dict[str, np.ndarray], chunk: int = 8,
                outputs: list[str] | None = None) -> list[np.ndarray]:
    """Run ``model`` over stacked ``feeds`` (``[N, ...]`` each) in chunks; outputs concatenated on axis 0."""
    sess = session(model)
    names = outputs or [o.name for o in sess.get_outputs()]
    n = len(next(iter(feeds.values())))
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for s in range(0, n, chunk):
        res = sess.run(names, {k: v[s:s + chunk] for k, v in feeds.items()})
        for acc, r in zip(parts, res):
            acc.append(np.asarray(r))
    return [np.concatenate(p, axis=0) for p in parts]


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def fp32_outputs(fp32_model: Path, eval_npz: Path, cache_file: Path, chunk: int = 8,
                 outputs: list[str] | None = None) -> list[np.ndarray]:
    """The reference outputs of the fp32 model on ``eval_npz`` (cached in ``cache_file``)."""
    if cache_file.exists():
        z = load_npz(cache_file)
        return [z[f"o{i}"] for i in range(len(z))]
    res = run_batched(fp32_model, load_npz(eval_npz), chunk=chunk, outputs=outputs)
    tmp = cache_file.with_name(cache_file.name + ".part.npz")
    np.savez(tmp, **{f"o{i}": r for i, r in enumerate(res)})
    tmp.replace(cache_file)
    return res


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write atomically (a ``.part`` file renamed), so an interrupted prepare never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """Mono float32 WAV (WAVE_FORMAT_IEEE_FLOAT), readable by soundfile/scipy; bit-exact round trip."""
    data = np.ascontiguousarray(audio, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, sample_rate, sample_rate * 4, 4, 32)
    # a 'fact' chunk is required for non-PCM formats by the spec
    fact = struct.pack("<I", len(audio))
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"fact" + struct.pack("<I", 4) + fact
            + b"data" + struct.pack("<I", len(data)) + data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def write_wavs(folder: Path, clips: np.ndarray, sample_rate: int, prefix: str) -> Path:
    """One WAV per row of ``clips`` (``prefix_0000.wav``...), idempotent (existing folder kept)."""
    if folder.exists() and len(list(folder.glob("*.wav"))) == len(clips):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, clip in enumerate(clips):
        write_wav(folder / f"{prefix}_{i:04d}.wav", clip, sample_rate)
    return folder
