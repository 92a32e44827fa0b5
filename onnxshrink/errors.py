"""Error types of onnxshrink.

Every error a user can cause is a :class:`ShrinkError` carrying *what* went wrong, *where* (pass, node,
tensor, option) and a *hint*. The CLI renders them as ``error: ...`` / ``hint: ...`` on stderr and exits
with the class's exit code, which is a contract:

* 0 — success
* 1 — failure (a pass failed, an internal error)
* 2 — bad usage or bad input (model, data, spec, output path)
* 3 — validation failed (the optimized model does not match the original within tolerance)
"""

from __future__ import annotations

__all__ = [
    "ShrinkError",
    "UsageError",
    "SpecError",
    "InputError",
    "ModelLoadError",
    "DataError",
    "OutputPathError",
    "PassFailedError",
    "ValidationFailedError",
    "TargetCheckFailedError",
]


class ShrinkError(Exception):
    """Base class of all onnxshrink errors.

    Args:
        message: what went wrong, one line.
        hint: what the user can do about it, one line (optional).
        pass_name, node, tensor, option: where it happened (optional).
    """

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        pass_name: str | None = None,
        node: str | None = None,
        tensor: str | None = None,
        option: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.pass_name = pass_name
        self.node = node
        self.tensor = tensor
        self.option = option

    def where(self) -> str:
        """Return a short 'pass X, node Y' location string, or '' if none is known."""
        parts = []
        if self.pass_name:
            parts.append(f"pass {self.pass_name!r}")
        if self.node:
            parts.append(f"node {self.node!r}")
        if self.tensor:
            parts.append(f"tensor {self.tensor!r}")
        if self.option:
            parts.append(f"option {self.option!r}")
        return ", ".join(parts)

    def __str__(self) -> str:
        loc = self.where()
        return f"{self.message} ({loc})" if loc else self.message


class UsageError(ShrinkError):
    """Bad command-line usage or API arguments (exit 2)."""

    exit_code = 2


class SpecError(UsageError):
    """A pass spec that does not parse, names an unknown pass/option, or breaks an order rule (exit 2)."""


class InputError(ShrinkError):
    """Bad input: model or data that cannot be used (exit 2)."""

    exit_code = 2


class ModelLoadError(InputError):
    """The model file is missing, not ONNX, corrupt, invalid, or its external data is missing (exit 2)."""


class DataError(InputError):
    """Input data whose names, shapes, dtypes or values do not fit the model (exit 2)."""


class OutputPathError(UsageError):
    """The output path is the input path, or cannot be written (exit 2)."""


class PassFailedError(ShrinkError):
    """A pass raised an unexpected error (exit 1)."""

    exit_code = 1


class ValidationFailedError(ShrinkError):
    """The optimized model's outputs differ from the original beyond tolerance (exit 3)."""

    exit_code = 3


class TargetCheckFailedError(ShrinkError):
    """The optimized model breaks a rule of the requested deploy target (``--target``) (exit 1)."""

    exit_code = 1
