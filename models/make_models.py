"""Build onnxshrink's shared ONNX test fixtures and their data, deterministically and offline.

Run from the repository root:

    pip install torch==2.13.0
    python models/make_models.py                        # everything
    python models/make_models.py --only detector        # only the detector and its scenes
    python models/make_models.py --only classifiers     # everything but the detector

torch is needed by this script only, never by the onnxshrink package or its tests.

What it writes into ``models/``:

* data from scikit-learn's bundled ``load_digits`` (1797 8x8 images, 10 classes), scaled to [0, 1] and
  upsampled to 16x16 (nearest neighbour, in numpy), split with a seeded permutation into
  test (400), calib (256) and train (the other 1141):
  ``digits_{calib,test}.npz`` (array ``input`` [N,1,16,16]), ``digits_seq_{calib,test}.npz`` (array ``input``
  [N,16,16], the same images seen as 16 tokens of 16 features) and ``digits_{calib,test}_labels.npy`` (int64);
* ``digits_cnn.onnx``, ``digits_resnet.onnx``, ``digits_mobilenetv2.onnx``: small CNNs with *unfused*
  BatchNormalization (opset 17, input ``input`` [batch,1,16,16], output ``logits`` [batch,10]);
* ``bert_tiny.onnx``: a 2-layer BERT-style encoder with hand-written attention (input [batch,16,16]);
* ``cnn_opset11_const_if.onnx``: digits_cnn rebuilt with onnx.helper as an "old messy export" (opset 11,
  every weight a Constant node, a Shape-based Reshape instead of Flatten, and an If whose condition depends
  only on the static channel dimension of the input);
* ``digits_detector.onnx``: a YOLOv5-like detector (opset 13, input ``input`` [batch,1,64,64], output
  ``detections`` [batch,80,15] = per cell cx, cy, w, h in pixels, objectness and 10 class probabilities,
  decoded in the graph), trained on 64x64 scenes of 1-3 digits; its scenes ``detect_{calib,test}.npz``
  (array ``input``) with ground truth in ``detect_{calib,test}_gt.npz``;
* ``README.md``: sizes, op counts and onnxruntime test accuracy (detector: mAP) of every model.

Every model is checked before the README is written: onnx.checker (full_check), onnxruntime against torch
(max abs difference <= 1e-4) at batch 1 and 400, BatchNormalization nodes present and in inference form, and
the size limit. Training uses fixed seeds, one thread and deterministic algorithms, so a rerun on the same
software stack rewrites identical files.
"""

from __future__ import annotations

import collections
import hashlib
import io
import argparse
import math
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from torch import nn

OUT = Path(__file__).resolve().parent
SEED = 0
OPSET = 17
N_TEST, N_CALIB = 400, 256
MAX_BYTES = 1_000_000
TOLERANCE = 1e-4


# --------------------------------------------------------------------------------------------- data


@dataclass
class Split:
    """Images [N,1,16,16] float32 in [0, 1] and int64 labels [N]."""

    x: np.ndarray
    y: np.ndarray


def upsample2x(images: np.ndarray) -> np.ndarray:
    """Nearest-neighbour 2x upsampling of the last two axes."""
    return images.repeat(2, axis=-2).repeat(2, axis=-1)


def load_splits() -> dict[str, Split]:
    """Digits as [N,1,16,16] float32, split into test / calib / train by a seeded permutation."""
    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    x = np.ascontiguousarray(upsample2x(x), dtype=np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(y))
    parts = {
        "test": order[:N_TEST],
        "calib": order[N_TEST : N_TEST + N_CALIB],
        "train": order[N_TEST + N_CALIB :],
    }
    return {name: Split(x[idx], y[idx]) for name, idx in parts.items()}


def write_npz(path: Path, compress: bool = False, **arrays: np.ndarray) -> None:
    """Like np.savez (np.savez_compressed with ``compress``), but with fixed zip timestamps so the bytes do
    not depend on the time of the run."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = method
            zf.writestr(info, buf.getvalue())


def save_data(splits: dict[str, Split]) -> None:
    for name in ("calib", "test"):
        s = splits[name]
        write_npz(OUT / f"digits_{name}.npz", input=s.x)
        write_npz(OUT / f"digits_seq_{name}.npz", input=as_sequence(s.x))
        np.save(OUT / f"digits_{name}_labels.npy", s.y)


def as_sequence(images: np.ndarray) -> np.ndarray:
    """[N,1,16,16] images -> [N,16,16]: 16 tokens (rows), 16 features (pixels) each."""
    return np.ascontiguousarray(images[:, 0, :, :])


# ------------------------------------------------------------------------------------------- models


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """Conv (padding 'same' for odd k, no bias: BN follows) + BatchNorm."""
    return [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class DigitsCNN(nn.Module):
    """Conv3x3-BN-ReLU x3 (16/32/32) with two MaxPools, Flatten, Linear(512->64)-ReLU-Linear(64->10)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),  # 16x16 -> 8x8
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )  # fmt: skip
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        return self.fc2(torch.relu(self.fc1(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: Conv-BN-ReLU-Conv-BN + (identity | 1x1 Conv-BN) shortcut, Add, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_bn(cin, cout, 3, stride), nn.ReLU(), *conv_bn(cout, cout, 3))
        self.shortcut = (
            nn.Identity() if stride == 1 and cin == cout else nn.Sequential(*conv_bn(cin, cout, 1, stride))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ConcatBranches(nn.Module):
    """Two parallel branches (1x1 and 3x3 Conv-BN-ReLU) concatenated along channels."""

    def __init__(self, cin: int, cbranch: int) -> None:
        super().__init__()
        self.a = nn.Sequential(*conv_bn(cin, cbranch, 1), nn.ReLU())
        self.b = nn.Sequential(*conv_bn(cin, cbranch, 3), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)


class DigitsResNet(nn.Module):
    """Stem, block(16), Concat(16+16), block(32->48, stride 2, 1x1 shortcut), block(48), GAP, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, 16), nn.ReLU())
        self.layer1 = BasicBlock(16, 16)
        self.mix = ConcatBranches(16, 16)
        self.layer2 = BasicBlock(32, 48, stride=2)
        self.layer3 = BasicBlock(48, 48)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.mix(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand-BN-ReLU6, 3x3 depthwise-BN-ReLU6, 1x1 project-BN, Add if shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            *conv_bn(cin, hidden, 1), nn.ReLU6(),
            *conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(),
            *conv_bn(hidden, cout, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class DigitsMobileNetV2(nn.Module):
    """Stem Conv-BN-ReLU6, 4 inverted residual blocks, 1x1 head Conv-BN-ReLU6, GAP, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, 16), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 1, 4),
            InvertedResidual(16, 24, 2, 4),  # 16x16 -> 8x8
            InvertedResidual(24, 24, 1, 4),
            InvertedResidual(24, 32, 2, 4),  # 8x8 -> 4x4
        )
        self.head = nn.Sequential(*conv_bn(32, 64, 1), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class SelfAttention(nn.Module):
    """Multi-head self-attention written out: MatMul, Transpose, Div by sqrt(d_head), Softmax."""

    def __init__(self, d: int, heads: int, tokens: int) -> None:
        super().__init__()
        self.heads, self.d_head, self.tokens, self.d = heads, d // heads, tokens, d
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def split(self, x: torch.Tensor) -> torch.Tensor:
        # [B,T,D] -> [B,H,T,Dh]; -1 keeps the batch dynamic without a Shape subgraph.
        return x.reshape(-1, self.tokens, self.heads, self.d_head).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.d_head)
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.out(ctx.transpose(1, 2).reshape(-1, self.tokens, self.d))


class EncoderLayer(nn.Module):
    """Post-LN BERT layer: x = LN(x + Attn(x)); x = LN(x + FFN(x)), FFN = Linear-GELU-Linear."""

    def __init__(self, d: int, heads: int, tokens: int, ffn: int) -> None:
        super().__init__()
        self.attn = SelfAttention(d, heads, tokens)
        self.ln1 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))
        self.ln2 = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.ffn(x))


class DigitsBertTiny(nn.Module):
    """Token Linear(16->64) + learned positions, LayerNorm, 2 encoder layers (4 heads), mean-pool, Linear."""

    def __init__(self, tokens: int = 16, features: int = 16, d: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(features, d)
        self.pos = nn.Parameter(torch.zeros(1, tokens, d))
        nn.init.normal_(self.pos, std=0.02)
        self.ln = nn.LayerNorm(d)
        self.layers = nn.Sequential(*(EncoderLayer(d, 4, tokens, 2 * d) for _ in range(layers)))
        self.fc = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.ln(self.embed(x) + self.pos))
        return self.fc(x.mean(dim=1))


# ----------------------------------------------------------------------------------------- training


def set_determinism() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    np.random.seed(SEED)


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (zero padding): cheap augmentation."""
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, [max_shift] * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


def train(model: nn.Module, split: Split, epochs: int, lr: float, seq: bool = False) -> nn.Module:
    """Adam with a cosine learning-rate schedule, batch 64, seeded shuffling and shift augmentation."""
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    x, y = torch.from_numpy(split.x), torch.from_numpy(split.y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(y) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            xb = random_shift(x[idx], gen)
            if seq:
                xb = xb[:, 0]
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


# ------------------------------------------------------------------------------------------- export


def export(model: nn.Module, example: torch.Tensor, path: Path, fold_constants: bool = False) -> None:
    """Legacy (TorchScript) exporter, weights as initializers, dynamic batch.

    fold_constants=False keeps BatchNormalization unfused (the exporter's folding would fuse it into Conv);
    the price is that nothing else is folded either, e.g. Linear on a 3-D input stays Transpose(W) + MatMul.
    """
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter announces its retirement
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            # PRESERVE on an eval() model exports BN in inference form; EVAL when folding (torch warns otherwise).
            training=torch.onnx.TrainingMode.EVAL if fold_constants else torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=fold_constants,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    return session(path).run(["logits"], {"input": x})[0]


def op_counts(model: onnx.ModelProto) -> collections.Counter:
    """Op types over the graph and every subgraph (If branches count too)."""
    counts: collections.Counter = collections.Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return counts


def check_model(path: Path, x_test: np.ndarray, reference=None, want_bn: bool = True) -> onnx.ModelProto:
    """checker(full_check), size, BN unfused and in inference form, ORT vs reference at batch 1 and full."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    size = path.stat().st_size
    assert size < MAX_BYTES, f"{path.name}: {size} bytes"
    assert not any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    if want_bn:
        assert bns, f"{path.name}: BatchNormalization was fused away"
    for n in bns:
        training = [a.i for a in n.attribute if a.name == "training_mode"]
        assert len(n.output) == 1 and training in ([], [0]), f"{path.name}: BN {n.name} not in inference form"
    if reference is not None:
        for x in (x_test[:1], x_test):
            got = run_ort(path, x)
            want = reference(x)
            assert got.shape == (len(x), 10), got.shape
            diff = float(np.abs(got - want).max())
            assert diff <= TOLERANCE, f"{path.name}: ORT vs reference max abs diff {diff:.3g} at batch {len(x)}"
    return model


def torch_reference(model: nn.Module):
    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    return run


# ------------------------------------------------------------------------ the "old messy" opset-11 CNN


class OldGraphBuilder:
    """Tiny helper emitting nodes the way old exporters did: every tensor a Constant node."""

    def __init__(self, prefix: str = "") -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = prefix
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}{hint}_{self.count}"

    def const(self, hint: str, value: np.ndarray) -> str:
        out = self.name(hint)
        tensor = numpy_helper.from_array(np.asarray(value), name=out)
        self.nodes.append(helper.make_node("Constant", [], [out], name=f"Constant_{out}", value=tensor))
        return out

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{op_type}_{out}", **attrs))
        return out


def np_param(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float32)


def build_opset11_cnn(cnn: DigitsCNN, path: Path, else_scale: float = 2.0) -> None:
    """Rebuild DigitsCNN at opset 11 with Constant-node weights and an If-selected classifier head.

    Condition: Shape(input)[1] == 1, i.e. computed from the input's static channel dimension only, so it is
    always true and a folder can resolve it. The then-branch is the real fc2; the else-branch is fc2 scaled by
    else_scale (same argmax, different logits: taking the wrong branch is caught by a numeric check).
    """
    b = OldGraphBuilder()
    x = "input"
    convs = [m for m in cnn.features if isinstance(m, nn.Conv2d)]
    bns = [m for m in cnn.features if isinstance(m, nn.BatchNorm2d)]
    for i, (conv, bn) in enumerate(zip(convs, bns)):
        w, bias = b.const("conv_w", np_param(conv.weight)), b.const("conv_b", np_param(conv.bias))
        conv_attrs = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1], group=1)
        x = b.op("Conv", [x, w, bias], **conv_attrs)
        bn_params = ("weight", "bias", "running_mean", "running_var")
        bn_in = [x] + [b.const(f"bn_{k}", np_param(getattr(bn, k))) for k in bn_params]
        x = b.op("BatchNormalization", bn_in, epsilon=bn.eps, momentum=1.0 - bn.momentum)
        x = b.op("Relu", [x])
        if i >= 1:  # MaxPool after the 2nd and 3rd conv, as in DigitsCNN
            x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0])
    # Flatten the old way: Reshape(x, Concat(Unsqueeze(Shape(x)[0]), [-1]))
    batch = b.op("Gather", [b.op("Shape", [x]), b.const("zero", np.array(0, np.int64))], axis=0)
    minus_one = b.const("minus_one", np.array([-1], np.int64))
    shape = b.op("Concat", [b.op("Unsqueeze", [batch], axes=[0]), minus_one], axis=0)
    x = b.op("Reshape", [x, shape])
    fc1_w, fc1_b = b.const("fc1_w", np_param(cnn.fc1.weight)), b.const("fc1_b", np_param(cnn.fc1.bias))
    hidden = b.op("Relu", [b.op("Gemm", [x, fc1_w, fc1_b], alpha=1.0, beta=1.0, transB=1)], out="hidden")
    # If condition from the input's static channel dimension.
    channels = b.op("Gather", [b.op("Shape", ["input"]), b.const("one", np.array(1, np.int64))], axis=0)
    cond = b.op("Equal", [channels, b.const("one", np.array(1, np.int64))], out="is_single_channel")

    def head(branch: str, scale: float) -> onnx.GraphProto:
        g = OldGraphBuilder(prefix=f"{branch}_")
        w = g.const("fc2_w", np_param(cnn.fc2.weight) * np.float32(scale))
        bias = g.const("fc2_b", np_param(cnn.fc2.bias) * np.float32(scale))
        out = g.op("Gemm", [hidden, w, bias], out=f"{branch}_logits", alpha=1.0, beta=1.0, transB=1)
        return helper.make_graph(
            g.nodes, f"{branch}_branch", [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", 10])]
        )

    b.op("If", [cond], out="logits", then_branch=head("then", 1.0), else_branch=head("else", else_scale))
    graph = helper.make_graph(
        b.nodes,
        "torch-jit-export",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6, producer_name="onnxshrink-fixture"
    )
    onnx.save(model, str(path))


# ------------------------------------------------------------------------ the YOLO-style digits detector
#
# Scenes: 1-3 digits (the 16x16 images above, bilinearly resized to a random square of DET_SIZES pixels,
# random contrast) at random non-overlapping positions on a 64x64 canvas, light Gaussian noise, stored as
# 8-bit levels k/255. A GT box is the tight box of the digit's ink (resized pixels > DET_INK).
# Training scenes use digits of the train split only, calib scenes the calib split, test scenes the test
# split: no digit image is shared between training and the held-out scenes.

DET_CANVAS = 64
DET_MAX_OBJECTS = 3
DET_SIZES = (12, 28)  # side of the square a digit is resized to, pixels (both inclusive)
DET_STRIDES = (8, 16)
DET_ANCHORS = ((11.0, 16.0), (17.0, 24.0))  # one (w, h) anchor per scale, pixels
DET_CLASSES = 10
DET_NO = 5 + DET_CLASSES  # cx, cy, w, h, obj, 10 class probabilities
DET_NOISE = 0.04
DET_INK = 0.25
DET_N_TEST, DET_N_CALIB, DET_N_TRAIN = 300, 128, 4000  # training scenes are redrawn every epoch
DET_EPOCHS, DET_LR = 16, 3e-3
DET_OPSET = 13
DET_MAX_BYTES = 300_000


@dataclass
class Scenes:
    """Canvases [N,1,64,64] float32 in [0, 1] and padded ground truth: boxes [N,3,4] float32 (x1, y1, x2, y2
    in pixels), classes [N,3] int64 (-1 = padding), count [N] int64 (objects in image i = first count[i] rows)."""

    x: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    count: np.ndarray


def resize_bilinear(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a 2-D image to size x size (half-pixel centres, edges clamped), in numpy."""

    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
        i0 = np.floor(pos).astype(np.int64)
        return i0, np.minimum(i0 + 1, n_in - 1), (pos - i0).astype(np.float32)

    y0, y1, fy = axis(img.shape[0])
    x0, x1, fx = axis(img.shape[1])
    rows = img[y0] * (1 - fy[:, None]) + img[y1] * fy[:, None]
    return (rows[:, x0] * (1 - fx) + rows[:, x1] * fx).astype(np.float32)


def render_scenes(split: Split, n: int, rng: np.random.Generator) -> Scenes:
    """n scenes of 1..DET_MAX_OBJECTS non-overlapping digits drawn from ``split`` (rejection-sampled
    positions; a digit that finds no free place in 50 tries is left out, so a scene may hold fewer)."""
    x = np.zeros((n, 1, DET_CANVAS, DET_CANVAS), np.float32)
    boxes = np.zeros((n, DET_MAX_OBJECTS, 4), np.float32)
    classes = np.full((n, DET_MAX_OBJECTS), -1, np.int64)
    count = np.zeros(n, np.int64)
    for i in range(n):
        canvas = np.zeros((DET_CANVAS, DET_CANVAS), np.float32)
        placed: list[tuple[int, int, int]] = []
        for _ in range(int(rng.integers(1, DET_MAX_OBJECTS + 1))):
            k = int(rng.integers(len(split.y)))
            s = int(rng.integers(DET_SIZES[0], DET_SIZES[1] + 1))
            for _try in range(50):
                px, py = (int(v) for v in rng.integers(0, DET_CANVAS - s + 1, size=2))
                if all(px >= qx + qs or qx >= px + s or py >= qy + qs or qy >= py + s for qx, qy, qs in placed):
                    break
            else:
                continue
            patch = resize_bilinear(split.x[k, 0], s) * np.float32(rng.uniform(0.7, 1.0))
            ink = patch > DET_INK
            rows, cols = np.nonzero(ink.any(1))[0], np.nonzero(ink.any(0))[0]
            placed.append((px, py, s))
            canvas[py : py + s, px : px + s] = np.maximum(canvas[py : py + s, px : px + s], patch)
            j = count[i]
            boxes[i, j] = (px + cols[0], py + rows[0], px + cols[-1] + 1, py + rows[-1] + 1)
            classes[i, j] = split.y[k]
            count[i] += 1
        canvas += rng.normal(0, DET_NOISE, canvas.shape).astype(np.float32)
        x[i, 0] = np.round(np.clip(canvas, 0, 1) * 255) / np.float32(255)  # an 8-bit image
    return Scenes(x.astype(np.float32), boxes, classes, count)


def det_grids() -> list[tuple[int, int]]:
    """(rows, cols) of the cell grid of each scale."""
    return [(DET_CANVAS // s, DET_CANVAS // s) for s in DET_STRIDES]


def build_targets(sc: Scenes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-cell training targets over the cells of both scales in output order (scale, row, column).

    Each object goes to the scale whose anchor fits its (w, h) best (smallest max(r, 1/r)), to the cell
    holding its centre and, as YOLOv5 does, to the nearer horizontal and vertical neighbour cells (the
    decode reaches -0.5..1.5 cells from a cell's corner). Returns mask [N,cells], box [N,cells,4]
    (cx, cy, w, h pixels) and class [N,cells]."""
    grids = det_grids()
    offsets = np.cumsum([0] + [ny * nx for ny, nx in grids])
    n = len(sc.count)
    tmask = np.zeros((n, offsets[-1]), bool)
    tbox = np.zeros((n, offsets[-1], 4), np.float32)
    tcls = np.zeros((n, offsets[-1]), np.int64)
    anchors = np.array(DET_ANCHORS, np.float32)
    for i in range(n):
        for j in range(int(sc.count[i])):
            x1, y1, x2, y2 = sc.boxes[i, j]
            cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
            r = np.array([w, h], np.float32) / anchors
            level = int(np.argmin(np.maximum(r, 1 / r).max(1)))
            ny, nx = grids[level]
            gx, gy = cx / DET_STRIDES[level], cy / DET_STRIDES[level]
            gi, gj = int(gx), int(gy)
            cells = [(gi, gj)]
            di, dj = (-1 if gx - gi < 0.5 else 1), (-1 if gy - gj < 0.5 else 1)
            if 0 <= gi + di < nx:
                cells.append((gi + di, gj))
            if 0 <= gj + dj < ny:
                cells.append((gi, gj + dj))
            for ci, cj in cells:
                c = offsets[level] + cj * nx + ci
                tmask[i, c] = True
                tbox[i, c] = (cx, cy, w, h)
                tcls[i, c] = sc.classes[i, j]
    return tmask, tbox, tcls


def conv_bn_silu(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    """YOLOv5's Conv: Conv (no bias) + BatchNorm + SiLU (exported as Sigmoid and Mul)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class DigitsDetector(nn.Module):
    """YOLOv5-like detector for 64x64 scenes: Conv-BN-SiLU backbone to stride 8 (C3, 32 ch) and 16 (C4, 40 ch),
    a one-step FPN neck (1x1 Conv of C4, nearest Upsample x2, Concat with C3, 3x3 Conv -> P3), 1x1 head Convs
    with 15 outputs per cell (one anchor) on P3 and C4, and YOLOv5's decode in the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            conv_bn_silu(1, 8), conv_bn_silu(8, 16, stride=2),  # 64 -> 32
            conv_bn_silu(16, 24, stride=2), conv_bn_silu(24, 24),  # 32 -> 16
            conv_bn_silu(24, 32, stride=2), conv_bn_silu(32, 32),  # 16 -> 8: C3
        )  # fmt: skip
        self.down = nn.Sequential(conv_bn_silu(32, 40, stride=2), conv_bn_silu(40, 40))  # 8 -> 4: C4
        self.lateral = conv_bn_silu(40, 16, k=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = conv_bn_silu(16 + 32, 32)
        self.heads = nn.ModuleList([nn.Conv2d(32, DET_NO, 1), nn.Conv2d(40, DET_NO, 1)])
        for i, (ny, nx) in enumerate(det_grids()):
            yv, xv = torch.meshgrid(torch.arange(ny, dtype=torch.float32), torch.arange(nx, dtype=torch.float32),
                                    indexing="ij")
            # YOLOv5 bakes the -0.5 of its xy decode into the grid buffer
            self.register_buffer(f"grid{i}", (torch.stack((xv, yv), 2) - 0.5).view(1, 1, ny, nx, 2))
            self.register_buffer(f"anchor_grid{i}", torch.tensor(DET_ANCHORS[i]).view(1, 1, 1, 1, 2))
        with torch.no_grad():  # YOLOv5's head bias priors: objectness ~ 0.01, classes ~ 0.1
            for head in self.heads:
                head.bias[4] = math.log(0.01 / 0.99)
                head.bias[5:] = math.log(0.1 / 0.9)

    def raw(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Head logits per scale, [N, 1, ny, nx, 15] (YOLOv5's view + permute)."""
        c3 = self.backbone(x)
        c4 = self.down(c3)
        p3 = self.fuse(torch.cat([self.up(self.lateral(c4)), c3], 1))
        return [
            head(f).view(-1, 1, DET_NO, ny, nx).permute(0, 1, 3, 4, 2)
            for head, f, (ny, nx) in zip(self.heads, (p3, c4), det_grids())
        ]

    def decode(self, p: torch.Tensor, i: int) -> torch.Tensor:
        """YOLOv5's decode: sigmoid; xy = (2s + grid - 0.5) * stride; wh = (2s)^2 * anchor; [N, cells, 15]."""
        ny, nx = det_grids()[i]
        xy, wh, conf = p.sigmoid().split((2, 2, DET_NO - 4), 4)
        xy = (xy * 2 + getattr(self, f"grid{i}")) * DET_STRIDES[i]
        wh = (wh * 2) ** 2 * getattr(self, f"anchor_grid{i}")
        return torch.cat((xy, wh, conf), 4).view(-1, ny * nx, DET_NO)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.decode(p, i) for i, p in enumerate(self.raw(x))], 1)


def giou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(GIoU, IoU) of cx, cy, w, h boxes [..., 4]."""
    a1, a2 = a[..., :2] - a[..., 2:] / 2, a[..., :2] + a[..., 2:] / 2
    b1, b2 = b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2
    inter = (torch.min(a2, b2) - torch.max(a1, b1)).clamp(min=0).prod(-1)
    union = a[..., 2:].prod(-1) + b[..., 2:].prod(-1) - inter + 1e-7
    hull = (torch.max(a2, b2) - torch.min(a1, b1)).prod(-1) + 1e-7
    iou = inter / union
    return iou - (hull - union) / hull, iou


def detector_loss(model: DigitsDetector, x: torch.Tensor, tmask: torch.Tensor, tbox: torch.Tensor,
                  tcls: torch.Tensor) -> torch.Tensor:
    """YOLOv5-style loss: 2 * (1 - GIoU) on assigned cells + 5 * objectness BCE over all cells (target: the
    detached IoU on assigned cells, 0 elsewhere) + class BCE summed over the 10 classes of assigned cells."""
    raws = model.raw(x)
    logits = torch.cat([p.reshape(len(x), -1, DET_NO) for p in raws], 1)
    boxes = torch.cat([model.decode(p, i) for i, p in enumerate(raws)], 1)[..., :4]
    g, iou = giou(boxes[tmask], tbox[tmask])
    tobj = torch.zeros_like(logits[..., 4])
    tobj[tmask] = iou.detach().clamp(0)
    lobj = nn.functional.binary_cross_entropy_with_logits(logits[..., 4], tobj)
    onehot = nn.functional.one_hot(tcls[tmask], DET_CLASSES).float()
    lcls = nn.functional.binary_cross_entropy_with_logits(logits[..., 5:][tmask], onehot, reduction="sum")
    return 2.0 * (1 - g).mean() + 5.0 * lobj + lcls / max(1, int(tmask.sum()))


def train_detector(train_split: Split) -> DigitsDetector:
    """Adam, one-cycle schedule, batch 64, DET_EPOCHS epochs of DET_N_TRAIN fresh scenes each (seeded)."""
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    rng = np.random.default_rng([SEED, 1])
    model = DigitsDetector()
    opt = torch.optim.Adam(model.parameters(), lr=DET_LR)
    steps_per_epoch = math.ceil(DET_N_TRAIN / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=DET_LR, total_steps=DET_EPOCHS * steps_per_epoch)
    for epoch in range(DET_EPOCHS):
        scenes = render_scenes(train_split, DET_N_TRAIN, rng)
        x = torch.from_numpy(scenes.x)
        tmask, tbox, tcls = (torch.from_numpy(a) for a in build_targets(scenes))
        model.train()
        perm = torch.randperm(DET_N_TRAIN, generator=gen)
        total = 0.0
        for i in range(0, DET_N_TRAIN, 64):
            idx = perm[i : i + 64]
            loss = detector_loss(model, x[idx], tmask[idx], tbox[idx], tcls[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(f"detector epoch {epoch + 1}/{DET_EPOCHS}: loss {total / steps_per_epoch:.4f}", flush=True)
    return model.eval()


def export_detector(model: DigitsDetector, example: torch.Tensor, path: Path) -> None:
    """Legacy exporter as for the CNNs (BN unfused, weights as initializers, dynamic batch), opset 13,
    output ``detections`` [batch, 80, 15]."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=DET_OPSET,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            input_names=["input"],
            output_names=["detections"],
            dynamic_axes={"input": {0: "batch"}, "detections": {0: "batch"}},
        )


def check_detector(path: Path, x_test: np.ndarray, model: DigitsDetector) -> onnx.ModelProto:
    """checker(full_check), size, BN unfused in inference form, SiLU as Sigmoid*Mul, ORT vs torch."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    size = path.stat().st_size
    assert size < DET_MAX_BYTES, f"{path.name}: {size} bytes"
    counts = op_counts(proto)
    assert counts["BatchNormalization"] and counts["Sigmoid"] and counts["Pow"], counts
    assert not counts.get("HardSwish") and not counts.get("Silu"), counts
    cells = sum(ny * nx for ny, nx in det_grids())
    for x in (x_test[:1], x_test):
        got = session(path).run(["detections"], {"input": x})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        assert got.shape == (len(x), cells, DET_NO), got.shape
        diff = float(np.abs(got - want).max())  # boxes are in pixels (0..~100): same 1e-4 as the CNNs
        assert diff <= TOLERANCE, f"{path.name}: ORT vs torch max abs diff {diff:.3g} at batch {len(x)}"
    return proto


def detector_eval(path: Path, scenes: Scenes) -> dict:
    """fp32 detection metrics of the ONNX file in onnxruntime (benchmarks/detect_eval.py)."""
    sys.path.insert(0, str(OUT.parent / "benchmarks"))
    import detect_eval  # torch-free; shared with the benchmark and the tests

    pred = session(path).run(["detections"], {"input": scenes.x})[0]
    gt = {"boxes": scenes.boxes, "classes": scenes.classes, "count": scenes.count}
    return detect_eval.evaluate(pred, gt)


def save_scenes(name: str, scenes: Scenes) -> list[Path]:
    """``detect_<name>.npz`` (``input`` only, so it is a valid ``--data`` file) and ``detect_<name>_gt.npz``."""
    data, gt = OUT / f"detect_{name}.npz", OUT / f"detect_{name}_gt.npz"
    write_npz(data, compress=True, input=scenes.x)
    write_npz(gt, compress=True, boxes=scenes.boxes, classes=scenes.classes, count=scenes.count)
    return [data, gt]


def detector_readme(proto: onnx.ModelProto, path: Path, metrics: dict, files: list[Path],
                    scenes: dict[str, Scenes]) -> list[str]:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(op_counts(proto).items()))
    params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    cells = sum(ny * nx for ny, nx in det_grids())
    objects = {k: int(v.count.sum()) for k, v in scenes.items()}
    lines = [
        DET_README_HEADING,
        "",
        "Built alone with `python models/make_models.py --only detector` (rewrites only the files of this",
        "section and this section of the README). Its evaluator is `benchmarks/detect_eval.py` (numpy).",
        "",
        "### Data: digit scenes",
        "",
        f"{DET_CANVAS}x{DET_CANVAS} grayscale canvases with 1-{DET_MAX_OBJECTS} digits each: "
        "a 16x16 digit image from the",
        f"split above, resized (bilinear, numpy) to a random square of {DET_SIZES[0]}-{DET_SIZES[1]} pixels, contrast",
        "x U(0.7, 1), pasted at a random position where its square overlaps no other digit's square; then",
        f"Gaussian noise (std {DET_NOISE}), clipped to [0, 1] and rounded to 8-bit levels k/255. "
        "A box is the tight box",
        f"of the digit's ink (resized pixels > {DET_INK}). "
        f"Training scenes ({DET_N_TRAIN} fresh ones per epoch) use only",
        "the train split's digits, calib scenes only the calib split's, test scenes only the test split's, so",
        "no digit image of the held-out scenes was seen in training.",
        "",
        "| file | content | bytes |",
        "|---|---|---|",
    ]
    content = {
        "detect_calib.npz": f"array `input` float32 [{DET_N_CALIB},1,{DET_CANVAS},{DET_CANVAS}] (a `--data` file)",
        "detect_calib_gt.npz": f"ground truth of the calib scenes ({objects['calib']} objects), as below",
        "detect_test.npz": f"array `input` float32 [{DET_N_TEST},1,{DET_CANVAS},{DET_CANVAS}] (a `--data` file)",
        "detect_test_gt.npz": f"ground truth of the test scenes ({objects['test']} objects): `boxes` float32 "
                              f"[N,{DET_MAX_OBJECTS},4] x1,y1,x2,y2 in pixels, `classes` int64 [N,{DET_MAX_OBJECTS}] "
                              "(-1 = padding), `count` int64 [N] (the first count[i] rows are real)",
    }
    lines += [f"| `{p.name}` | {content[p.name]} | {p.stat().st_size} |" for p in files]
    lines += [
        "",
        "The ground truth is in separate `_gt.npz` files because `--data` refuses arrays that are not model",
        "inputs. The npz files are deflate-compressed (8-bit levels compress well); numpy reads them as usual.",
        "",
        "### digits_detector.onnx",
        "",
        f"YOLOv5-like, {params:,} parameters, opset {DET_OPSET}, {path.stat().st_size} bytes. Input `input` float32",
        f"[batch,1,{DET_CANVAS},{DET_CANVAS}]; output `detections` float32 [batch,{cells},{DET_NO}]: one row per cell",
        f"({DET_CANVAS // DET_STRIDES[0]}x{DET_CANVAS // DET_STRIDES[0]} cells at stride {DET_STRIDES[0]}, then "
        f"{DET_CANVAS // DET_STRIDES[1]}x{DET_CANVAS // DET_STRIDES[1]} at stride {DET_STRIDES[1]}, row-major),",
        "columns `cx, cy, w, h` in **pixels** (0..~100), `obj` and 10 class probabilities in **0..1** — the",
        "mixed-range output of real YOLO exports.",
        "",
        "- Backbone: Conv-BN-SiLU (BN unfused; SiLU exported as `Sigmoid` + `Mul`) 1->8, 8->16 /2, 16->24 /2,",
        "  24->24, 24->32 /2, 32->32 (C3, stride 8), 32->40 /2, 40->40 (C4, stride 16).",
        "- Neck: 1x1 Conv-BN-SiLU 40->16 on C4, nearest `Resize` x2, `Concat` with C3, 3x3 Conv-BN-SiLU 48->32 (P3).",
        "- Heads: 1x1 Conv 32->15 on P3 and 40->15 on C4 (with bias), one anchor per cell:",
        f"  {DET_ANCHORS[0][0]:g}x{DET_ANCHORS[0][1]:g} at stride {DET_STRIDES[0]}, "
        f"{DET_ANCHORS[1][0]:g}x{DET_ANCHORS[1][1]:g} at stride {DET_STRIDES[1]} (w x h pixels).",
        "- Decode in the graph, per scale as YOLOv5's `Detect`: `Reshape` [N,1,15,ny,nx], `Transpose` to",
        "  [N,1,ny,nx,15], `Sigmoid`, `Split` (2,2,11); `xy = (2s + grid) * stride` (grid initializer holds",
        "  cell - 0.5), `wh = Pow(2s, 2) * anchor`; `Concat` (xy, wh, conf) on the last axis, `Reshape`",
        "  [N,cells,15]; then `Concat` of the two scales on axis 1.",
        f"- Training: {DET_EPOCHS} epochs x {DET_N_TRAIN} fresh scenes, Adam (one-cycle, max lr {DET_LR:g}), batch 64;",
        "  each object is assigned to the scale whose anchor fits it best, to its centre cell and the nearer",
        "  horizontal and vertical neighbours (YOLOv5's rule); loss 2·(1 − GIoU) + 5·BCE(obj, target IoU) +",
        "  class BCE. Seeded, one thread, deterministic algorithms.",
        "",
        f"Held-out quality (fp32, onnxruntime CPU, {DET_N_TEST} test scenes, {objects['test']} objects; "
        "confidence = obj ·",
        "max class probability >= 0.001, class-wise NMS at IoU 0.5, all-point AP over the 10 classes):",
        "",
        "| mAP@0.5 | mAP@0.5:0.95 | mean IoU of TPs | recall@0.5 (all) | P / R / F1 at conf >= 0.25 |",
        "|---:|---:|---:|---:|---:|",
        f"| {metrics['map50']:.4f} | {metrics['map50_95']:.4f} | {metrics['mean_iou']:.4f} | "
        f"{metrics['recall50']:.4f} | {metrics['precision']:.4f} / {metrics['recall']:.4f} / {metrics['f1']:.4f} |",
        "",
        f"Op counts: {counts}.",
        "",
    ]
    return lines


DET_README_HEADING = "## Detector fixture: digits_detector.onnx"


def update_readme_detector(lines: list[str]) -> None:
    """Replace (or append) the detector section at the end of models/README.md, leaving the rest as is."""
    readme = OUT / "README.md"
    text = readme.read_text()
    head = text.split("\n" + DET_README_HEADING)[0].rstrip("\n")
    readme.write_text(head + "\n\n" + "\n".join(lines))


def build_detector(splits: dict[str, Split]) -> None:
    """Train, export, check and describe digits_detector.onnx; write its scene data."""
    t0 = time.perf_counter()
    scenes = {
        "calib": render_scenes(splits["calib"], DET_N_CALIB, np.random.default_rng([SEED, 2])),
        "test": render_scenes(splits["test"], DET_N_TEST, np.random.default_rng([SEED, 3])),
    }
    files = [f for name in ("calib", "test") for f in save_scenes(name, scenes[name])]
    model = train_detector(splits["train"])
    path = OUT / "digits_detector.onnx"
    export_detector(model, torch.from_numpy(scenes["test"].x[:2]), path)
    proto = check_detector(path, scenes["test"].x, model)
    metrics = detector_eval(path, scenes["test"])
    print(f"{path.name}: {path.stat().st_size} bytes, opset {DET_OPSET}, test mAP@0.5 {metrics['map50']:.4f}, "
          f"mAP@0.5:0.95 {metrics['map50_95']:.4f}, mean IoU {metrics['mean_iou']:.4f} "
          f"({time.perf_counter() - t0:.0f} s)")
    update_readme_detector(detector_readme(proto, path, metrics, files, scenes))
    for p in files + [path]:
        print(f"{p.name}: {p.stat().st_size} bytes, sha256 {hashlib.sha256(p.read_bytes()).hexdigest()[:16]}")


# --------------------------------------------------------------------------------------------- main


@dataclass
class Entry:
    file: str
    what: str
    input: str
    counts: collections.Counter
    size: int
    accuracy: float
    opset: int


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    return float((run_ort(path, x).argmax(axis=1) == y).mean())


def describe(path: Path, model: onnx.ModelProto, what: str, input_desc: str, x: np.ndarray, y: np.ndarray) -> Entry:
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    entry = Entry(path.name, what, input_desc, op_counts(model), path.stat().st_size, accuracy(path, x, y), opset)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(entry.counts.items()))
    print(f"{entry.file}: {entry.size} bytes, opset {opset}, test top-1 {entry.accuracy:.4f}\n    {counts}")
    return entry


def write_readme(entries: list[Entry], data_files: list[Path]) -> None:
    lines = [
        "# models/ — shared fixtures",
        "",
        "Small models and labeled data the project builds itself, so tests and benchmarks measure real accuracy",
        "offline. Everything here is written by `make_models.py` (the numbers below are the ones it prints);",
        "regenerate with:",
        "",
        "    pip install torch==2.13.0 && python models/make_models.py",
        "",
        "torch is needed by that script only. Training is seeded, single-threaded and deterministic, so a rerun",
        "on the same software stack rewrites the same files.",
        "",
        "## Data",
        "",
        "scikit-learn's bundled `load_digits` (1797 8x8 images, 10 classes), scaled by 1/16 to [0, 1], upsampled",
        "to 16x16 by nearest neighbour (in numpy), split by `numpy.random.default_rng(0).permutation`: test = first",
        f"{N_TEST}, calib = next {N_CALIB}, train = the other {1797 - N_TEST - N_CALIB} (train is not saved).",
        "",
        "| file | content | bytes |",
        "|---|---|---|",
    ]
    content = {
        "digits_calib.npz": f"array `input` float32 [{N_CALIB},1,16,16]",
        "digits_test.npz": f"array `input` float32 [{N_TEST},1,16,16]",
        "digits_seq_calib.npz": f"array `input` float32 [{N_CALIB},16,16] (same images, rows as tokens)",
        "digits_seq_test.npz": f"array `input` float32 [{N_TEST},16,16] (same images, rows as tokens)",
        "digits_calib_labels.npy": f"int64 [{N_CALIB}], labels of both calib sets",
        "digits_test_labels.npy": f"int64 [{N_TEST}], labels of both test sets",
    }
    lines += [f"| `{p.name}` | {content[p.name]} | {p.stat().st_size} |" for p in data_files]
    lines += [
        "",
        "## Models",
        "",
        "All take `input` float32 with a dynamic batch axis named `batch` and return `logits` float32 [batch,10].",
        "Accuracy is fp32 top-1 on `digits_test.npz` (or `digits_seq_test.npz`) with onnxruntime (CPU).",
        "Each is a single file (no external data) with weights as initializers, except the opset-11 model, and is",
        "checked by the script: onnx.checker full_check, onnxruntime vs torch max abs diff <= 1e-4 at batch 1",
        "and 400.",
        "",
        "| file | input | opset | bytes | test top-1 |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| `{e.file}` | {e.input} | {e.opset} | {e.size} | {e.accuracy:.4f} |" for e in entries]
    lines.append("")
    for e in entries:
        lines += [f"### {e.file}", "", e.what, "", "Op counts (subgraphs included): "]
        lines[-1] += ", ".join(f"{k} {v}" for k, v in sorted(e.counts.items())) + "."
        lines.append("")
    (OUT / "README.md").write_text("\n".join(lines))


def build_classifiers(splits: dict[str, Split]) -> None:
    """The digits data, the four classifiers, the opset-11 CNN and the README (its detector section kept)."""
    save_data(splits)
    test, train_split = splits["test"], splits["train"]
    x_seq = as_sequence(test.x)
    image_input = "float32 [batch,1,16,16]"
    entries: list[Entry] = []

    cnns = [
        (
            "digits_cnn.onnx",
            DigitsCNN,
            20,
            "Plain CNN: 3x (Conv3x3-BN-ReLU) with 16/32/32 channels and a MaxPool after the 2nd and 3rd, "
            "Flatten, Gemm(512->64)-ReLU-Gemm(64->10). BatchNormalization left unfused.",
        ),
        (
            "digits_resnet.onnx",
            DigitsResNet,
            20,
            "ResNet-style: stem Conv-BN-ReLU (16), basic block 16 (identity shortcut), Concat of a 1x1 and a 3x3 "
            "Conv-BN-ReLU branch (16+16), basic block 32->48 stride 2 (1x1 Conv-BN shortcut), basic block 48 "
            "(identity), GlobalAveragePool, Flatten, Gemm(48->10). BatchNormalization left unfused. Note: the two "
            "BN biases in front of the stride-2 block's Add get identical gradients, so they train to bitwise-equal "
            "values; the exporter deduplicates them, so one BN's bias is `Identity(layer2.body.4.bias)` rather "
            "than an initializer.",
        ),
        (
            "digits_mobilenetv2.onnx",
            DigitsMobileNetV2,
            25,
            "MobileNetV2-style: stem Conv-BN-ReLU6 (16), inverted residual blocks (expand 4) 16->16 (Add), "
            "16->24 stride 2, 24->24 (Add), 24->32 stride 2, each 1x1 expand-BN-ReLU6, 3x3 depthwise-BN-ReLU6, "
            "1x1 project-BN; head 1x1 Conv-BN-ReLU6 (64), GlobalAveragePool, Flatten, Gemm(64->10). ReLU6 is "
            "Clip(0, 6) with Constant min/max. BatchNormalization left unfused.",
        ),
    ]
    trained: dict[str, nn.Module] = {}
    for fname, cls, epochs, what in cnns:
        torch.manual_seed(SEED)
        model = train(cls(), train_split, epochs=epochs, lr=3e-3)
        path = OUT / fname
        export(model, torch.from_numpy(test.x[:2]), path)
        proto = check_model(path, test.x, torch_reference(model))
        entries.append(describe(path, proto, what, image_input, test.x, test.y))
        trained[fname] = model

    torch.manual_seed(SEED)
    bert = train(DigitsBertTiny(), train_split, epochs=60, lr=2e-3, seq=True)
    path = OUT / "bert_tiny.onnx"
    export(bert, torch.from_numpy(x_seq[:2]), path, fold_constants=True)  # no BN; MatMul weights pre-transposed
    proto = check_model(path, x_seq, torch_reference(bert), want_bn=False)
    what = (
        "BERT-style encoder over the image rows (16 tokens x 16 features): token MatMul(16->64) + learned "
        "position embedding, LayerNormalization, 2 post-LN encoder layers (self-attention with 4 heads written "
        "out as MatMul/Transpose/Div/Softmax, Q/K/V/out projections as MatMul+Add, GELU FFN 64->128->64 "
        "exported as Erf arithmetic), mean over tokens (ReduceMean), Gemm(64->10). Exported with the exporter's "
        "constant folding on (there is no BN to keep), so each MatMul weight is a pre-transposed initializer "
        "named `onnx::MatMul_<n>`; reshape shapes and scalars are Constant nodes."
    )
    entries.append(describe(path, proto, what, "float32 [batch,16,16]", x_seq, test.y))

    path = OUT / "cnn_opset11_const_if.onnx"
    build_opset11_cnn(trained["digits_cnn.onnx"], path)
    cnn_onnx = OUT / "digits_cnn.onnx"
    proto = check_model(path, test.x, lambda x: run_ort(cnn_onnx, x))
    assert not proto.graph.initializer, "opset-11 model must have no initializers"
    what = (
        "The trained digits_cnn rebuilt with onnx.helper as an old, messy export: opset 11, IR version 6, "
        "no initializers (every weight a Constant node, also inside the If branches), BatchNormalization "
        "unfused, Flatten written as Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])), and the last "
        "Gemm inside an If whose condition is `Gather(Shape(input), 1) == 1` (input-independent: the channel "
        "axis is static, so always true). then-branch: the real Gemm(64->10); else-branch: the same Gemm with "
        "weights and bias scaled by 2 (same argmax, different logits). Output equals digits_cnn.onnx."
    )
    entries.append(describe(path, proto, what, image_input, test.x, test.y))

    data_files = sorted(OUT.glob("digits_*.np[yz]"))
    readme = OUT / "README.md"
    old_parts = (readme.read_text() if readme.exists() else "").split("\n" + DET_README_HEADING, 1)
    write_readme(entries, data_files)
    if len(old_parts) == 2:  # keep the detector's section when only the classifiers are rebuilt
        update_readme_detector((DET_README_HEADING + old_parts[1]).split("\n"))
    for p in data_files + [OUT / e.file for e in entries]:
        print(f"{p.name}: {p.stat().st_size} bytes, sha256 {hashlib.sha256(p.read_bytes()).hexdigest()[:16]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the fixtures in models/ (see the module docstring).")
    ap.add_argument("--only", choices=("classifiers", "detector"),
                    help="build only the digits classifiers (and their data) or only the detector (and its scenes)")
    args = ap.parse_args(argv)
    set_determinism()
    splits = load_splits()
    if args.only in (None, "classifiers"):
        build_classifiers(splits)
    if args.only in (None, "detector"):
        build_detector(splits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
