"""Detection metrics in numpy for the YOLO-style digits detector (``models/digits_detector.onnx``).

The detector's output is ``[N, cells, 5 + C]`` per image: columns ``cx, cy, w, h`` (pixels), ``obj``
(probability), then ``C`` class probabilities. Ground truth comes as padded arrays (as in
``models/detect_{calib,test}_gt.npz``): ``boxes`` [N, M, 4] float32 ``x1, y1, x2, y2`` (pixels),
``classes`` [N, M] int64 (``-1`` in padding) and ``count`` [N] int64 (the first ``count[i]`` rows are real).

Pipeline of :func:`evaluate`:

1. per cell: confidence = ``obj · max_c p_c``, class = ``argmax_c p_c``; cells below ``conf_thres`` dropped;
2. class-wise greedy NMS per image at ``nms_iou`` (boxes of different classes never suppress each other);
3. per class, detections of all images sorted by confidence (stable), each matched to the unmatched GT of
   that class and image with the highest IoU, a true positive when that IoU >= the threshold;
   AP = all-point interpolated area under precision/recall (precision made monotone from the right,
   summed over the recall steps, as PASCAL VOC 2010+ and COCO's continuous form);
4. mAP = mean over the classes that have ground truth; ``map50`` at IoU 0.5, ``map50_95`` the mean over
   IoU 0.50, 0.55, ..., 0.95; ``mean_iou`` = mean IoU of the true positives at 0.5;
5. precision, recall and F1 at an operating point (confidence >= ``deploy_conf``, IoU 0.5), where the
   exact values of the scores matter, not only their order.

Torch-free: tests and benchmarks import it (``sys.path`` holds ``benchmarks/``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["xywh_to_xyxy", "box_iou", "nms", "detections", "average_precision", "evaluate", "output_errors"]

IOU_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2))


def xywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    """``[..., cx, cy, w, h]`` -> ``[..., x1, y1, x2, y2]``."""
    b = np.asarray(b, dtype=np.float64)
    half = b[..., 2:4] / 2
    return np.concatenate([b[..., 0:2] - half, b[..., 0:2] + half], axis=-1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of xyxy boxes (0 where a union is empty)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=-1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_thres: float) -> np.ndarray:
    """Indices kept by class-wise greedy NMS, highest score first (stable for equal scores)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep: list[int] = []
    for c in np.unique(classes):
        idx = order[classes[order] == c]
        while len(idx):
            i = idx[0]
            keep.append(int(i))
            if len(idx) == 1:
                break
            ious = box_iou(boxes[i:i + 1], boxes[idx[1:]])[0]
            idx = idx[1:][ious <= iou_thres]
    keep_arr = np.array(keep, dtype=np.int64)
    return keep_arr[np.argsort(-np.asarray(scores)[keep_arr], kind="stable")]


def detections(pred: np.ndarray, conf_thres: float = 0.001, nms_iou: float = 0.5) -> list[dict[str, np.ndarray]]:
    """Per image: ``boxes`` (xyxy), ``scores`` and ``classes`` after thresholding and class-wise NMS."""
    pred = np.asarray(pred, dtype=np.float64)
    out = []
    for p in pred:
        cls_prob = p[:, 5:]
        cls = cls_prob.argmax(axis=1)
        conf = p[:, 4] * cls_prob[np.arange(len(p)), cls]
        m = conf >= conf_thres
        boxes, conf, cls = xywh_to_xyxy(p[m, :4]), conf[m], cls[m]
        keep = nms(boxes, conf, cls, nms_iou) if len(conf) else np.zeros(0, np.int64)
        out.append({"boxes": boxes[keep], "scores": conf[keep], "classes": cls[keep]})
    return out


def average_precision(tp: np.ndarray, scores: np.ndarray, n_gt: int) -> float:
    """All-point interpolated AP from per-detection TP flags and confidences (any order)."""
    if n_gt == 0:
        return float("nan")
    if len(tp) == 0:
        return 0.0
    order = np.argsort(-np.asarray(scores), kind="stable")
    tp = np.asarray(tp, dtype=np.float64)[order]
    ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
    recall = ctp / n_gt
    precision = ctp / (ctp + cfp)
    r = np.concatenate([[0.0], recall, [recall[-1]]])
    p = np.concatenate([[1.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # precision envelope
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def _match(dets: list[dict[str, np.ndarray]], gt_boxes, gt_classes, gt_count, cls: int, thr: float):
    """TP flags, scores and matched IoUs of class ``cls`` detections over all images, at IoU ``thr``."""
    items = []  # (score, image, det index)
    for i, d in enumerate(dets):
        for j in np.nonzero(d["classes"] == cls)[0]:
            items.append((d["scores"][j], i, j))
    items.sort(key=lambda t: -t[0])  # stable: ties keep image order
    used = [np.zeros(int(gt_count[i]), bool) for i in range(len(dets))]
    tp, scores, ious = [], [], []
    for score, i, j in items:
        n = int(gt_count[i])
        g_cls = gt_classes[i, :n]
        cand = np.nonzero((g_cls == cls) & ~used[i])[0]
        best, best_iou = -1, 0.0
        if len(cand):
            iou = box_iou(dets[i]["boxes"][j], gt_boxes[i, cand])[0]
            k = int(np.argmax(iou))
            if iou[k] >= thr:
                best, best_iou = int(cand[k]), float(iou[k])
        if best >= 0:
            used[i][best] = True
            tp.append(1.0)
            ious.append(best_iou)
        else:
            tp.append(0.0)
        scores.append(score)
    return np.array(tp), np.array(scores), ious


def evaluate(pred: np.ndarray, gt: dict[str, np.ndarray], *, num_classes: int | None = None,
             conf_thres: float = 0.001, nms_iou: float = 0.5, deploy_conf: float = 0.25) -> dict:
    """Detection quality of ``pred`` [N, cells, 5 + C] against padded ground truth (see module doc).

    Returns ``map50``, ``map50_95``, ``mean_iou`` (true positives at 0.5), ``ap50`` per class (NaN for a
    class without ground truth), ``recall50`` (recall at IoU 0.5 at the end of the ranked list),
    ``precision``/``recall``/``f1`` at the operating point ``confidence >= deploy_conf`` (YOLOv5's
    default inference threshold 0.25; IoU 0.5, same matching), ``detections`` (kept after NMS) and ``gt``
    (number of objects).
    """
    pred = np.asarray(pred)
    num_classes = pred.shape[-1] - 5 if num_classes is None else num_classes
    boxes, classes, count = (np.asarray(gt[k]) for k in ("boxes", "classes", "count"))
    if len(pred) != len(count):
        raise ValueError(f"{len(pred)} predictions for {len(count)} ground-truth images")
    dets = detections(pred, conf_thres, nms_iou)
    gt_per_class = [int(sum(np.sum(classes[i, :int(count[i])] == c) for i in range(len(count))))
                    for c in range(num_classes)]
    per_thr = {}
    ap50 = []
    matched_ious: list[float] = []
    tp_total = 0
    for thr in IOU_THRESHOLDS:
        aps = []
        for c in range(num_classes):
            tp, scores, ious = _match(dets, boxes, classes, count, c, thr)
            aps.append(average_precision(tp, scores, gt_per_class[c]))
            if thr == 0.5:
                matched_ious += ious
                tp_total += int(tp.sum())
        per_thr[thr] = float(np.nanmean(aps))
        if thr == 0.5:
            ap50 = aps
    n_det = sum(len(d["scores"]) for d in dets)
    n_gt = int(sum(gt_per_class))
    # operating point: the detections at or above deploy_conf, matched the same way
    kept = [{k: v[d["scores"] >= deploy_conf] for k, v in d.items()} for d in dets]
    tp_op = sum(int(_match(kept, boxes, classes, count, c, 0.5)[0].sum()) for c in range(num_classes))
    n_op = sum(len(d["scores"]) for d in kept)
    precision = tp_op / n_op if n_op else 0.0
    recall = tp_op / n_gt if n_gt else 0.0
    return {
        "map50": per_thr[0.5],
        "map50_95": float(np.mean(list(per_thr.values()))),
        "mean_iou": float(np.mean(matched_ious)) if matched_ious else 0.0,
        "ap50": [float(a) for a in ap50],
        "recall50": tp_total / n_gt if n_gt else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "detections": n_det,
        "gt": n_gt,
    }


def _rel_l2(ref: np.ndarray, cand: np.ndarray) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    den = np.linalg.norm(ref)
    num = np.linalg.norm(np.asarray(cand, dtype=np.float64) - ref)
    return float(num / den) if den else float(num)


def output_errors(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """Relative L2 error of the box columns (0:4, pixels) and the score columns (4:, obj and classes)
    of ``cand`` against ``ref``, plus the largest absolute error of each."""
    ref, cand = np.asarray(ref, np.float64), np.asarray(cand, np.float64)
    return {
        "box_rel_l2": _rel_l2(ref[..., :4], cand[..., :4]),
        "score_rel_l2": _rel_l2(ref[..., 4:], cand[..., 4:]),
        "box_max_abs": float(np.abs(ref[..., :4] - cand[..., :4]).max()),
        "score_max_abs": float(np.abs(ref[..., 4:] - cand[..., 4:]).max()),
    }
