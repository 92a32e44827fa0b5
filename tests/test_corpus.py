"""Every registered pass over the corpus: the onnx package's backend test models and models/.

Default run: every pass over every 40th generated node test case plus every model file. ``pytest -m slow``
runs the whole corpus (~2,000 models) per pass. Must hold for each pass: 0 crashes, 0 outputs beyond the
pass's declared tolerance (where onnxruntime can run the original), 0 outputs failing the onnx checker, and
for fold 0 files larger than their input.
"""

from __future__ import annotations

import pytest

from corpus_sweep import BAD, run_sweep, summarize
from onnxshrink.registry import all_passes

PASSES = [p.name for p in all_passes()]


def _check(records, name):
    bad = [r for r in records if r["status"] in BAD]
    assert not bad, "\n".join(f"{r['status']} {r['pass']} {r['kind']}/{r['name']}: {r['detail']}" for r in bad)
    summary = summarize(records)[name]
    # the sweep really ran and validated most models, and the pass really did something somewhere
    assert summary["verified"] >= 0.6 * summary["models"], summary
    assert summary["outcomes"]["applied"] > 0, summary
    return summary


@pytest.mark.parametrize("name", PASSES)
def test_pass_over_corpus_sample(name):
    summary = _check(run_sweep([name], node_sample_every=40), name)
    assert summary["models"] > 150
    if name == "fold":
        assert summary["nodes_after"] < summary["nodes_before"], summary


@pytest.mark.slow
@pytest.mark.parametrize("name", PASSES)
def test_pass_over_whole_corpus(name):
    summary = _check(run_sweep([name], node_sample_every=1), name)
    assert summary["models"] > 2000
