"""The YOLO-style detector fixture (models/digits_detector.onnx), its scene data, and the numpy evaluator
(benchmarks/detect_eval.py) that bench_detect.py scores quantized detectors with."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import detect_eval
from conftest import MODELS, run_ort

# measured by models/make_models.py (models/README.md): mAP@0.5 0.9907, mAP@0.5:0.95 0.7255, mean IoU 0.8627
FP32_MAP50, FP32_MAP50_95, FP32_MEAN_IOU = 0.9907, 0.7255, 0.8627


@pytest.fixture(scope="module")
def scenes():
    x = np.load(MODELS / "detect_test.npz")["input"]
    gt = dict(np.load(MODELS / "detect_test_gt.npz"))
    return x, gt


@pytest.fixture(scope="module")
def fp32_pred(scenes):
    return run_ort(MODELS / "digits_detector.onnx", {"input": scenes[0]})[0]


def test_scene_data_is_consistent(scenes):
    x, gt = scenes
    assert x.shape == (300, 1, 64, 64) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert np.allclose(x * 255, np.round(x * 255), atol=1e-3)  # 8-bit levels
    count, boxes, classes = gt["count"], gt["boxes"], gt["classes"]
    assert count.shape == (300,) and boxes.shape == (300, 3, 4) and classes.shape == (300, 3)
    assert count.min() >= 1 and count.max() <= 3
    for i in range(len(count)):
        n = count[i]
        assert (classes[i, n:] == -1).all() and ((classes[i, :n] >= 0) & (classes[i, :n] < 10)).all()
        b = boxes[i, :n]
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert b.min() >= 0 and b.max() <= 64
    assert set(np.unique(classes[classes >= 0])) == set(range(10))
    calib = np.load(MODELS / "detect_calib.npz")
    assert list(calib.keys()) == ["input"] and calib["input"].shape == (128, 1, 64, 64)


def test_calib_scenes_are_valid_data_for_onnxshrink():
    from onnxshrink.calib import input_specs, load_data
    from onnxshrink.model import load_model

    data = load_data(MODELS / "detect_calib.npz", input_specs(load_model(str(MODELS / "digits_detector.onnx"))))
    assert data.num_samples == 128


def test_detector_graph_is_a_yolo_style_export():
    m = onnx.load(str(MODELS / "digits_detector.onnx"))
    assert (MODELS / "digits_detector.onnx").stat().st_size < 300_000
    assert next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == 13
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("BatchNormalization") == 10 and ops.count("Sigmoid") == 12 and ops.count("Pow") == 2
    assert "Silu" not in ops and "HardSwish" not in ops
    # the output is a Concat of the two scales, each a Reshape of a Concat(xy, wh, conf)
    producer = {o: n for n in m.graph.node for o in n.output}
    last = producer[m.graph.output[0].name]
    assert last.op_type == "Concat" and len(last.input) == 2
    for i in last.input:
        inner = producer[producer[i].input[0]]
        assert producer[i].op_type == "Reshape" and inner.op_type == "Concat" and len(inner.input) == 3


def test_bench_finds_the_detection_head():
    from bench_detect import head_parts

    parts = head_parts(onnx.load(str(MODELS / "digits_detector.onnx")))
    assert parts["heads"] == ["/heads.0/Conv", "/heads.1/Conv"]
    assert len(parts["sigmoid"]) == 2 and len(parts["relayout"]) == 4
    assert {"/Concat_1", "/Concat_2", "/Concat_3"} <= set(parts["concat"])
    assert sum(n.startswith("/Pow") for n in parts["arith"]) == 2


def test_fp32_detector_quality(scenes, fp32_pred):
    x, gt = scenes
    assert fp32_pred.shape == (300, 80, 15)
    assert (fp32_pred[..., 4:] >= 0).all() and (fp32_pred[..., 4:] <= 1).all()  # probabilities
    assert fp32_pred[..., :2].max() > 30 and (fp32_pred[..., 2:4] > 0).all()  # pixels
    r = detect_eval.evaluate(fp32_pred, gt)
    assert r["gt"] == int(gt["count"].sum())
    assert r["map50"] >= FP32_MAP50 - 0.01, r
    assert r["map50_95"] >= FP32_MAP50_95 - 0.01, r
    assert r["mean_iou"] >= FP32_MEAN_IOU - 0.01, r


# ------------------------------------------------------------------------- evaluator on hand-made boxes


def _pred(rows: list[tuple[list[float], float, int]], cells: int = 8) -> np.ndarray:
    """One image: rows of (xyxy box, objectness, class) with class probability 1; other cells empty."""
    p = np.zeros((1, cells, 15), np.float32)
    for k, (b, obj, c) in enumerate(rows):
        x1, y1, x2, y2 = b
        p[0, k, :4] = ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)
        p[0, k, 4] = obj
        p[0, k, 5 + c] = 1.0
    return p


def _gt(rows: list[tuple[list[float], int]]) -> dict[str, np.ndarray]:
    boxes = np.zeros((1, 3, 4), np.float32)
    classes = np.full((1, 3), -1, np.int64)
    for k, (b, c) in enumerate(rows):
        boxes[0, k], classes[0, k] = b, c
    return {"boxes": boxes, "classes": classes, "count": np.array([len(rows)])}


def test_perfect_predictions_score_one():
    gt = [([4, 4, 20, 24], 3), ([30, 10, 44, 30], 7), ([10, 40, 22, 60], 3)]
    r = detect_eval.evaluate(_pred([(b, 0.9, c) for b, c in gt]), _gt(gt))
    assert r["map50"] == pytest.approx(1.0) and r["map50_95"] == pytest.approx(1.0)
    assert r["mean_iou"] == pytest.approx(1.0) and r["f1"] == pytest.approx(1.0)
    assert np.isnan(r["ap50"][0]) and r["ap50"][3] == pytest.approx(1.0)  # classes without GT are skipped


def test_shifted_box_below_iou_half_is_not_a_true_positive():
    gt = _gt([([10, 10, 30, 30], 2)])
    # shifted 8 px right: IoU = 12*20 / (2*400 - 240) = 0.43
    r = detect_eval.evaluate(_pred([([18, 10, 38, 30], 0.9, 2)]), gt)
    assert r["map50"] == 0.0 and r["mean_iou"] == 0.0 and r["recall50"] == 0.0
    # shifted 5 px: IoU = 15*20 / (800 - 300) = 0.6: a true positive at 0.5, not at 0.65 and above
    r = detect_eval.evaluate(_pred([([15, 10, 35, 30], 0.9, 2)]), gt)
    assert r["map50"] == pytest.approx(1.0) and r["mean_iou"] == pytest.approx(0.6)
    assert r["map50_95"] == pytest.approx(0.3)  # TP at 0.50, 0.55, 0.60 of ten thresholds
    # the right box with the wrong class is not a true positive either
    assert detect_eval.evaluate(_pred([([10, 10, 30, 30], 0.9, 5)]), gt)["map50"] == 0.0


def test_nms_removes_a_duplicate_of_the_same_class_only():
    gt = _gt([([10, 10, 30, 30], 1)])
    dup = _pred([([10, 10, 30, 30], 0.9, 1), ([11, 10, 31, 30], 0.8, 1), ([11, 10, 31, 30], 0.7, 4)])
    dets = detect_eval.detections(dup)[0]
    assert sorted(dets["classes"].tolist()) == [1, 4]  # the class-1 duplicate is gone, class 4 is kept
    assert dets["scores"][0] == pytest.approx(0.9)
    r = detect_eval.evaluate(dup, gt)
    assert r["detections"] == 2 and r["ap50"][1] == pytest.approx(1.0)
    # without suppression (IoU threshold 1.0) the duplicate is a false positive at the operating point
    r = detect_eval.evaluate(dup, gt, nms_iou=1.0)
    assert r["detections"] == 3 and r["precision"] == pytest.approx(1 / 3)


def test_confidence_is_objectness_times_class_probability():
    p = _pred([([10, 10, 30, 30], 0.5, 1)])
    p[0, 0, 5 + 1] = 0.4  # conf 0.2 < 0.25: found by the AP, not at the operating point
    r = detect_eval.evaluate(p, _gt([([10, 10, 30, 30], 1)]))
    assert r["map50"] == pytest.approx(1.0) and r["recall"] == 0.0
    assert detect_eval.detections(p)[0]["scores"][0] == pytest.approx(0.2)


def test_average_precision_all_point():
    # ranked TP, FP, TP with 2 GT: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> 0.5*1 + 0.5*2/3
    assert detect_eval.average_precision(np.array([1, 0, 1]), np.array([0.9, 0.8, 0.7]), 2) == pytest.approx(5 / 6)
    # a missed object caps recall: one TP of two GT
    assert detect_eval.average_precision(np.array([1.0]), np.array([0.9]), 2) == pytest.approx(0.5)
    assert detect_eval.average_precision(np.zeros(0), np.zeros(0), 3) == 0.0


def test_output_errors_split_boxes_from_scores():
    ref = np.zeros((2, 5, 15))
    ref[..., :4] = 40.0
    ref[..., 4:] = 0.5
    cand = ref.copy()
    cand[..., 4:] += 0.25  # scores off by half, boxes exact
    e = detect_eval.output_errors(ref, cand)
    assert e["box_rel_l2"] == 0.0 and e["score_rel_l2"] == pytest.approx(0.5)
    assert e["score_max_abs"] == pytest.approx(0.25)
