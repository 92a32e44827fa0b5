"""Command line: ``onnxshrink optimize | compare | check | inspect | passes``. No logic of its own.

Errors are printed as ``error: ...`` and ``hint: ...`` on stderr with no traceback (unless ``--debug``);
exit codes: 0 ok, 1 failure, 2 bad usage or input, 3 validation failed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from typer import exceptions as typer_exc
from typer._click import exceptions as click_exc  # typer 0.29 vendors its own click
from rich.console import Console
from rich.table import Table

from onnxshrink.errors import ShrinkError, UsageError

__all__ = ["app", "main"]

app = typer.Typer(
    name="onnxshrink",
    help="Make ONNX models smaller and faster, and prove they still give the same answers.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


def _setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else (logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(level)
    # Libraries we build on log recoverable failures (with tracebacks) at WARNING: not the user's concern.
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.ERROR)


def _with_max_drop(steps: list, max_drop: float) -> list:
    """Set ``max_drop`` on the pipeline's quant step (the option it maps to)."""
    import dataclasses

    quants = [i for i, s in enumerate(steps) if s.name == "quant"]
    if not quants:
        raise UsageError("--max-drop needs a quant pass in --passes",
                         hint="e.g. --passes fold,quant(mode=static) --max-drop 0.5")
    out = list(steps)
    for i in quants:
        out[i] = dataclasses.replace(out[i], options=dataclasses.replace(out[i].options, max_drop=max_drop))
    return out


def _default_output(model: Path) -> Path:
    return model.with_name(model.stem + ".small.onnx")


REPORT_FORMATS = (".json", ".md", ".html")


def _check_report_path(report: Optional[Path], inputs: list[Path]) -> None:
    from onnxshrink.model import check_output_path

    if report is None:
        return
    if report.suffix.lower() not in REPORT_FORMATS:
        raise UsageError(f"--report {report}: unknown format", hint="use a .json, .md or .html file name")
    check_output_path(report, inputs)


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (temp file beside it, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextmanager
def _progress_bar(quiet: bool):
    """A rich progress bar on stderr for long work, as a ``(label, done, total)`` callback.

    Shown only when stderr is a terminal (logs and pipes stay clean; ``TTY_COMPATIBLE=1`` forces it), erased
    when done on an interactive one, and never with ``--quiet``; yields None then.
    """
    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    tasks: dict[str, int] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=console.is_interactive) as bar:
        def update(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done, total=total)

        yield update


@app.command()
def optimize(
    model: Path = typer.Argument(..., help="the ONNX model to optimize (never modified)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="where to write the result [default: MODEL.small.onnx]"),
    passes: Optional[str] = typer.Option(None, "--passes", "-p", help="pass spec, e.g. fold,quant(mode=static) [default: fold]"),
    data: Optional[Path] = typer.Option(None, "--data", help=".npz (one array per input) or folder of .npz/.npy"),
    input_shape: Optional[List[str]] = typer.Option(None, "--input-shape", help="NAME=1x3x224x224 for dynamic inputs (repeatable)"),
    tol: Optional[List[str]] = typer.Option(None, "--tol", help="allowed rel-L2 error: 1e-3, or OUTPUT=1e-3 (repeatable)"),
    no_validate: bool = typer.Option(False, "--no-validate", help="skip the onnxruntime comparison"),
    validate_each: bool = typer.Option(False, "--validate-each", help="compare after every pass and name the one that breaks"),
    force: bool = typer.Option(False, "--force", help="write the output even if validation fails (exit code stays 3)"),
    report: Optional[Path] = typer.Option(None, "--report", help="also write the report: .json, .md or .html (a page with plots)"),
    labels: Optional[Path] = typer.Option(None, "--labels", help=".npy of integer labels, one per --data sample"),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="accuracy budget for quant: sets quant(max_drop=...) (points of top-1/accuracy, or 1-cosine)"),
    require_faster: bool = typer.Option(False, "--require-faster", help="fail (exit 3) if the result is slower than the original in onnxruntime"),
    latency: Optional[bool] = typer.Option(None, "--latency/--no-latency", help="measure ORT CPU latency before/after [default: when a pass other than fold runs]"),
    latency_runs: int = typer.Option(30, "--latency-runs", help="for --report x.html: onnxruntime runs per model to time (0: skip)"),
    target: Optional[str] = typer.Option(None, "--target", help="check the result loads on cpu|mobile|tensorrt (exit 1 if not; nothing written unless --force)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only errors (no progress bar)"),
    debug: bool = typer.Option(False, "--debug", help="debug logging and tracebacks"),
) -> int:
    """Run a pipeline of passes, validate against the original, save atomically, print the report."""
    import onnxshrink
    from onnxshrink.calib import parse_input_shapes
    from onnxshrink.model import check_output_path
    from onnxshrink.pipeline import DEFAULT_PIPELINE, parse
    from onnxshrink.validate import parse_tolerances

    _setup_logging(debug, quiet)
    if target is not None:
        from onnxshrink.targets import check_target_name

        check_target_name(target)
    spec = passes if passes is not None else DEFAULT_PIPELINE
    steps = parse(spec)
    if target is not None:
        from onnxshrink.pipeline import follow_target

        steps, _ = follow_target(spec, steps, target)  # the report's pipeline line shows it
    if max_drop is not None:
        steps = _with_max_drop(steps, max_drop)
    out = output or _default_output(model)
    check_output_path(out, [model])
    _check_report_path(report, [model, out])
    if latency_runs < 0:
        raise UsageError("--latency-runs must be >= 0")
    default_tol = max(s.info.cls.validation_tolerance(s.options) for s in steps)
    tolerances = parse_tolerances(tol, default_tol)
    shapes = parse_input_shapes(input_shape)
    with _progress_bar(quiet) as progress:
        result = onnxshrink.optimize(
            model,
            steps,
            data=data,
            input_shapes=shapes,
            validate=not no_validate,
            validate_each=validate_each,
            tolerance=tolerances,
            output=out,
            progress=progress,
            labels=labels,
            latency=latency,
            require_faster=require_faster,
            target=target,
        )
    try:
        failed = not result.ok
        target_failed = not result.target_ok
        if (not failed and not target_failed) or force:
            result.save(out, force=force)
        rep = result.report
        if report is not None:
            suffix = report.suffix.lower()
            if suffix == ".html":
                from onnxshrink.compare import compare as compare_fn
                from onnxshrink.html import optimize_page

                # the page's per-layer plot and size by op come from comparing the two files; the latency
                # optimize already measured (batch 1) is reused rather than timed a second time
                measured = {x.batch: x for x in rep.latency or []}
                with _progress_bar(quiet) as progress:
                    diff = compare_fn(model, result.artifact, data=data, tolerance=tolerances, per_layer=True,
                                      latency_runs=0 if 1 in measured else latency_runs, input_shapes=shapes,
                                      progress=progress)
                if 1 in measured:
                    lat = measured[1]
                    diff.latency = {"ref_ms": lat.before_ms, "cand_ms": lat.after_ms,
                                    "speedup": lat.before_ms / lat.after_ms if lat.after_ms > 0 else None,
                                    "runs": lat.runs, "batch": 1}
                text = optimize_page(rep, diff)
            else:
                text = rep.to_json() if suffix == ".json" else rep.to_markdown()
            _write_text(report, text)
        if not quiet:
            rep.render(Console(highlight=False))
        if failed and rep.verdict == "slower":
            worst = max(rep.latency or [], key=lambda x: x.ratio)
            _err.print(f"error: the result is slower than the original ({worst.after_ms:.3f} ms vs "
                       f"{worst.before_ms:.3f} ms at batch {worst.batch}) and --require-faster was given")
            _err.print(f"hint: written anyway to {out} because of --force" if force else
                       "hint: nothing was written; try format=qop, other passes, or drop --require-faster")
            return 3
        if failed:
            _err.print(f"error: validation failed: {rep.validation.reason if rep.validation else ''}")
            if force:
                _err.print(f"hint: written anyway to {out} because of --force")
            else:
                _err.print("hint: nothing was written; loosen --tol, change the passes, or use --force")
            return 3
        if target_failed:
            tc = rep.target
            _err.print(f"error: the result does not pass the {tc.target} checks: {tc.problems[0]}"
                       + (f" (and {len(tc.problems) - 1} more)" if len(tc.problems) > 1 else ""))
            if force:
                _err.print(f"hint: written anyway to {out} because of --force")
            else:
                _err.print("hint: nothing was written (the report lists every problem); change the passes "
                           "or use --force")
            return 1
        if not quiet and rep.output:
            Console(highlight=False, markup=False).print(f"wrote {rep.output}")
        return 0
    finally:
        result.close()


@app.command()
def compare(
    ref: Path = typer.Argument(..., help="the reference model (e.g. the original)"),
    cand: Path = typer.Argument(..., help="the candidate model (e.g. the optimized one)"),
    data: Optional[Path] = typer.Option(None, "--data", help=".npz (one array per input) or folder of .npz/.npy [default: synthetic]"),
    labels: Optional[Path] = typer.Option(None, "--labels", help=".npy of integer labels, one per sample: top-1/top-5 accuracy"),
    tol: Optional[List[str]] = typer.Option(None, "--tol", help="allowed rel-L2 error: 1e-3, or OUTPUT=1e-3 (repeatable) [default: 1e-5]"),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="with --labels: allowed top-1 accuracy drop, e.g. 0.01 (1 point)"),
    per_layer: bool = typer.Option(False, "--per-layer", help="match intermediate tensors and rank layers by the error they add"),
    budget_mb: float = typer.Option(256, "--budget-mb", help="--per-layer: MiB of captured tensors per batch"),
    limit: Optional[int] = typer.Option(None, "--limit", help="use at most this many samples"),
    input_shape: Optional[List[str]] = typer.Option(None, "--input-shape", help="NAME=1x3x224x224 for dynamic inputs without --data"),
    latency_runs: Optional[int] = typer.Option(None, "--latency-runs", help="time both models over this many onnxruntime runs [default: 0, or 30 with an .html report]"),
    report: Optional[Path] = typer.Option(None, "--report", help="also write the comparison: .json, .md or .html"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only errors (no progress bar, no tables)"),
    debug: bool = typer.Option(False, "--debug", help="debug logging and tracebacks"),
) -> int:
    """Compare two models on the same inputs: per-output error distributions, accuracy, per-layer error.

    Exit code 0 when every output is within tolerance (and the accuracy drop within --max-drop), 3 when not.
    """
    from onnxshrink.calib import parse_input_shapes
    from onnxshrink.compare import DEFAULT_TOLERANCE, compare as compare_fn
    from onnxshrink.validate import parse_tolerances

    _setup_logging(debug, quiet)
    _check_report_path(report, [ref, cand])
    if max_drop is not None and not (0 <= max_drop <= 1):
        raise UsageError(f"--max-drop {max_drop}: must be a fraction in [0, 1]", hint="0.01 allows one point")
    if budget_mb <= 0:
        raise UsageError("--budget-mb must be > 0")
    if latency_runs is not None and latency_runs < 0:
        raise UsageError("--latency-runs must be >= 0")
    html = report is not None and report.suffix.lower() == ".html"
    runs = latency_runs if latency_runs is not None else (30 if html else 0)
    with _progress_bar(quiet) as progress:
        diff = compare_fn(ref, cand, data=data, labels=labels, tolerance=parse_tolerances(tol, DEFAULT_TOLERANCE),
                          max_drop=max_drop, per_layer=per_layer, budget_bytes=int(budget_mb * (1 << 20)),
                          latency_runs=runs, limit=limit, input_shapes=parse_input_shapes(input_shape),
                          progress=progress)
    if report is not None:
        suffix = report.suffix.lower()
        if suffix == ".html":
            from onnxshrink.html import compare_page

            text = compare_page(diff)
        else:
            text = diff.to_json() if suffix == ".json" else diff.to_markdown()
        _write_text(report, text)
    if not quiet:
        diff.render(Console(highlight=False))
    if not diff.passed:
        _err.print(f"error: outside tolerance: {diff.reason}")
        _err.print("hint: the per-output table shows where; --per-layer ranks the layers that lose accuracy")
        return 3
    return 0


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="the ONNX model"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
    debug: bool = typer.Option(False, "--debug", help="debug logging and tracebacks"),
) -> int:
    """Show size by op type, parameters, MACs, opset, inputs/outputs and what each pass could do."""
    from onnxshrink.model import infer_shapes, load_model, model_stats
    from onnxshrink.registry import all_passes

    _setup_logging(debug, False)
    m = load_model(model)
    try:
        infer_shapes(m)
    except Exception:  # custom ops: MACs of what follows them may be unknown
        pass
    stats = model_stats(m)
    stats.file_bytes = model.stat().st_size
    # weight bytes by the op type that consumes them
    by_op: dict[str, int] = {}
    for graph in m.graphs():
        for value in graph.initializers.values():
            t = value.const_value
            if t is None:
                continue
            users = {u.node.op_type for u in value.uses()} or {"(unused)"}
            key = "/".join(sorted(users))
            by_op[key] = by_op.get(key, 0) + t.nbytes
    def io(values):
        return [{"name": v.name, "dtype": str(v.dtype) if v.dtype is not None else None,
                 "shape": [d if isinstance(d, int) else str(d) for d in v.shape] if v.shape is not None else None}
                for v in values if not v.is_initializer()]
    info = {
        "model": str(model),
        "opsets": dict(m.opset_imports),
        "ir_version": m.ir_version,
        "producer": f"{m.producer_name or ''} {m.producer_version or ''}".strip(),
        "inputs": io(m.graph.inputs),
        "outputs": io(m.graph.outputs),
        "stats": stats.to_dict(),
        "weight_bytes_by_consumer": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        "passes": {p.name: p.cls.applicability(m) for p in all_passes()},
    }
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    con = Console(highlight=False)
    con.print(f"[bold]{escape(str(model))}[/bold]  opsets {info['opsets']}  ir_version {m.ir_version}  producer {info['producer'] or '-'}")
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            con.print(escape(f"  {kind[:-1]:6} {v['name']}: {v['dtype']} {v['shape']}"))
    con.print(f"  nodes {stats.nodes:,}  params {stats.params:,}  weights {stats.weight_bytes:,} B  "
              f"file {stats.file_bytes:,} B  MACs/sample {('-' if stats.macs is None else f'{stats.macs:,}')}")
    t = Table(title="ops", show_header=True, header_style="bold")
    t.add_column("op type")
    t.add_column("count", justify="right")
    for op, n in sorted(stats.op_counts.items(), key=lambda kv: -kv[1]):
        t.add_row(escape(op), str(n))
    con.print(t)
    w = Table(title="weight bytes by consumer op", show_header=True, header_style="bold")
    w.add_column("consumer")
    w.add_column("bytes", justify="right")
    for op, n in info["weight_bytes_by_consumer"].items():
        w.add_row(escape(op), f"{n:,}")
    con.print(w)
    for name, text in info["passes"].items():
        con.print(f"  pass [cyan]{name}[/cyan]: {escape(text)}")
    return 0


@app.command()
def check(
    model: Path = typer.Argument(..., help="the ONNX model to check (never modified)"),
    target: str = typer.Option(..., "--target", "-t", help="cpu | mobile | tensorrt"),
    input_shape: Optional[List[str]] = typer.Option(None, "--input-shape", help="NAME=1x3x224x224 for dynamic inputs (cpu: to run it)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of text"),
    debug: bool = typer.Option(False, "--debug", help="debug logging and tracebacks"),
) -> int:
    """Check that a model loads where it will be deployed: exit 0 ok, 1 problems found, 2 bad input."""
    from onnxshrink.calib import parse_input_shapes
    from onnxshrink.targets import check_target, check_target_name

    _setup_logging(debug, False)
    check_target_name(target)
    result = check_target(model, target, input_shapes=parse_input_shapes(input_shape))
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        con = Console(highlight=False, markup=False, soft_wrap=True)
        con.print(f"{model}: target {target}: " + ("OK" if result.ok else f"{len(result.problems)} problem(s)"))
        for p in result.problems:
            con.print(f"  problem: {p}")
        for c in result.checks:
            con.print(f"  checked: {c}")
        for n in result.notes:
            con.print(f"  note: {n}")
    return 0 if result.ok else 1


@app.command(name="passes")
def list_passes() -> int:
    """List every pass with its options, defaults and help."""
    from onnxshrink.pipeline import format_value
    from onnxshrink.registry import all_passes, literal_choices

    con = Console(highlight=False)
    for p in all_passes():
        con.print(f"[bold cyan]{p.name}[/bold cyan] — {p.summary}")
        if p.must_precede:
            con.print(f"    must come before: {', '.join(p.must_precede)}")
        for f in dataclasses.fields(p.options):
            choices = literal_choices(p.option_type(f)) or f.metadata.get("choices")
            extra = f" (one of {', '.join(map(str, choices))})" if choices else ""
            con.print(f"    {f.name}={format_value(f.default)}  {f.metadata.get('help', '')}{extra}")
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and turn errors into one-line messages and exit codes."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    try:
        rv = app(args=args, prog_name="onnxshrink", standalone_mode=False)
    except click_exc.NoArgsIsHelpError as e:
        print(e.ctx.get_help() if e.ctx is not None else "usage: onnxshrink COMMAND [OPTIONS]")
        sys.exit(0)
    except click_exc.UsageError as e:
        msg = e.format_message().strip().splitlines()[0] if e.format_message().strip() else "bad usage"
        _err.print(f"error: {msg}")
        _err.print("hint: see `onnxshrink --help` or `onnxshrink COMMAND --help`")
        sys.exit(2)
    except typer_exc.Abort:
        _err.print("error: aborted")
        sys.exit(130)
    except typer_exc.Exit as e:
        sys.exit(e.exit_code)
    except ShrinkError as e:
        if debug:
            import traceback

            traceback.print_exc()
        first, *rest = e.message.splitlines() or [""]
        where = [x for x in (e.node, e.tensor) if x and repr(x) not in first]
        _err.print(f"error: {first}" + (f" (at {', '.join(map(repr, where))})" if where else ""))
        for line in rest:
            _err.print(f"  {line}")
        if e.hint:
            _err.print(f"hint: {e.hint}")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _err.print("error: interrupted")
        sys.exit(130)
    except Exception as e:
        if debug:
            import traceback

            traceback.print_exc()
        _err.print(f"error: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        _err.print("hint: rerun with --debug for the traceback and report it")
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
