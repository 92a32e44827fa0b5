"""The pass registry, the thin pass base class and the context passes receive.

A pass is a class deriving from :class:`ShrinkPass` (an ``onnx_ir`` in-place pass), registered under one
short name with :func:`register`, with its options in a frozen dataclass whose fields carry typed defaults
and ``help`` metadata::

    @dataclasses.dataclass(frozen=True)
    class FoldOptions:
        fuse_bn: bool = option(True, "fuse BatchNormalization into Conv/ConvTranspose/Gemm")

    @register("fold", FoldOptions, summary="constant folding, no-op and dead-code removal")
    class FoldPass(ShrinkPass):
        def run(self, model): ...

Order rules between passes are declared here (``must_precede``) and *checked* by the pipeline, never solved
by reordering.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import logging
import typing
from typing import Any, Callable, Literal

import onnx_ir as ir

from onnxshrink.errors import SpecError

__all__ = [
    "option",
    "PassContext",
    "ShrinkResult",
    "ShrinkPass",
    "PassInfo",
    "register",
    "get_pass",
    "all_passes",
    "suggest",
]

logger = logging.getLogger(__name__)


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """Declare one pass option: a dataclass field with a default and help text."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass
class PassContext:
    """What the pipeline hands each pass: data, run-time helpers, callbacks. Passes never do I/O.

    Attributes:
        data: calibration/validation data (:class:`onnxshrink.calib.Dataset`) or None.
        input_shapes: user-given shapes for dynamic inputs, ``{name: [dims]}``.
        progress: optional callback ``progress(label, done, total)`` for long work.
        cache: a dict passes may use to share expensive results within one run. The pipeline sets
            ``shapes_current`` when value shapes were just inferred and clears it after a pass that
            modified the model.
        labels: ground-truth labels for the data (``--labels``), one per sample, or None.
        capture: how a pass runs the model in onnxruntime to see intermediate tensors:
            ``capture(model, names, with_outputs=False)`` → a context manager with ``run(data, ...)``
            yielding ``{name: array}`` per batch (:class:`onnxshrink.capture.ActivationCapture`).
        store: a persistent key→arrays store (:class:`onnxshrink.calib.StatsStore`) for statistics
            worth keeping between runs (calibration), or None. Passes never touch files themselves.
    """

    data: Any = None
    input_shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    progress: Callable[[str, int, int], None] | None = None
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)
    labels: Any = None
    store: Any = None
    capture: Callable[..., Any] = dataclasses.field(default_factory=lambda: _activation_capture())


def _activation_capture() -> Callable[..., Any]:
    from onnxshrink.capture import ActivationCapture

    return ActivationCapture


class ShrinkResult(ir.passes.PassResult):
    """A pass result with a stats dict (counters, declines by reason, optional details)."""

    def __init__(self, model: ir.Model, modified: bool, stats: dict[str, Any]):
        super().__init__(model, modified)
        self.stats = stats


class ShrinkPass(ir.passes.InPlacePass):
    """Base of every onnxshrink pass.

    Subclasses implement :meth:`run`, which edits the model in place and returns True if it changed
    anything. They count what they did with :meth:`count` and every refusal with :meth:`decline`.

    Class attributes:
        name: the registered name (set by :func:`register`).
        tolerance: relative-L2 error this pass may introduce on outputs; validation uses the largest
            of the pipeline's passes unless the user sets one.
        needs_data: True if the pass cannot run without ``--data``.
    """

    name: str = ""
    tolerance: float = 1e-5
    needs_data: bool = False

    def __init__(self, options: Any, context: PassContext | None = None) -> None:
        super().__init__()
        self.options = options
        self.context = context or PassContext()
        self.counters: collections.Counter[str] = collections.Counter()
        self.declines: collections.Counter[str] = collections.Counter()
        #: Optional per-item table (one dict per layer/group considered), reported as ``stats["layers"]``.
        self.layers: list[dict[str, Any]] = []
        #: Optional structured facts for the report (JSON-ready), merged into the stats as ``details``.
        self.details: dict[str, Any] = {}

    def count(self, key: str, n: int = 1) -> None:
        """Add ``n`` to counter ``key`` of this run's stats."""
        self.counters[key] += n

    def decline(self, reason: str, node: ir.Node | None = None) -> None:
        """Record that a rewrite was not applied, and why. Reasons are counted in the stats."""
        self.declines[reason] += 1
        if node is not None:
            logger.debug("%s: declined on %s (%s): %s", self.name, node.name, node.op_type, reason)

    def run(self, model: ir.Model) -> bool:  # pragma: no cover - abstract
        """Rewrite ``model`` in place; return True if it was modified."""
        raise NotImplementedError

    def call(self, model: ir.Model) -> ShrinkResult:
        self.counters.clear()
        self.declines.clear()
        self.layers = []
        self.details = {}
        modified = bool(self.run(model))
        stats = {"counters": dict(self.counters), "declines": dict(self.declines), "layers": list(self.layers),
                 **self.details}
        return ShrinkResult(model, modified, stats)

    @classmethod
    def validation_tolerance(cls, options: Any) -> float:
        """The relative-L2 tolerance this pass declares for ``options`` (default: ``cls.tolerance``)."""
        return cls.tolerance

    @classmethod
    def applicability(cls, model: ir.Model) -> str:
        """One line saying what this pass could do on ``model`` (for ``onnxshrink inspect``)."""
        return ""


@dataclasses.dataclass(frozen=True)
class PassInfo:
    """A registry entry: the pass class, its options class and ordering rules."""

    name: str
    cls: type[ShrinkPass]
    options: type
    summary: str
    must_precede: tuple[str, ...] = ()

    def option_fields(self) -> list[dataclasses.Field]:
        """The option fields in declaration order."""
        return list(dataclasses.fields(self.options))

    def option_type(self, field: dataclasses.Field) -> Any:
        """The resolved Python type of an option field."""
        hints = typing.get_type_hints(self.options)
        return hints[field.name]

    def defaults(self) -> Any:
        """An options instance with every default."""
        return self.options()


_REGISTRY: dict[str, PassInfo] = {}


def register(
    name: str,
    options: type,
    *,
    summary: str,
    must_precede: tuple[str, ...] = (),
) -> Callable[[type[ShrinkPass]], type[ShrinkPass]]:
    """Class decorator registering a pass under ``name``.

    Args:
        name: the registry name used in pass specs.
        options: a frozen dataclass of options (fields made with :func:`option`).
        summary: one-line help.
        must_precede: names of passes that, if present in a pipeline, must come after this one
            (e.g. prune must precede quant).
    """
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"options of pass {name!r} must be a dataclass")

    def deco(cls: type[ShrinkPass]) -> type[ShrinkPass]:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"pass {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = PassInfo(name, cls, options, summary, tuple(must_precede))
        return cls

    return deco


def unregister(name: str) -> None:
    """Remove a pass from the registry (for tests)."""
    _REGISTRY.pop(name, None)


def _ensure_builtin_passes() -> None:
    import onnxshrink.passes  # noqa: F401  (registers the built-in passes)


def get_pass(name: str) -> PassInfo:
    """Look up a pass by name.

    Raises:
        SpecError: unknown name, with a did-you-mean hint.
    """
    _ensure_builtin_passes()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SpecError(
            f"unknown pass {name!r}",
            hint=suggest(name, list(_REGISTRY)) or f"known passes: {', '.join(sorted(_REGISTRY))}",
        ) from None


def all_passes() -> list[PassInfo]:
    """Every registered pass, in registration order."""
    _ensure_builtin_passes()
    return list(_REGISTRY.values())


def suggest(word: str, candidates: list[str]) -> str | None:
    """A 'did you mean ...?' hint for ``word`` among ``candidates``, or None."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}?" if close else None


def literal_choices(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` option type, else None."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    return None
