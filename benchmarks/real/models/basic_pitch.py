"""basic-pitch 0.4.0 (Spotify) ``nmp.onnx``, the tf2onnx export the wheel ships: polyphonic note transcription.

Model: input ``serving_default_input_2:0`` ``[N, 43844, 1]`` mono audio at 22050 Hz (2 s windows less one hop),
outputs ``StatefulPartitionedCall:1`` note posteriorgram ``[N, 172, 88]`` (bin k = MIDI 21+k),
``:2`` onsets ``[N, 172, 88]``, ``:0`` pitch contour ``[N, 172, 264]`` (3 bins per semitone from 27.5 Hz,
bin j = MIDI 21 + j/3). The CQT front end is inside the graph (Conv-based), so the input is raw audio.

Data (deterministic, fixed seeds; calib seed 1, eval seed 2): each window holds three consecutive segments,
each a chord of 1-3 notes (MIDI 36..84, detuned up to 15 cents), every note a harmonic tone (6-10 partials,
random spectral tilt) with a 10 ms attack and an exponential decay, separated by short silences, plus white
noise 20-35 dB below the peak. Ground truth per model frame (hop 256 samples): the set of sounding MIDI notes;
frames within 3 hops of a segment boundary are not scored. ``raw``: the same windows as float32 WAV files.

Metrics:
- ``frame_f1`` (primary): multi-pitch frame F1 of the note posteriorgram thresholded at basic-pitch's default
  frame threshold (0.3) against the true note sets, on scored frames.
- ``top1_pitch_acc``: on voiced frames, argmax of the note posteriorgram is one of the sounding notes.
- ``contour_pitch_acc``: argmax of the contour (3 bins per semitone) within half a semitone of a sounding note.
- ``note_recall``: a true note is found when the posteriorgram at its pitch exceeds 0.3 on most of its frames.
- ``note_iou_fp32``: IoU of the thresholded note posteriorgram with the fp32 model's (all frames).
- ``argmax_agree_fp32``: fraction of scored frames whose note argmax equals the fp32 model's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

try:
    from . import _ortutil as U
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _ortutil as U  # type: ignore[no-redef]

common = U.common
WHEEL = "basic-pitch==0.4.0"
MEMBER = "basic_pitch/saved_models/icassp_2022/nmp.onnx"
SR = 22050
HOP = 256
N_SAMPLES = 43844
N_FRAMES = 172
INPUT = "serving_default_input_2:0"
OUT_NOTE, OUT_ONSET, OUT_CONTOUR = "StatefulPartitionedCall:1", "StatefulPartitionedCall:2", "StatefulPartitionedCall:0"
N_CALIB, N_EVAL = 32, 48
FRAME_THRESH = 0.3  # basic-pitch's default frame_threshold
GUARD = 3  # frames not scored either side of a note boundary


def synth_windows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` windows ``[n, N_SAMPLES]``, per-frame multi-hot truth ``[n, N_FRAMES, 88]`` and a scored-frame mask."""
    rng = np.random.default_rng(seed)
    audio = np.zeros((n, N_SAMPLES), np.float32)
    truth = np.zeros((n, N_FRAMES, 88), np.uint8)
    scored = np.ones((n, N_FRAMES), bool)
    t_all = np.arange(N_SAMPLES) / SR
    for w in range(n):
        x = np.zeros(N_SAMPLES)
        pos = int(rng.integers(1500, 4000))
        for _ in range(3):
            dur = int(rng.uniform(0.42, 0.56) * SR)
            if pos + dur > N_SAMPLES - 500:
                break
            n_voices = int(rng.choice([1, 1, 2, 3]))
            midis = rng.choice(np.arange(36, 85), size=n_voices, replace=False)
            f_on, f_off = int(np.ceil(pos / HOP)), int((pos + dur) // HOP)
            t = t_all[:dur]
            for midi in midis:
                f0 = 440.0 * 2 ** ((midi - 69 + rng.uniform(-0.15, 0.15)) / 12)
                tilt = rng.uniform(0.8, 1.8)
                tone = np.zeros(dur)
                for k in range(1, int(rng.integers(6, 11)) + 1):
                    if k * f0 > 0.45 * SR:
                        break
                    tone += k ** -tilt * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi))
                att = int(0.01 * SR)
                env = np.exp(-t * rng.uniform(1.0, 3.0))
                env[:att] *= np.linspace(0, 1, att)
                env[-200:] *= np.linspace(1, 0, 200)
                x[pos:pos + dur] += rng.uniform(0.15, 0.4) * tone / np.abs(tone).max() * env
                truth[w, f_on:f_off, midi - 21] = 1
            scored[w, max(f_on - GUARD, 0):min(f_on + GUARD, N_FRAMES)] = False
            scored[w, max(f_off - GUARD, 0):min(f_off + GUARD, N_FRAMES)] = False
            pos += dur + int(rng.uniform(0.05, 0.15) * SR)
        peak = np.abs(x).max()
        x += rng.normal(0, peak * 10 ** (-rng.uniform(20, 35) / 20), N_SAMPLES)  # 20-35 dB below the peak
        audio[w] = x.astype(np.float32)
    return audio, truth, scored


def score(note: np.ndarray, contour: np.ndarray, truth: np.ndarray, scored: np.ndarray,
          ref_note: np.ndarray | None) -> dict[str, float]:
    t = truth[scored].astype(bool)  # [F, 88]
    p = note[scored] > FRAME_THRESH
    tp, fp, fn = (p & t).sum(), (p & ~t).sum(), (~p & t).sum()
    res = {"frame_f1": float(2 * tp / max(2 * tp + fp + fn, 1))}
    voiced = t.any(-1)
    top = note[scored].argmax(-1)
    res["top1_pitch_acc"] = float(t[np.arange(len(t)), top][voiced].mean())
    cbin = contour[scored].argmax(-1) / 3.0  # semitones above MIDI 21
    near = np.abs(cbin[:, None] - np.arange(88)[None, :]) <= 0.5
    res["contour_pitch_acc"] = float((near & t).any(-1)[voiced].mean())
    # note level: a true (window, pitch) run is found when most of its scored frames are above threshold
    found = total = 0
    for w in range(len(truth)):
        for k in np.flatnonzero(truth[w].any(0)):
            frames = np.flatnonzero(truth[w, :, k].astype(bool) & scored[w])
            if len(frames) == 0:
                continue
            # split into runs (one pitch can sound in two segments of a window)
            for run in np.split(frames, np.flatnonzero(np.diff(frames) > GUARD * 2 + 1) + 1):
                total += 1
                found += int((note[w, run, k] > FRAME_THRESH).mean() > 0.5)
    res["note_recall"] = found / max(total, 1)
    if ref_note is not None:
        a, b = note > FRAME_THRESH, ref_note > FRAME_THRESH
        res["note_iou_fp32"] = float((a & b).sum() / max((a | b).sum(), 1))
        res["argmax_agree_fp32"] = float((note.argmax(-1)[scored] == ref_note.argmax(-1)[scored]).mean())
    return res


def prepare(cache: Path = common.CACHE) -> "common.Case":
    root = cache / "basic_pitch"
    wheel = common.pip_download(WHEEL, cache)
    onnx_path = common.unpack(wheel, MEMBER, root / "nmp.onnx")
    calib, evalp, labels_p = root / "calib.npz", root / "eval.npz", root / "eval_truth.npz"
    if not (calib.exists() and evalp.exists() and labels_p.exists()):
        a_cal, _, _ = synth_windows(N_CALIB, seed=1)
        a_ev, truth, scored = synth_windows(N_EVAL, seed=2)
        U.save_npz(calib, **{INPUT: a_cal[..., None]})
        U.save_npz(evalp, **{INPUT: a_ev[..., None]})
        U.save_npz(labels_p, truth=truth, scored=scored)
        U.write_wavs(root / "calib_wav", a_cal, SR, "calib")
        U.write_wavs(root / "eval_wav", a_ev, SR, "eval")
    gt = U.load_npz(labels_p)
    ref_cache = root / "eval_fp32_outputs.npz"

    def evaluate(model: Path) -> dict[str, float]:
        ref_note, = U.fp32_outputs(onnx_path, evalp, ref_cache, outputs=[OUT_NOTE])
        note, contour = U.run_batched(Path(model), U.load_npz(evalp), outputs=[OUT_NOTE, OUT_CONTOUR])
        return score(note, contour, gt["truth"], gt["scored"], ref_note)

    return common.Case(
        name="basic_pitch", onnx=onnx_path, calib=calib, eval=evalp, evaluate=evaluate,
        primary="frame_f1", family="audio-cnn", exporter="tf2onnx 1.15.1 (opset 15, shipped)",
        source=f"{WHEEL}: {MEMBER}",
        raw={"calib_audio": root / "calib_wav", "eval_audio": root / "eval_wav", "sample_rate": SR,
             "window": N_SAMPLES, "layout": "[N, samples, 1]"},
        latency_batches=(1, 8),
        notes=["synthesized harmonic notes with known MIDI pitch; frame_f1 (multi-pitch, threshold 0.3) vs ground truth",
               "the CQT front end (Conv with fixed kernels, Log, ReduceMax normalization) is inside the graph",
               "tf2onnx artefacts: many Reshape/Unsqueeze/Transpose, dim_param batch 'unk__749'"],
    )


CASES = [common.CaseSpec("basic_pitch", prepare, wheels=(WHEEL,))]


if __name__ == "__main__":
    import time

    t0 = time.time()
    case = prepare()
    t1 = time.time()
    print(f"prepared in {t1 - t0:.1f}s: {case.onnx}")
    print(case.evaluate(case.onnx), f"eval {time.time() - t1:.1f}s")
