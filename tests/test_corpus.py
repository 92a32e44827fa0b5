"""fold over the corpus: the onnx package's backend test models and models/.

Default run: every 10th generated node test case plus every model file (about 35 s). ``pytest -m slow``
runs all ~2,000. Must hold: 0 crashes, 0 outputs beyond 1e-5 relative L2 (where onnxruntime can run the
original), 0 files larger than their input, 0 outputs failing the onnx checker.
"""

from __future__ import annotations

import pytest

from corpus_sweep import run_sweep, summarize

BAD = ("crashed", "mismatch", "grew", "invalid")


def _check(records):
    bad = [r for r in records if r["status"] in BAD]
    assert not bad, "\n".join(f"{r['status']} {r['kind']}/{r['name']}: {r['detail']}" for r in bad)
    summary = summarize(records)
    # the sweep really validated most models, and folding really did something
    assert summary["outcomes"].get("ok", 0) >= 0.6 * summary["models"], summary
    assert summary["nodes_after"] < summary["nodes_before"], summary
    return summary


def test_fold_over_corpus_sample():
    summary = _check(run_sweep("fold", node_sample_every=10))
    assert summary["models"] > 300


@pytest.mark.slow
def test_fold_over_whole_corpus():
    summary = _check(run_sweep("fold", node_sample_every=1))
    assert summary["models"] > 2000
