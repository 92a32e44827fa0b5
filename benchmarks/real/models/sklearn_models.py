"""scikit-learn pipelines converted by skl2onnx with its DEFAULT options (ZipMap output: a sequence of maps).

Trained here, deterministically (fixed ``random_state``), on data scikit-learn bundles (no download):

- ``skl_mlp``: ``StandardScaler → MLPClassifier(128, 64)`` on the 8×8 digits (10 classes).
- ``skl_gbt``: ``StandardScaler → GradientBoostingClassifier(150 trees, depth 3)`` on breast_cancer (binary):
  a ``TreeEnsembleClassifier`` from ``ai.onnx.ml``.

Calibration rows come from the training split, eval rows from the held-out split (disjoint). Primary metric:
accuracy of the ``output_label`` vs the true labels; ``agree_vs_fp32``: same label as the fp32 model;
``proba_maxdiff``: the largest probability difference to fp32 (ZipMap maps read back in class order).
"""

from __future__ import annotations

import importlib
import pickle
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


def _proba(p) -> np.ndarray:
    """A ZipMap output (list of {class: prob}) or a plain tensor -> ``[N, C]`` float array."""
    if isinstance(p, list):
        keys = sorted(p[0].keys())
        return np.array([[row[k] for k in keys] for row in p], np.float64)
    return np.asarray(p, np.float64)


def run_sklearn_onnx(model: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sess = R.session(model)
    out = sess.run(None, {sess.get_inputs()[0].name: x})
    return np.asarray(out[0]).reshape(-1), _proba(out[1])


def _make(name: str, dataset: str, build, n_calib: int, n_eval: int, family: str, note: str):
    def prepare(cache: Path) -> common.Case:
        import sklearn

        d = cache / "data" / name
        onnx_path = cache / "models" / "sklearn" / f"{name}.onnx"
        files = {"calib": d / "calib.npz", "eval": d / "eval.npz"}
        if not onnx_path.exists() or not all(p.exists() for p in files.values()):
            from skl2onnx import to_onnx
            from sklearn import datasets

            X, y = getattr(datasets, f"load_{dataset}")(return_X_y=True)
            X = X.astype(np.float32)
            order = np.random.default_rng(7).permutation(len(X))
            test, train = order[:n_eval], order[n_eval:]
            pipe = build().fit(X[train], y[train])
            calib = train[np.random.default_rng(8).permutation(len(train))[:n_calib]]
            R.save_npz(files["calib"], X=X[calib])
            R.save_npz(files["eval"], X=X[test])
            R.save_npz(d / "eval_labels.npz", y=y[test].astype(np.int64))
            np.save(d / "eval_labels.npy", y[test].astype(np.int64))
            d.mkdir(parents=True, exist_ok=True)
            (d / "pipeline.pkl").write_bytes(pickle.dumps(pipe))
            onx = to_onnx(pipe, X[:1])  # default options: ZipMap on, default opset
            onnx_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = onnx_path.with_name(onnx_path.name + ".part")
            tmp.write_bytes(onx.SerializeToString())
            tmp.replace(onnx_path)
        y = R.load_npz(d / "eval_labels.npz")["y"]
        x = R.load_npz(files["eval"])["X"]
        ref: dict[str, np.ndarray] = {}

        def evaluate(model: Path) -> dict[str, float]:
            if not ref:
                ref["label"], ref["proba"] = run_sklearn_onnx(onnx_path, x)
            label, proba = run_sklearn_onnx(Path(model), x)
            return {"accuracy": float(np.mean(label == y)),
                    "agree_vs_fp32": float(np.mean(label == ref["label"])),
                    "proba_maxdiff": float(np.abs(proba - ref["proba"]).max())}

        return common.Case(
            name=name, onnx=onnx_path, calib=files["calib"], eval=files["eval"], evaluate=evaluate,
            primary="accuracy", family=family, exporter=f"skl2onnx (defaults, ZipMap), sklearn {sklearn.__version__}",
            source=f"trained here on sklearn.datasets.load_{dataset}() (bundled)",
            raw={"calib_table": str(files["calib"]), "eval_labels": str(d / "eval_labels.npy")},
            latency_batches=(1, 64), notes=[note])
    return common.CaseSpec(name, prepare, ())


def _mlp():
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), MLPClassifier((128, 64), max_iter=400, random_state=0))


def _gbt():
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), GradientBoostingClassifier(n_estimators=150, max_depth=3,
                                                                      random_state=0))


CASES = [
    _make("skl_mlp", "digits", _mlp, 200, 200, "sklearn (MLP)",
          "8x8 digits, 200 held-out rows; ZipMap output (seq(map)) as skl2onnx emits by default"),
    _make("skl_gbt", "breast_cancer", _gbt, 150, 200, "sklearn (trees, ai.onnx.ml)",
          "breast_cancer, 200 held-out rows; TreeEnsembleClassifier + ZipMap"),
]
