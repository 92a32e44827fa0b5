"""``optimize`` and its result: load → passes → save to a temporary file → validate → report.

The input model is never modified; :meth:`OptimizeResult.save` moves the validated file into place atomically.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from onnxshrink import __version__
from onnxshrink.calib import Dataset, StatsStore, input_specs, load_data, synthetic_data
from onnxshrink.errors import (
    DataError,
    TargetCheckFailedError,
    UsageError,
    ValidationFailedError,
)
from onnxshrink.model import (
    ModelSource,
    check_output_path,
    external_data_files,
    infer_shapes,
    load_model,
    model_stats,
    save_model,
    snapshot_annotations,
    strip_added_annotations,
)
from onnxshrink.pipeline import DEFAULT_PIPELINE, Step, format_pipeline, parse, run_pipeline
from onnxshrink.registry import PassContext
from onnxshrink.report import Report
from onnxshrink.validate import SEQUENTIAL_BYTES, Tolerances, ValidationResult, _files_bytes, compare_models, measure_latency


def _file_bytes(path: Path) -> int:
    """Size of a model file plus the external-data files it references."""
    return path.stat().st_size + sum(f.stat().st_size for f in external_data_files(path) if f.is_file())


class OptimizeResult:
    """The outcome of :func:`optimize`: the optimized model, its report, and :meth:`save`."""

    def __init__(self, model: ir.Model, report: Report, artifact: Path | None, workdir: str | None):
        self.model = model
        self.report = report
        self._artifact = artifact
        self._workdir = workdir

    @property
    def artifact(self) -> Path | None:
        """The optimized model as written to a temporary file for validation (until :meth:`close`)."""
        return self._artifact

    @property
    def ok(self) -> bool:
        """False if validation ran and failed, or ``require_faster`` was set and the result is slower."""
        return self.report.verdict not in ("failed", "slower")

    @property
    def target_ok(self) -> bool:
        """False if a deploy-target check ran and found problems."""
        return self.report.target is None or self.report.target.ok

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write the optimized model to ``path`` atomically.

        Args:
            path: destination; must not be the input model.
            force: save even if validation failed.

        Raises:
            ValidationFailedError: validation failed and ``force`` is False.
            TargetCheckFailedError: the deploy-target check found problems and ``force`` is False.
            OutputPathError: ``path`` is the input or not writable.
        """
        if not self.ok and not force:
            raise ValidationFailedError(
                f"validation failed: {self.report.validation.reason if self.report.validation else ''}; not saved",
                hint="pass force=True (CLI: --force) to write it anyway",
            )
        if not self.target_ok and not force:
            tc = self.report.target
            raise TargetCheckFailedError(
                f"the result does not pass the {tc.target} checks: {tc.problems[0]}; not saved",
                hint="report.target lists every problem; pass force=True (CLI: --force) to write it anyway",
            )
        inputs = [self.report.input] if self.report.input and os.path.exists(self.report.input) else []
        dest = check_output_path(path, inputs)
        artifact = self._artifact
        if artifact is not None and artifact.exists() and artifact.name == dest.name:
            data = artifact.parent / (artifact.name + ".data")
            tmp = dest.parent / f".{dest.name}.onnxshrink-tmp"
            if data.exists():
                tmp_data = dest.parent / f".{dest.name}.data.onnxshrink-tmp"
                shutil.copyfile(data, tmp_data)
                os.replace(tmp_data, dest.parent / (dest.name + ".data"))
            shutil.copyfile(artifact, tmp)
            os.replace(tmp, dest)
        else:
            save_model(self.model, dest)
        self.report.output = str(dest)
        self.report.after.file_bytes = _file_bytes(dest)
        return dest

    def close(self) -> None:
        """Delete the temporary files of this run."""
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __del__(self) -> None:
        self.close()


def _as_dataset(data: Any, model: ir.Model) -> Dataset | None:
    if data is None:
        return None
    if isinstance(data, Dataset):
        return data
    specs = input_specs(model)
    if isinstance(data, dict):
        from onnxshrink.calib import _fit_chunk

        if not data:
            raise DataError("the data dict holds no arrays", hint="give one array per model input")
        chunk = _fit_chunk(specs, {k: np.asarray(v) for k, v in data.items()}, "data")
        return Dataset([lambda: chunk], len(next(iter(chunk.values()))), "data")
    return load_data(data, specs)


def _as_labels(labels: Any, dataset: Dataset | None) -> np.ndarray | None:
    if labels is None:
        return None
    if dataset is None:
        raise UsageError("--labels needs --data", hint="labels give the ground truth of the --data samples")
    if isinstance(labels, (str, os.PathLike)):
        try:
            arr = np.load(os.fspath(labels), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read labels {os.fspath(labels)}: {e}",
                            hint="give a .npy file with one integer label per sample") from e
        if isinstance(arr, np.lib.npyio.NpzFile):
            raise DataError("labels must be a .npy array, not an .npz", hint="np.save('labels.npy', y)")
    else:
        arr = np.asarray(labels)
    arr = arr.reshape(-1)
    if arr.dtype.kind not in "iu":
        raise DataError(f"labels have dtype {arr.dtype}, expected integers (class indices)",
                        hint="save class indices, e.g. np.save('labels.npy', y.astype('int64'))")
    if len(arr) != dataset.num_samples:
        raise DataError(f"{len(arr)} labels for {dataset.num_samples} samples",
                        hint="give exactly one label per sample of --data, in the same order")
    return arr


def optimize(
    model: ModelSource,
    passes: str | list[Step] | None = None,
    *,
    data: Any = None,
    input_shapes: dict[str, list[int]] | None = None,
    validate: bool = True,
    validate_each: bool = False,
    tolerance: float | Tolerances | None = None,
    output: str | os.PathLike | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    labels: Any = None,
    latency: bool | None = None,
    require_faster: bool = False,
    cache: bool = True,
    target: str | None = None,
) -> OptimizeResult:
    """Optimize a model with a pipeline of passes and validate the result against the original.

    Args:
        model: a path, model bytes, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` (a copy is not
            made for an ``ir.Model``: it is optimized in place).
        passes: a pass spec such as ``"fold,quant(mode=static)"``, or parsed steps. Default: ``"fold"``.
        data: inputs for calibration and validation: an .npz path, a folder, a dict of arrays, or a
            :class:`~onnxshrink.calib.Dataset`. Without it, validation uses deterministic synthetic inputs.
        input_shapes: concrete shapes for dynamic inputs, ``{"input": [1, 3, 224, 224]}``.
        validate: compare with the original in onnxruntime after the pipeline.
        validate_each: also compare after every pass; the first pass that breaks the tolerance is named.
        tolerance: allowed relative L2 error (float) or :class:`~onnxshrink.validate.Tolerances`; default
            the largest tolerance of the pipeline's passes.
        output: where :meth:`OptimizeResult.save` will write (lets validation run on the final file).
        progress: callback ``(label, done, total)`` for long work.
        labels: ground truth for ``data`` (a .npy path or an array, one label per sample), used by
            accuracy-driven options such as ``quant(max_drop=..., metric=accuracy)``.
        latency: measure onnxruntime CPU latency of the original and the result side by side
            (default: when the pipeline has a pass other than ``fold``).
        require_faster: fail (``ok`` False, exit code 3 in the CLI) if the result is measurably slower.
        cache: keep calibration statistics between runs (``$ONNXSHRINK_CACHE_DIR``, default
            ``~/.cache/onnxshrink``) so a re-run with other options reuses them.
        target: also check the result against a deploy target (``cpu``, ``mobile``, ``tensorrt``; see
            :func:`onnxshrink.targets.check_target`); the outcome is ``report.target``.

    Returns:
        An :class:`OptimizeResult` (``.report``, ``.save()``, ``.model``).

    Raises:
        ShrinkError: bad spec, model, data or output path (exit code 2 in the CLI); a pass that failed
            (1); with ``validate_each``, the pass that broke the tolerance (3).
    """
    start = time.perf_counter()
    steps = parse(passes if passes is not None else DEFAULT_PIPELINE) if not isinstance(passes, list) else passes
    if not steps:
        raise UsageError("no passes to run", hint="give a pass spec such as 'fold'")
    target_notes: list[str] = []
    if target is not None:
        from onnxshrink.pipeline import follow_target
        from onnxshrink.targets import check_target_name

        check_target_name(target)
        if isinstance(passes, str):
            steps, target_notes = follow_target(passes, steps, target)
    input_path = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    if output is not None:
        check_output_path(output, [input_path] if input_path else [])
    m = load_model(model)
    workdir = tempfile.mkdtemp(prefix="onnxshrink-")
    ok = False
    try:
        notes: list[str] = list(target_notes)
        specs = input_specs(m)
        if isinstance(tolerance, Tolerances):
            names = {v.name for v in m.graph.outputs}
            unknown = [n for n in tolerance.per_output if n not in names]
            if unknown:
                raise UsageError(f"--tol names unknown output {unknown[0]!r}",
                                 hint=f"the model's outputs are {', '.join(sorted(map(repr, names)))}")
        dataset = _as_dataset(data, m)
        label_array = _as_labels(labels, dataset)
        context = PassContext(data=dataset, input_shapes=dict(input_shapes or {}), progress=progress,
                              labels=label_array, store=StatsStore.default() if cache else None)
        for step in steps:
            if step.info.cls.needs_data and dataset is None:
                raise UsageError(f"pass {step.name!r} needs --data", pass_name=step.name,
                                 hint="give calibration data with --data (an .npz with one array per input)")
        val_data = None
        if validate or validate_each:
            if dataset is not None:
                val_data = dataset
            else:
                val_data, shape_notes = synthetic_data(specs, input_shapes)
                notes += [f"validation on synthetic inputs: {n}" for n in shape_notes]
        ref_path = input_path
        if (validate or validate_each) and ref_path is None:
            ref_path = os.path.join(workdir, "original.onnx")
            save_model(m, ref_path)
        declared = snapshot_annotations(m)
        try:
            infer_shapes(m)
            context.cache["shapes_current"] = True  # the first pass need not infer them again
        except Exception:
            notes.append("shape inference failed on the input: MACs may be incomplete")
        before = model_stats(m)
        before.file_bytes = _file_bytes(Path(input_path)) if input_path else None
        tol = tolerance if isinstance(tolerance, Tolerances) else Tolerances(
            tolerance if tolerance is not None else max(s.info.cls.validation_tolerance(s.options) for s in steps)
        )
        out_name = Path(os.fspath(output)).name if output is not None else "model.onnx"
        artifact = Path(workdir) / "out" / out_name
        artifact.parent.mkdir()

        def after_each(step: Step, model_now: ir.Model, record: Any) -> None:
            each_path = Path(workdir) / "each" / out_name
            each_path.parent.mkdir(exist_ok=True)
            save_model(model_now, each_path)
            result = compare_models(ref_path, each_path, val_data, tol)
            record.validation = result
            if result.status == "failed":
                raise ValidationFailedError(
                    f"validation failed after pass {step.name!r}: {result.reason}",
                    pass_name=step.name,
                    hint="this pass broke the outputs; change its options or drop it from --passes",
                )

        records = run_pipeline(m, steps, context, after_each=after_each if validate_each else None,
                               initial_stats=dataclasses.replace(before))
        after = dataclasses.replace(records[-1].after) if records else model_stats(m)
        strip_added_annotations(m, declared)
        save_model(m, artifact)
        validation: ValidationResult | None = None
        if validate:
            validation = compare_models(ref_path, artifact, val_data, tol, progress=progress)
            validation.notes = notes + validation.notes
            notes = []
        after.file_bytes = _file_bytes(artifact)
        measured = None
        if latency is None:
            latency = any(s.name != "fold" for s in steps) or require_faster
            if latency and not require_faster and ref_path is not None and _files_bytes(ref_path) > SEQUENTIAL_BYTES:
                # two sessions side by side would hold the model twice: opt in with latency=True
                latency = False
                notes.append("latency not measured: the model is over 1 GiB and timing needs both models "
                             "loaded at once (--latency measures it anyway)")
        if latency and ref_path is not None:
            lat_data = val_data if val_data is not None else synthetic_data(specs, input_shapes)[0]
            measured = measure_latency(ref_path, artifact, lat_data, batches=(1, 32))
            for lat in measured:
                if lat.slower:
                    notes.append(f"SLOWER: the result takes {lat.after_ms:.3f} ms vs {lat.before_ms:.3f} ms "
                                 f"for the original at batch {lat.batch} (x{lat.ratio:.2f}, onnxruntime CPU, "
                                 f"{lat.threads} thread)")
        target_check = None
        if target is not None:
            from onnxshrink.targets import check_target

            target_check = check_target(artifact, target, input_shapes=input_shapes)
        report = Report(
            input=input_path or "<in-memory model>",
            output=None,
            pipeline=format_pipeline(steps),
            before=before,
            after=after,
            passes=records,
            validation=validation,
            seconds=time.perf_counter() - start,
            notes=notes,
            version=__version__,
            latency=measured,
            require_faster=require_faster,
            target=target_check,
        )
        ok = True
        return OptimizeResult(m, report, artifact, workdir)
    finally:
        if not ok:
            shutil.rmtree(workdir, ignore_errors=True)
