"""Pass-spec grammar (parse and print back) and the pipeline runner.

Grammar::

    spec   := step ("," step)*
    step   := NAME [ "(" [ option ("," option)* ] ")" ]
    option := KEY "=" VALUE          # VALUE: int, float, bool (true/false) or a bare word

Example: ``fold,quant(mode=static,calib=percentile),prune(ratio=0.3)``. Parentheses, not braces: in
bash ``a{b=1,c=2}`` brace-expands silently.

:func:`parse` returns resolved :class:`Step` objects (options typed and validated against the registry,
every default filled in); :func:`format_pipeline` prints them back in canonical form, which parses to
the same steps. Unknown passes and options are :class:`~onnxshrink.errors.SpecError` with a
did-you-mean hint; order rules declared in the registry are checked, never fixed by reordering.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
import typing
from typing import Any, Callable

import onnx_ir as ir

from onnxshrink.errors import PassFailedError, ShrinkError, SpecError
from onnxshrink.model import ModelStats, model_stats
from onnxshrink.registry import PassContext, PassInfo, get_pass, literal_choices, suggest

__all__ = [
    "DEFAULT_PIPELINE",
    "Step",
    "PassRecord",
    "parse",
    "format_pipeline",
    "format_value",
    "check_order",
    "run_pipeline",
]

logger = logging.getLogger(__name__)

#: The pipeline run when the user gives no ``--passes``: the safe, exact one.
DEFAULT_PIPELINE = "fold"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VALUE = re.compile(r"[A-Za-z0-9_.+\-*?/|:\[\]]+")


@dataclasses.dataclass(frozen=True)
class Step:
    """One resolved pipeline step: a registered pass and a full options instance."""

    name: str
    options: Any

    @property
    def info(self) -> PassInfo:
        """The registry entry of this step's pass."""
        return get_pass(self.name)

    def format(self) -> str:
        """Canonical text of this step, every option spelled out."""
        fields = dataclasses.fields(self.options)
        if not fields:
            return self.name
        inner = ",".join(f"{f.name}={format_value(getattr(self.options, f.name))}" for f in fields)
        return f"{self.name}({inner})"


def format_value(value: Any) -> str:
    """Print one option value so that it parses back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _error(spec: str, pos: int, message: str, hint: str | None = None) -> SpecError:
    caret = f"{spec}\n{' ' * pos}^"
    return SpecError(f"bad pass spec at column {pos + 1}: {message}\n{caret}",
                     hint=hint or "the form is name(key=value,...),name; e.g. fold,prune(ratio=0.3)")


def _tokenize_steps(spec: str) -> list[tuple[str, int, list[tuple[str, str, int]]]]:
    """Split the text into (name, pos, [(key, raw value, pos)]) without typing the values."""
    steps = []
    i, n = 0, len(spec)

    def skip_ws(j: int) -> int:
        while j < n and spec[j].isspace():
            j += 1
        return j

    i = skip_ws(i)
    if i >= n:
        raise _error(spec, 0, "empty pass spec", hint="e.g. --passes fold,quant")
    while True:
        i = skip_ws(i)
        m = _NAME.match(spec, i)
        if not m:
            raise _error(spec, i, "expected a pass name", hint="pass names are words like fold or quant")
        name, name_pos = m.group(0), i
        i = skip_ws(m.end())
        opts: list[tuple[str, str, int]] = []
        if i < n and spec[i] in "{[":
            raise _error(spec, i, f"use parentheses for options, not {spec[i]!r}", hint="e.g. prune(ratio=0.3)")
        if i < n and spec[i] == "(":
            i = skip_ws(i + 1)
            if i < n and spec[i] == ")":
                i += 1
            else:
                while True:
                    i = skip_ws(i)
                    km = _NAME.match(spec, i)
                    if not km:
                        raise _error(spec, i, "expected an option name")
                    key, key_pos = km.group(0), i
                    i = skip_ws(km.end())
                    if i >= n or spec[i] != "=":
                        raise _error(spec, i, f"expected '=' after option {key!r}", hint=f"write {key}=VALUE")
                    i = skip_ws(i + 1)
                    vm = _VALUE.match(spec, i)
                    if not vm:
                        raise _error(spec, i, f"expected a value for option {key!r}")
                    opts.append((key, vm.group(0), key_pos))
                    i = skip_ws(vm.end())
                    if i < n and spec[i] == ",":
                        i += 1
                        continue
                    if i < n and spec[i] == ")":
                        i += 1
                        break
                    raise _error(spec, i, "expected ',' or ')' in the option list")
        steps.append((name, name_pos, opts))
        i = skip_ws(i)
        if i >= n:
            return steps
        if spec[i] != ",":
            raise _error(spec, i, "expected ',' between passes")
        i += 1


def _convert(info: PassInfo, field: dataclasses.Field, raw: str) -> Any:
    tp = info.option_type(field)
    optional = False
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else tp
    if optional and raw.lower() == "none":
        return None
    choices = literal_choices(tp) or field.metadata.get("choices")
    where = f"option {field.name!r} of pass {info.name!r}"
    if choices:
        by_text = {format_value(c): c for c in choices}
        if raw in by_text:
            return by_text[raw]
        if raw not in choices:
            raise SpecError(
                f"{where} must be one of {', '.join(by_text)}, not {raw!r}",
                hint=suggest(raw, list(by_text)),
                pass_name=info.name,
                option=field.name,
            )
        return raw
    if tp is bool:
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise SpecError(f"{where} must be true or false, not {raw!r}", pass_name=info.name, option=field.name,
                        hint=f"write {field.name}=true or {field.name}=false")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise SpecError(f"{where} must be an integer, not {raw!r}", pass_name=info.name, option=field.name,
                            hint=f"default: {field.name}={format_value(field.default)}") from None
    if tp is float:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise SpecError(f"{where} must be a finite number, not {raw!r}", pass_name=info.name, option=field.name,
                            hint=f"default: {field.name}={format_value(field.default)}")
        return value
    return raw


def explicit_options(spec: str) -> list[set[str]]:
    """The option keys each step of ``spec`` spells out (the rest were filled with defaults)."""
    return [{key for key, _raw, _pos in opts} for _name, _pos, opts in _tokenize_steps(spec)]


def follow_target(spec: str, steps: list[Step], target: str) -> tuple[list[Step], list[str]]:
    """Steps with a ``target`` option that ``spec`` leaves at its default take the deploy target being
    checked (``--target``); a step that names another target contradicts it and is refused."""
    out, notes = [], []
    for step, keys in zip(steps, explicit_options(spec)):
        current = getattr(step.options, "target", None)
        if current is not None and current != target:
            if "target" in keys:
                raise SpecError(f"{step.name}(target={current}) contradicts --target {target}",
                                pass_name=step.name, option="target",
                                hint=f"drop target= from {step.name}, or write {step.name}(target={target})")
            step = dataclasses.replace(step, options=dataclasses.replace(step.options, target=target))
            notes.append(f"{step.name} works for target={target} (from --target)")
        out.append(step)
    return out, notes


def parse(spec: str) -> list[Step]:
    """Parse a pass spec into resolved steps, every default filled in, order rules checked.

    Raises:
        SpecError: syntax error, unknown pass or option, bad value, or an order rule broken.
    """
    steps = []
    for name, _pos, raw_opts in _tokenize_steps(spec):
        info = get_pass(name)
        fields = {f.name: f for f in info.option_fields()}
        values: dict[str, Any] = {}
        for key, raw, _kpos in raw_opts:
            if key not in fields:
                raise SpecError(
                    f"pass {name!r} has no option {key!r}",
                    hint=suggest(key, list(fields)) or (
                        f"its options: {', '.join(fields)}" if fields else f"pass {name!r} takes no options"
                    ),
                    pass_name=name,
                    option=key,
                )
            if key in values:
                raise SpecError(f"option {key!r} of pass {name!r} is given twice", pass_name=name, option=key,
                                hint="give each option once")
            values[key] = _convert(info, fields[key], raw)
        try:
            options = info.options(**values)
        except (ValueError, TypeError) as e:
            raise SpecError(f"bad options for pass {name!r}: {e}", pass_name=name,
                            hint="see `onnxshrink passes` for every option and its range") from e
        steps.append(Step(name, options))
    check_order(steps)
    return steps


def format_pipeline(steps: list[Step]) -> str:
    """Canonical text of a pipeline; ``parse(format_pipeline(s)) == s``."""
    return ",".join(step.format() for step in steps)


def check_order(steps: list[Step]) -> None:
    """Check the registry's order rules; never reorders.

    Raises:
        SpecError: a pass that must precede another comes after it.
    """
    position = {}
    for i, step in enumerate(steps):
        position.setdefault(step.name, []).append(i)
    for i, step in enumerate(steps):
        for later in step.info.must_precede:
            for j in position.get(later, []):
                if j < i:
                    raise SpecError(
                        f"pass {step.name!r} must come before {later!r}, but the spec runs {later!r} first",
                        hint=f"write {step.name} before {later} in --passes (onnxshrink never reorders passes)",
                        pass_name=step.name,
                    )


@dataclasses.dataclass
class PassRecord:
    """What one pass did: timing, before/after figures, counters and declines."""

    name: str
    spec: str
    modified: bool
    seconds: float
    before: ModelStats
    after: ModelStats
    counters: dict[str, int]
    declines: dict[str, int]
    validation: Any = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    layers: list[dict] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready dict with stable keys."""
        return {
            "name": self.name,
            "spec": self.spec,
            "modified": self.modified,
            "seconds": round(self.seconds, 4),
            "nodes_before": self.before.nodes,
            "nodes_after": self.after.nodes,
            "params_before": self.before.params,
            "params_after": self.after.params,
            "weight_bytes_before": self.before.weight_bytes,
            "weight_bytes_after": self.after.weight_bytes,
            "macs_before": self.before.macs,
            "macs_after": self.after.macs,
            "counters": dict(self.counters),
            "declines": dict(self.declines),
            "details": dict(self.details),
            "layers": list(self.layers),
            "validation": self.validation.to_dict() if self.validation is not None else None,
        }


def run_pipeline(
    model: ir.Model,
    steps: list[Step],
    context: PassContext,
    *,
    after_each: Callable[[Step, ir.Model, PassRecord], None] | None = None,
    initial_stats: ModelStats | None = None,
) -> list[PassRecord]:
    """Run ``steps`` in order on ``model`` in place.

    Args:
        model: the model, edited in place.
        steps: resolved steps from :func:`parse`.
        context: what passes may use (data, shapes, progress).
        after_each: called after every pass (used for ``--validate-each``); may raise to stop.
        initial_stats: :func:`~onnxshrink.model.model_stats` of ``model`` as given, if the caller has them
            (saves one walk over the model).

    Returns:
        One :class:`PassRecord` per step.

    Raises:
        ShrinkError: a pass refused (with the pass name filled in), or PassFailedError wrapping an
            unexpected exception.
    """
    records = []
    stats = initial_stats if initial_stats is not None else model_stats(model)
    for step in steps:
        info = step.info
        p = info.cls(step.options, context)
        start = time.perf_counter()
        try:
            result = p(model)
        except ShrinkError as e:
            e.pass_name = e.pass_name or step.name
            raise
        except Exception as e:  # any bug or unexpected model feature: name the pass
            cause = e.__cause__ if isinstance(e, ir.passes.PassError) and e.__cause__ else e
            raise PassFailedError(
                f"pass {step.name!r} failed: {type(cause).__name__}: {cause}",
                pass_name=step.name,
                hint="rerun with --debug for the traceback, and report it with the model if you can",
            ) from e
        seconds = time.perf_counter() - start
        if result.modified:
            context.cache.pop("shapes_current", None)  # shapes may be stale for the next pass
        after = model_stats(model)
        record = PassRecord(
            name=step.name,
            spec=step.format(),
            modified=bool(result.modified),
            seconds=seconds,
            before=stats,
            after=after,
            counters=dict(getattr(result, "stats", {}).get("counters", {})),
            declines=dict(getattr(result, "stats", {}).get("declines", {})),
            details={k: v for k, v in getattr(result, "stats", {}).items()
                     if k not in ("counters", "declines", "layers")},
            layers=list(getattr(result, "stats", {}).get("layers", [])),
        )
        logger.info("%s: %d -> %d nodes in %.3fs", step.name, stats.nodes, after.nodes, seconds)
        records.append(record)
        if after_each is not None:
            after_each(step, model, record)
        stats = after
    return records
