"""Command line: ``onnxshrink optimize | check | inspect | passes``. No logic of its own.

Errors are printed as ``error: ...`` and ``hint: ...`` on stderr with no traceback (unless ``--debug``);
exit codes: 0 ok, 1 failure, 2 bad usage or input, 3 validation failed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
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


def _default_output(model: Path) -> Path:
    return model.with_name(model.stem + ".small.onnx")


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
    report: Optional[Path] = typer.Option(None, "--report", help="also write the report: .json or .md"),
    target: Optional[str] = typer.Option(None, "--target", help="check the result loads on cpu|mobile|tensorrt (exit 1 if not; nothing written unless --force)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only errors"),
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
    steps = parse(passes if passes is not None else DEFAULT_PIPELINE)
    out = output or _default_output(model)
    check_output_path(out, [model])
    if report is not None and report.suffix.lower() not in (".json", ".md"):
        raise UsageError(f"--report {report}: unknown format", hint="use a .json or .md file name")
    if report is not None:
        check_output_path(report, [model, out])
    default_tol = max(s.info.cls.tolerance for s in steps)
    tolerances = parse_tolerances(tol, default_tol)
    result = onnxshrink.optimize(
        model,
        steps,
        data=data,
        input_shapes=parse_input_shapes(input_shape),
        validate=not no_validate,
        validate_each=validate_each,
        tolerance=tolerances,
        output=out,
        target=target,
    )
    try:
        failed = not result.ok
        target_failed = not result.target_ok
        if (not failed and not target_failed) or force:
            result.save(out, force=force)
        rep = result.report
        if report is not None:
            text = rep.to_json() if report.suffix.lower() == ".json" else rep.to_markdown()
            tmp = report.with_name(f".{report.name}.tmp")
            tmp.write_text(text)
            os.replace(tmp, report)
        if not quiet:
            rep.render(Console(highlight=False))
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
def inspect(
    model: Path = typer.Argument(..., help="the ONNX model"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
    debug: bool = typer.Option(False, "--debug", help="debug logging and tracebacks"),
) -> int:
    """Show size by op type, parameters, MACs, opset, inputs/outputs and what each pass could do."""
    import onnx_ir as ir
    from onnxshrink.model import constant_tensors, infer_shapes, load_model, model_stats
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
