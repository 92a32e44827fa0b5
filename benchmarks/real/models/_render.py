"""Deterministic rendering of text lines and document pages with the DejaVu fonts (no ``CASES``: not a case module).

The fonts come from Debian's ``fonts-dejavu-core`` (``apt-get install -y fonts-dejavu-core``); nothing is
downloaded here. Every random choice is drawn from a ``numpy.random.Generator`` the caller seeds, so the same
seed gives the same pixels on any machine with the same font files and Pillow version.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np

try:  # imported as benchmarks.real.models.x
    from .. import common  # type: ignore[no-redef]  # noqa: F401
except ImportError:  # run with benchmarks/real on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    common = importlib.import_module("common")

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
         "DejaVuSansMono.ttf"]

WORDS = ("the of and to in is for on that with as by this are from be at or an was it which model data "
         "results table figure section method using value time system page line text layout energy "
         "quantization network image signal order report total sample error first second third market "
         "price water light north river city street house school garden paper letter number account "
         "invoice amount balance credit customer service product review summary analysis test case "
         "Monday April London Paris Berlin ONNX CPU Python Linux").split()


def font(name: str, size: int):
    from PIL import ImageFont

    path = FONT_DIR / name
    if not path.exists():
        raise RuntimeError(f"{path} missing: apt-get install -y fonts-dejavu-core")
    return ImageFont.truetype(str(path), size)


def random_text(rng: np.random.Generator, min_chars: int, max_chars: int) -> str:
    """Words, numbers and a little punctuation, between ``min_chars`` and ``max_chars`` characters."""
    while True:
        parts: list[str] = []
        while sum(len(p) + 1 for p in parts) < rng.integers(min_chars, max_chars + 1):
            r = rng.random()
            if r < 0.7:
                w = str(rng.choice(WORDS))
                parts.append(w.capitalize() if rng.random() < 0.2 else w)
            elif r < 0.9:
                parts.append(str(int(rng.integers(0, 10000))))
            else:
                parts.append(f"{rng.integers(1, 100)}.{rng.integers(0, 100):02d}%")
        s = " ".join(parts)
        if rng.random() < 0.3:
            s += str(rng.choice([".", ",", ":", ";", "!", "?"]))
        if min_chars <= len(s) <= max_chars:
            return s


def ink(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A dark text colour and a light paper colour."""
    t = int(rng.integers(0, 70))
    p = int(rng.integers(215, 256))
    return (t, t + int(rng.integers(0, 20)), t), (p, p, p - int(rng.integers(0, 20)))


def noisy(img, rng: np.random.Generator, sigma: float = 6.0) -> np.ndarray:
    """uint8 HxWx3 RGB with Gaussian pixel noise."""
    a = np.asarray(img, dtype=np.float32)
    a = a + rng.normal(0.0, sigma, a.shape).astype(np.float32)
    return np.clip(a, 0, 255).astype(np.uint8)


def save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def session(model: Path, threads: int = 1):
    """onnxruntime CPU session, one intra-op thread (the machine is shared; keeps eval times predictable)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def run_chunks(model: Path, x: np.ndarray, chunk: int) -> list[list[np.ndarray]]:
    """Run a one-input model over ``x`` (``[N, ...]``) in chunks; every output, one list of chunks each."""
    sess = session(model)
    name = sess.get_inputs()[0].name
    outs: list[list[np.ndarray]] = [[] for _ in sess.get_outputs()]
    for s in range(0, len(x), chunk):
        for acc, r in zip(outs, sess.run(None, {name: x[s:s + chunk]})):
            acc.append(np.asarray(r))
    return outs


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write atomically (a ``.part`` file renamed), so an interrupted prepare never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of ``[N,4]`` and ``[M,4]`` corner boxes (x0, y0, x1, y1)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda z: np.clip(z[:, 2:] - z[:, :2], 0, None).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def match_count(pred: np.ndarray, gt: np.ndarray, thr: float = 0.5,
                pred_cls: np.ndarray | None = None, gt_cls: np.ndarray | None = None) -> int:
    """Greedy one-to-one matches with IoU >= ``thr`` (and the same class when classes are given);
    ``pred`` is assumed sorted by descending score."""
    iou = box_iou(pred, gt)
    if pred_cls is not None and gt_cls is not None and iou.size:
        iou = np.where(pred_cls[:, None] == gt_cls[None, :], iou, 0.0)
    used = np.zeros(len(gt), bool)
    n = 0
    for i in range(len(pred)):
        if not len(gt):
            break
        cand = np.where(~used, iou[i], -1.0)
        j = int(np.argmax(cand))
        if cand[j] >= thr:
            used[j] = True
            n += 1
    return n
