"""The options of the quant pass: names, defaults, choices and help texts, checked on construction.

``bits=4`` is weights-only because no runtime here has an int4 activation kernel; ``block_size`` is a power
of two of at least 16 because MatMulNBits packs two nibbles per byte in blocks of that many K rows.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from onnxshrink.registry import option

@dataclasses.dataclass(frozen=True)
class QuantOptions:
    """Options of the quant pass."""

    mode: Literal["auto", "weights", "dynamic", "static"] = option(
        "auto", "what to quantize: auto = static with --data, weights without", choices=None)
    format: Literal["qdq", "qop"] = option("qdq", "static output form: QDQ pairs or QLinear ops")
    target: Literal["cpu", "mobile", "tensorrt"] = option(
        "cpu", "runtime whose rules the output follows (types, symmetry, placement)")
    bits: int = option(8, "weight bits: 8, or 4 (block-wise MatMul weights, weights mode)")
    block_size: int = option(32, "rows of K per scale for 4-bit MatMul weights (power of 2, >= 16)")
    per_channel: bool = option(True, "one weight scale per output channel (else per tensor)")
    reduce_range: Literal["auto", "on", "off"] = option(
        "auto", "7-bit weights for integer kernels (auto: on for cpu/mobile static/dynamic: onnxruntime's "
        "u8s8 kernels on x86 without VNNI saturate int16 sums; off for tensorrt)")
    calib: Literal["minmax", "percentile", "entropy", "mse"] = option(
        "percentile", "activation range estimator (static)")
    percentile: float = option(99.999, "percent of values the percentile range keeps")
    samples: int = option(256, "calibration samples used at most")
    cle: Literal["auto", True, False] = option(
        "auto", "cross-layer equalization of Conv→Relu/Clip→Conv chains (auto: with per-tensor weights only)")
    bias_correction: bool = option(True, "correct the output mean shift of weight rounding (static)")
    max_drop: float = option(-1.0, "accuracy budget (see metric); < 0: no fallback to float")
    metric: Literal["auto", "top1", "accuracy", "cosine", "rel_l2"] = option(
        "auto", "max_drop metric: auto = accuracy with labels, else top1 for class scores, else cosine")
    exclude: str = option("none", "node names kept float: items joined by '|' (or '+'); a glob (* ? []) "
                                  "matches the whole name, a plain item any name containing it")
    matmul_act: bool = option(True, "quantize MatMuls whose both inputs are activations (attention)")
    heads: Literal["auto", "int8", "float"] = option(
        "auto", "last weighted layers before an output (static): auto = float when the graph decodes their "
                "output with constant arithmetic (YOLO-style boxes), float = always, int8 = never kept float")

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError("bits must be 4 or 8")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a power of 2, at least 16")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError("percentile must be in (50, 100]")
        if self.samples < 1:
            raise ValueError("samples must be >= 1")
        if self.bits == 4 and self.mode not in ("weights", "auto"):
            raise ValueError("bits=4 is for mode=weights")

