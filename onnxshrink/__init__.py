"""onnxshrink: a framework-agnostic ONNX graph-rewriting optimizer.

Post-export use from any framework::

    import onnxshrink
    result = onnxshrink.optimize("model.onnx", passes="fold", data="calib.npz")
    result.save("model.small.onnx")
    print(result.report)

Data flow: load (once, into onnx_ir) → passes in place → save to a temporary file → validate against the
original in onnxruntime → move into place (atomic). The input model is never modified.
"""

from __future__ import annotations

__version__ = "0.1.0"

from onnxshrink.api import OptimizeResult, optimize  # noqa: E402
from onnxshrink.errors import (  # noqa: E402
    DataError,
    InputError,
    ModelLoadError,
    OutputPathError,
    PassFailedError,
    ShrinkError,
    SpecError,
    TargetCheckFailedError,
    UsageError,
    ValidationFailedError,
)
from onnxshrink.report import Report  # noqa: E402

__all__ = [
    "__version__",
    "optimize",
    "OptimizeResult",
    "Report",
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
