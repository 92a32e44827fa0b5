"""The report of an optimize run: one data object, rendered as a terminal table, JSON or Markdown.

JSON keys are stable and documented in the README (``schema`` is bumped on any incompatible change).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from onnxshrink.model import ModelStats
from onnxshrink.pipeline import PassRecord
from onnxshrink.validate import ValidationResult, worst_part

__all__ = ["Report", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _num(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _ratio(before: int | None, after: int | None) -> str:
    if not before or after is None:
        return "-"
    return f"{after / before:.3f}x"


@dataclasses.dataclass
class Report:
    """Everything an optimize run did and measured."""

    input: str
    output: str | None
    pipeline: str
    before: ModelStats
    after: ModelStats
    passes: list[PassRecord]
    validation: ValidationResult | None
    seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)
    version: str = ""
    latency: list[Any] | None = None
    require_faster: bool = False

    @property
    def slower(self) -> bool:
        """True if a latency measurement found the result measurably slower than the original."""
        return any(lat.slower for lat in self.latency or [])
    target: Any = None  # onnxshrink.targets.TargetCheck when a deploy target was checked

    @property
    def verdict(self) -> str:
        """``passed``, ``failed``, ``skipped`` (ORT could not run the original), ``not run``, or
        ``slower`` (validation passed but ``require_faster`` was set and the result is slower)."""
        v = "not run" if self.validation is None else self.validation.status
        if v != "failed" and self.require_faster and self.slower:
            return "slower"
        return v

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the documented, stable keys."""
        return {
            "schema": SCHEMA_VERSION,
            "tool": "onnxshrink",
            "version": self.version,
            "input": self.input,
            "output": self.output,
            "pipeline": self.pipeline,
            "verdict": self.verdict,
            "seconds": round(self.seconds, 4),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "passes": [p.to_dict() for p in self.passes],
            "validation": self.validation.to_dict() if self.validation is not None else None,
            "latency": [lat.to_dict() for lat in self.latency] if self.latency is not None else None,
            "notes": list(self.notes),
            "target": self.target.to_dict() if self.target is not None else None,
        }

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, default=str)

    def _summary_rows(self) -> list[tuple[str, str, str, str]]:
        b, a = self.before, self.after
        return [
            ("file size", _human_bytes(b.file_bytes), _human_bytes(a.file_bytes), _ratio(b.file_bytes, a.file_bytes)),
            ("weight bytes", _human_bytes(b.weight_bytes), _human_bytes(a.weight_bytes), _ratio(b.weight_bytes, a.weight_bytes)),
            ("nodes", _num(b.nodes), _num(a.nodes), _ratio(b.nodes, a.nodes)),
            ("parameters", _num(b.params), _num(a.params), _ratio(b.params, a.params)),
            ("MACs / sample", _num(b.macs), _num(a.macs), _ratio(b.macs, a.macs)),
            ("opset", str(b.opset), str(a.opset), ""),
        ]

    @staticmethod
    def _pass_detail(p: PassRecord) -> str:
        parts = [f"{k}: {_brief(v)}" for k, v in p.details.items()]
        parts += [f"{k}={v}" for k, v in sorted(p.counters.items())]
        parts += [f"declined '{k}' x{v}" for k, v in sorted(p.declines.items())]
        return "; ".join(parts) if parts else ("no change" if not p.modified else "")

    @staticmethod
    def _layer_table(p: PassRecord) -> list[str]:
        """Markdown for a per-layer table whose rows hold before/after pairs (prune)."""
        rows = p.layers or []
        if not rows:
            return []
        cols = [k for k in rows[0] if k not in ("node", "op")]
        lines = ["", f"### `{p.name}` per layer", "", "| node | op | " + " | ".join(cols) + " |",
                 "|---|---|" + "---:|" * len(cols)]

        def cell(v: Any) -> str:
            if isinstance(v, (list, tuple)) and len(v) == 2:
                return f"{'-' if v[0] is None else v[0]} → {'-' if v[1] is None else v[1]}"
            return "-" if v is None else str(v)

        for r in rows:
            lines.append(f"| {r.get('node')} | {r.get('op')} | " + " | ".join(cell(r.get(c)) for c in cols) + " |")
        return lines

    def _validation_lines(self) -> list[str]:
        v = self.validation
        if v is None:
            return ["validation: not run (--no-validate)"]
        head = f"validation: {v.status.upper()}"
        if v.samples:
            head += f" on {v.samples} sample(s) from {v.source}"
        if v.reason:
            head += f" — {v.reason}"
        return [head] + [f"  note: {n}" for n in v.notes]

    def to_markdown(self) -> str:
        """The report as GitHub-flavoured Markdown."""
        lines = [f"# onnxshrink report", "", f"- input: `{self.input}`", f"- output: `{self.output}`",
                 f"- pipeline: `{self.pipeline}`", f"- verdict: **{self.verdict}**", f"- time: {self.seconds:.2f} s", ""]
        lines += ["| | before | after | ratio |", "|---|---:|---:|---:|"]
        lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in self._summary_rows()]
        lines += ["", "## Passes", "", "| pass | nodes | params | weight bytes | time | detail |", "|---|---:|---:|---:|---:|---|"]
        for p in self.passes:
            lines.append(
                f"| `{p.spec}` | {p.before.nodes} → {p.after.nodes} | {p.before.params:,} → {p.after.params:,} | "
                f"{_human_bytes(p.before.weight_bytes)} → {_human_bytes(p.after.weight_bytes)} | {p.seconds:.3f} s | "
                f"{self._pass_detail(p)} |"
            )
        for p in self.passes:
            if p.layers and "node" in p.layers[0]:
                lines += self._layer_table(p)
            elif p.layers:
                lines += ["", f"### {p.name}: per layer", "", "| layer | op | weight | rank | params saved | MACs saved | reason |",
                          "|---|---|---|---:|---:|---:|---|"]
                for r in p.layers:
                    shape = "x".join(map(str, r.get("shape") or [])) or "-"
                    rank = r.get("rank")
                    rank = "-" if rank is None else ("x".join(map(str, rank)) if isinstance(rank, list) else str(rank))
                    lines.append(f"| `{r.get('layer')}` | {r.get('op')} | {shape} | {rank} | {_num(r.get('params_saved'))} | "
                                 f"{_num(r.get('macs_saved'))} | {r.get('reason')} |")
        lines += ["", "## Validation", ""] + [f"- {x.strip()}" for x in self._validation_lines()]
        if self.validation is not None and self.validation.outputs:
            lines += ["", "| output | rel L2 | worst part | max abs | cosine | SNR dB | top-1 agree | tolerance | ok |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
            for o in self.validation.outputs:
                lines.append(
                    f"| {o.name} | {o.rel_l2:.3g} | {worst_part(o)} | {o.max_abs:.3g} | {o.cosine:.6f} | "
                    f"{'-' if o.snr_db is None else f'{o.snr_db:.1f}'} | {'-' if o.top1 is None else f'{o.top1:.4f}'} | "
                    f"{o.tolerance:.3g} | {'yes' if o.passed else 'NO'} |"
                )
        if self.latency:
            lines += ["", "## Latency (onnxruntime CPU)", "", "| batch | before ms | after ms | ratio |",
                      "|---:|---:|---:|---:|"]
            lines += [f"| {x.batch} | {x.before_ms:.3f} | {x.after_ms:.3f} | {x.ratio:.2f} |" for x in self.latency]
        if self.target is not None:
            lines += ["", "## Deploy target", ""] + [f"- {x.strip()}" for x in self._target_lines()]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def _target_lines(self) -> list[str]:
        t = self.target
        if t is None:
            return []
        head = f"target {t.target}: {'OK' if t.ok else f'{len(t.problems)} PROBLEM(S)'}"
        return ([head] + [f"  problem: {p}" for p in t.problems] + [f"  checked: {c}" for c in t.checks]
                + [f"  note: {n}" for n in t.notes])

    def __str__(self) -> str:
        return self.to_markdown()

    def render(self, console: Any = None) -> None:
        """Print the report as rich tables to ``console`` (a ``rich.console.Console``; stdout by default)."""
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        console = console or Console()
        console.print(f"[bold]onnxshrink[/bold] {escape(self.input)} → {escape(self.output or '(not saved)')}")
        console.print(f"pipeline: [cyan]{escape(self.pipeline)}[/cyan]")
        t = Table(show_header=True, header_style="bold")
        for col, just in (("", "left"), ("before", "right"), ("after", "right"), ("ratio", "right")):
            t.add_column(col, justify=just)  # type: ignore[arg-type]
        for row in self._summary_rows():
            t.add_row(*row)
        console.print(t)
        pt = Table(title="passes", show_header=True, header_style="bold")
        for col in ("pass", "nodes", "weight bytes", "time", "detail"):
            pt.add_column(col, overflow="fold")
        for p in self.passes:
            pt.add_row(escape(p.name), f"{p.before.nodes} → {p.after.nodes}",
                       f"{_human_bytes(p.before.weight_bytes)} → {_human_bytes(p.after.weight_bytes)}",
                       f"{p.seconds:.3f} s", escape(self._pass_detail(p)))
        console.print(pt)
        v = self.validation
        if v is not None and v.outputs:
            vt = Table(title="validation vs original (onnxruntime)", show_header=True, header_style="bold")
            for col in ("output", "rel L2", "worst part", "max abs", "cosine", "SNR dB", "top-1 agree", "tol", "ok"):
                vt.add_column(col, justify="right" if col not in ("output", "ok") else "left")
            for o in v.outputs:
                vt.add_row(escape(o.name), f"{o.rel_l2:.3g}", escape(worst_part(o)), f"{o.max_abs:.3g}", f"{o.cosine:.6f}",
                           "-" if o.snr_db is None else f"{o.snr_db:.1f}",
                           "-" if o.top1 is None else f"{o.top1:.4f}", f"{o.tolerance:.3g}",
                           "[green]yes[/green]" if o.passed else "[red]NO[/red]")
            console.print(vt)
        if self.latency:
            lt = Table(title="latency (onnxruntime CPU, median)", show_header=True, header_style="bold")
            for col in ("batch", "before", "after", "ratio"):
                lt.add_column(col, justify="right")
            for x in self.latency:
                lt.add_row(str(x.batch), f"{x.before_ms:.3f} ms", f"{x.after_ms:.3f} ms",
                           f"[red]{x.ratio:.2f}x[/red]" if x.slower else f"{x.ratio:.2f}x")
            console.print(lt)
        color = {"passed": "green", "failed": "red"}.get(self.verdict, "yellow")
        for i, line in enumerate(self._validation_lines()):
            console.print(f"[{color}]{escape(line)}[/{color}]" if i == 0 else escape(line), highlight=False)
        for i, line in enumerate(self._target_lines()):
            tcolor = "green" if self.target.ok else "red"
            console.print(f"[{tcolor}]{escape(line)}[/{tcolor}]" if i == 0 else escape(line), highlight=False)
        for n in self.notes:
            style = "bold red" if n.startswith("SLOWER") else None
            console.print(f"[{style}]note: {escape(n)}[/{style}]" if style else f"note: {escape(n)}", highlight=False)


def _brief(value: Any) -> str:
    """A one-line rendering of a pass detail value."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_brief(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)
