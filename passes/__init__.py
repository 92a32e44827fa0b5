"""Built-in passes of onnxshrink, installed as ``onnxshrink.passes``.

Each module holds one pass and registers it under one name; importing this package registers them all,
in the order ``onnxshrink passes`` lists them.
"""

from onnxshrink.passes import fold  # noqa: F401
from onnxshrink.passes import prune  # noqa: F401
from onnxshrink.passes import lowrank  # noqa: F401
from onnxshrink.passes import quant  # noqa: F401

__all__ = ["fold", "prune", "lowrank", "quant"]
