"""PP-OCRv6 small text recognizer and detector as ``rapidocr==3.10.0`` ships them (Paddle exports, opset 11).

- ``pp_ocr_rec``: ``rapidocr/models/PP-OCRv6_rec_small.onnx``; rendered text lines (DejaVu fonts), the
  package's preprocessing (height 48, keep ratio, pad to width 320, ``(x/255-0.5)/0.5``, BGR), greedy CTC with
  the model's own dictionary (ONNX metadata ``character``; blank first, space appended, as rapidocr does).
  Primary metric ``char_acc`` = 1 - (summed Levenshtein distance / summed ground-truth length) over the eval
  lines; ``line_acc`` = exact line matches; ``char_acc_vs_fp32`` = the same score against the fp32 decode.
- ``pp_ocr_det``: ``rapidocr/models/PP-OCRv6_det_small.onnx``; rendered 736×736 pages (rapidocr's
  ``limit_side_len=736, limit_type=min`` leaves them unscaled) with known line boxes. Primary ``box_recall``:
  DB-style boxes from the probability map (threshold 0.3, mean score ≥ 0.5, unclip 1.6 as in rapidocr's
  config, axis-aligned, no dilation) matched to the rendered boxes at IoU ≥ 0.5; ``map_iou_vs_fp32`` is the
  IoU of the thresholded map with the fp32 model's.

Images are resized with Pillow's bilinear filter where rapidocr uses OpenCV's (a sub-pixel difference; the
data is the same for every tool).
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np

try:
    from .. import common  # type: ignore[no-redef]
    from . import _render as R  # type: ignore[no-redef]
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    common = importlib.import_module("common")
    R = importlib.import_module("models._render")

WHEEL = "rapidocr==3.10.0"
REC_W, REC_H = 320, 48
PAGE = 736
N_REC = {"calib": 96, "eval": 128}
N_DET = {"calib": 24, "eval": 16}
SEEDS = {"calib": 1001, "eval": 2002}


# --------------------------------------------------------------------------- recognizer

def _rec_line(rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """One rendered line (uint8 RGB, tight crop plus a margin) whose aspect ratio fits 320×48 unsqueezed."""
    from PIL import Image, ImageDraw

    while True:
        f = R.font(str(rng.choice(R.FONTS)), int(rng.integers(22, 38)))
        text = R.random_text(rng, 4, 22)
        x0, y0, x1, y1 = f.getbbox(text)
        mx, my = int(rng.integers(3, 12)), int(rng.integers(3, 10))
        w, h = x1 - x0 + 2 * mx, y1 - y0 + 2 * my
        if w / h <= REC_W / REC_H:
            break
    fg, bg = R.ink(rng)
    img = Image.new("RGB", (w, h), bg)
    ImageDraw.Draw(img).text((mx - x0, my - y0), text, font=f, fill=fg)
    return text, R.noisy(img, rng, sigma=float(rng.uniform(0, 8)))


def rec_preprocess(rgb: np.ndarray) -> np.ndarray:
    """rapidocr's ``resize_norm_img`` for a single line: BGR, height 48, width ceil(48·w/h) ≤ 320, pad 0."""
    from PIL import Image

    h, w = rgb.shape[:2]
    rw = min(REC_W, int(math.ceil(REC_H * w / h)))
    im = np.asarray(Image.fromarray(rgb).resize((rw, REC_H), Image.BILINEAR), dtype=np.float32)[:, :, ::-1]
    x = np.zeros((3, REC_H, REC_W), np.float32)
    x[:, :, :rw] = (im.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return x


def dictionary(model: Path) -> list[str]:
    """rapidocr's CTC dictionary: ``blank`` + the model's metadata ``character`` lines + a space."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    return ["blank"] + meta["character"].splitlines() + [" "]


def ctc_greedy(logits: np.ndarray, chars: list[str]) -> list[str]:
    """Argmax per time step, collapse repeats, drop blanks (index 0)."""
    idx = logits.argmax(-1)
    out = []
    for row in idx:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        out.append("".join(chars[i] for i in row[keep]))
    return out


def _prepare_rec(cache: Path) -> common.Case:
    wheel = common.pip_download(WHEEL, cache)
    onnx_path = common.unpack(wheel, "rapidocr/models/PP-OCRv6_rec_small.onnx",
                              cache / "models" / "rapidocr-3.10.0" / "PP-OCRv6_rec_small.onnx")
    d = cache / "data" / "pp_ocr_rec"
    files = {s: d / f"{s}.npz" for s in SEEDS}
    if not all(p.exists() for p in files.values()) or not (d / "eval_text.json").exists():
        for split, seed in SEEDS.items():
            rng = np.random.default_rng(seed)
            texts, xs = [], []
            for i in range(N_REC[split]):
                text, img = _rec_line(rng)
                R.save_png(img, d / "raw" / split / f"line_{i:04d}.png")
                texts.append(text)
                xs.append(rec_preprocess(img))
            (d / f"{split}_text.json").write_text(json.dumps(texts, ensure_ascii=False, indent=0))
            R.save_npz(files[split], x=np.stack(xs))
    chars = dictionary(onnx_path)
    truth = json.loads((d / "eval_text.json").read_text())
    ref_file = d / "eval_fp32_text.json"

    def decode(model: Path) -> list[str]:
        x = R.load_npz(files["eval"])["x"]
        return [t for chunk in R.run_chunks(model, x, 16)[0] for t in ctc_greedy(chunk, chars)]

    def evaluate(model: Path) -> dict[str, float]:
        if not ref_file.exists():
            ref_file.write_text(json.dumps(decode(onnx_path), ensure_ascii=False))
        ref = json.loads(ref_file.read_text())
        pred = decode(Path(model))
        n = sum(len(t) for t in truth)
        return {
            "char_acc": 1.0 - sum(R.edit_distance(p, t) for p, t in zip(pred, truth)) / n,
            "line_acc": float(np.mean([p == t for p, t in zip(pred, truth)])),
            "char_acc_vs_fp32": 1.0 - sum(R.edit_distance(p, r) for p, r in zip(pred, ref))
            / max(1, sum(len(r) for r in ref)),
        }

    return common.Case(
        name="pp_ocr_rec", onnx=onnx_path, calib=files["calib"], eval=files["eval"], evaluate=evaluate,
        primary="char_acc", family="cnn+rnn (SVTR-style)", exporter="paddle2onnx (opset 11)",
        source=f"{WHEEL}: rapidocr/models/PP-OCRv6_rec_small.onnx",
        raw={"calib_images": str(d / "raw" / "calib"), "eval_images": str(d / "raw" / "eval"),
             "eval_text": str(d / "eval_text.json"), "preprocess": "paddle-ocr-rec",
             "input_shape": [1, 3, REC_H, REC_W]},
        latency_batches=(1, 8),
        notes=["char_acc = 1 - normalized edit distance vs the rendered text, greedy CTC with the model's own "
               "dictionary (18,710 classes incl. blank/space)", "lines padded to 48×320"],
    )


# --------------------------------------------------------------------------- detector

def _det_page(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A 736×736 page of text lines; returns (uint8 RGB, ``[K,4]`` ink boxes x0,y0,x1,y1)."""
    from PIL import Image, ImageDraw

    fg, bg = R.ink(rng)
    img = Image.new("RGB", (PAGE, PAGE), bg)
    draw = ImageDraw.Draw(img)
    boxes = []
    y = int(rng.integers(15, 60))
    while True:
        f = R.font(str(rng.choice(R.FONTS)), int(rng.integers(16, 40)))
        line_h = f.getbbox("Hg")[3]
        if y + line_h > PAGE - 15:
            break
        x = int(rng.integers(10, 120))
        for _seg in range(int(rng.integers(1, 3))):
            room = PAGE - 15 - x
            if room < 80:
                break
            text = R.random_text(rng, 3, 40)
            while f.getlength(text) > room and len(text) > 3:
                text = text[: len(text) - 2].rstrip()
            bb = draw.textbbox((x, y), text, font=f)
            if bb[2] > PAGE - 5 or bb[2] - bb[0] < 8:
                break
            draw.text((x, y), text, font=f, fill=fg)
            boxes.append(bb)
            x = bb[2] + int(rng.integers(50, 160))
        y += line_h + int(rng.integers(12, 45))
    return R.noisy(img, rng, sigma=float(rng.uniform(0, 6))), np.array(boxes, np.float32).reshape(-1, 4)


def det_preprocess(rgb: np.ndarray) -> np.ndarray:
    """rapidocr's det preprocessing for a page already 736 on its short side: BGR, ``(x/255-0.5)/0.5``."""
    return ((rgb[:, :, ::-1].astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1).copy()


def db_boxes(prob: np.ndarray, thresh: float = 0.3, box_thresh: float = 0.5, unclip: float = 1.6,
             min_size: int = 3) -> np.ndarray:
    """Axis-aligned DB boxes: connected components of ``prob > thresh`` whose mean score ≥ ``box_thresh``,
    grown by ``d = A·unclip/L`` (A, L: area and perimeter of the component's bounding box), sorted by score."""
    from scipy import ndimage

    lab, _n = ndimage.label(prob > thresh)
    out = []
    for i, sl in enumerate(ndimage.find_objects(lab), 1):
        if sl is None:
            continue
        h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        if min(h, w) < min_size:
            continue
        score = float(prob[sl].mean())
        if score < box_thresh:
            continue
        d = w * h * unclip / (2 * (w + h))
        out.append((score, sl[1].start - d, sl[0].start - d, sl[1].stop + d, sl[0].stop + d))
    out.sort(key=lambda t: -t[0])
    return np.array([o[1:] for o in out], np.float32).reshape(-1, 4)


def _prepare_det(cache: Path) -> common.Case:
    wheel = common.pip_download(WHEEL, cache)
    onnx_path = common.unpack(wheel, "rapidocr/models/PP-OCRv6_det_small.onnx",
                              cache / "models" / "rapidocr-3.10.0" / "PP-OCRv6_det_small.onnx")
    d = cache / "data" / "pp_ocr_det"
    files = {s: d / f"{s}.npz" for s in SEEDS}
    if not all(p.exists() for p in files.values()) or not (d / "eval_boxes.npz").exists():
        for split, seed in SEEDS.items():
            rng = np.random.default_rng(seed)
            xs, boxes = [], {}
            for i in range(N_DET[split]):
                img, bb = _det_page(rng)
                R.save_png(img, d / "raw" / split / f"page_{i:04d}.png")
                xs.append(det_preprocess(img))
                boxes[f"p{i}"] = bb
            R.save_npz(d / f"{split}_boxes.npz", **boxes)
            R.save_npz(files[split], x=np.stack(xs))
    gt = R.load_npz(d / "eval_boxes.npz")
    ref_file = d / "eval_fp32_masks.npz"

    def masks(model: Path) -> np.ndarray:
        x = R.load_npz(files["eval"])["x"]
        return np.concatenate(R.run_chunks(model, x, 1)[0])[:, 0]

    def evaluate(model: Path) -> dict[str, float]:
        if not ref_file.exists():
            R.save_npz(ref_file, m=np.packbits(masks(onnx_path) > 0.3))
        ref = np.unpackbits(R.load_npz(ref_file)["m"])
        prob = masks(Path(model))
        ref = ref[: prob.size].reshape(prob.shape).astype(bool)
        ious, hit, n_gt, n_pred = [], 0, 0, 0
        for i, p in enumerate(prob):
            m = p > 0.3
            union = (m | ref[i]).sum()
            ious.append((m & ref[i]).sum() / union if union else 1.0)
            pb, g = db_boxes(p), gt[f"p{i}"]
            hit += R.match_count(pb, g, 0.5)
            n_gt += len(g)
            n_pred += len(pb)
        rec, prec = hit / max(1, n_gt), hit / max(1, n_pred)
        return {"box_recall": rec, "box_precision": prec,
                "box_hmean": 2 * rec * prec / (rec + prec) if rec + prec else 0.0,
                "map_iou_vs_fp32": float(np.mean(ious))}

    return common.Case(
        name="pp_ocr_det", onnx=onnx_path, calib=files["calib"], eval=files["eval"], evaluate=evaluate,
        primary="box_recall", family="cnn (DB detector)", exporter="paddle2onnx (opset 11)",
        source=f"{WHEEL}: rapidocr/models/PP-OCRv6_det_small.onnx",
        raw={"calib_images": str(d / "raw" / "calib"), "eval_images": str(d / "raw" / "eval"),
             "eval_boxes": str(d / "eval_boxes.npz"), "preprocess": "paddle-ocr-det",
             "input_shape": [1, 3, PAGE, PAGE]},
        latency_batches=(1, 4),
        notes=["box_recall: axis-aligned DB decode (thresh 0.3, box_thresh 0.5, unclip 1.6) vs rendered line "
               "boxes at IoU>=0.5; map_iou_vs_fp32: IoU of prob>0.3 with the fp32 map"],
    )


CASES = [
    common.CaseSpec("pp_ocr_rec", _prepare_rec, (WHEEL,)),
    common.CaseSpec("pp_ocr_det", _prepare_det, (WHEEL,)),
]
