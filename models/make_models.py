"""Build onnxshrink's shared ONNX test fixtures and their data, deterministically and offline.

Run from the repository root:

    pip install torch==2.13.0
    python models/make_models.py

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
* ``README.md``: sizes, op counts and onnxruntime test accuracy of every model.

Every model is checked before the README is written: onnx.checker (full_check), onnxruntime against torch
(max abs difference <= 1e-4) at batch 1 and 400, BatchNormalization nodes present and in inference form, and
the size limit. Training uses fixed seeds, one thread and deterministic algorithms, so a rerun on the same
software stack rewrites identical files.
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import sys
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


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like np.savez, but with fixed zip timestamps so the bytes do not depend on the time of the run."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
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


def main() -> int:
    set_determinism()
    splits = load_splits()
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
    write_readme(entries, data_files)
    for p in data_files + [OUT / e.file for e in entries]:
        print(f"{p.name}: {p.stat().st_size} bytes, sha256 {hashlib.sha256(p.read_bytes()).hexdigest()[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
