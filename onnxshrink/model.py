"""Loading, saving and measuring models.

A model is loaded once into an :class:`onnx_ir.Model` (weights of external-data models stay memory-mapped),
kept through every pass and saved once. Saving is atomic: the model (and its external-data file, if any) is
written into a temporary folder beside the destination and then renamed into place, so a failed or
interrupted save never leaves a half-written file and never touches the input.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np
import onnx
import onnx_ir as ir

from onnxshrink.errors import ModelLoadError, OutputPathError

__all__ = [
    "ModelSource",
    "load_model",
    "save_model",
    "check_output_path",
    "external_data_files",
    "ModelStats",
    "model_stats",
    "iter_graphs",
    "iter_nodes",
    "constant_tensors",
    "EXTERNAL_DATA_THRESHOLD",
    "Annotations",
    "snapshot_annotations",
    "strip_added_annotations",
    "infer_shapes",
    "unique_name",
    "constant_value",
]

logger = logging.getLogger(__name__)

#: Models whose weights exceed this many bytes are saved with external data (protobuf's 2 GiB limit).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto, ir.Model]


def _check_external_data(model: ir.Model, where: str) -> None:
    """Raise ModelLoadError if an external tensor's file is missing or too short."""
    for graph in iter_graphs(model):
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                path = Path(tensor.base_dir) / tensor.location
                if not path.is_file():
                    raise ModelLoadError(
                        f"external data file {tensor.location!r} of {where} is missing",
                        tensor=value.name,
                        hint=f"put {tensor.location!r} next to the model (looked in {tensor.base_dir})",
                    )
                needed = (tensor.offset or 0) + (tensor.length if tensor.length is not None else 0)
                if path.stat().st_size < needed:
                    raise ModelLoadError(
                        f"external data file {tensor.location!r} of {where} is truncated "
                        f"({path.stat().st_size} bytes, tensor needs up to byte {needed})",
                        tensor=value.name,
                        hint="the data file is incomplete; copy it again from the source",
                    )


def _one_line(text: str, limit: int = 300) -> str:
    """Collapse a multi-line library message into one line."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _checker_hint(message: str) -> str:
    """A hint for the checker's most common complaints."""
    if "topologically sorted" in message:
        return "the graph has a cycle or nodes out of order; re-export it (onnx graphs must be acyclic and sorted)"
    if "single static assignment" in message:
        return "two nodes write the same tensor name; re-export it or rename one output"
    if "No opset import for domain" in message:
        return "the model uses a domain it does not import; add an opset_import entry for it or re-export"
    if "No Op registered for" in message or "No schema registered" in message:
        return "the op is not part of ONNX at this opset (a custom op needs its own domain); re-export it"
    if "ir_version" in message and "higher" in message:
        return f"the model was saved by a newer onnx; upgrade onnx (installed: {onnx.__version__})"
    return "fix the exporter output, or check it with `python -m onnx.checker`"


def _check_graph(proto_or_path: onnx.ModelProto | str, where: str) -> None:
    try:
        onnx.checker.check_model(proto_or_path)
    except onnx.checker.ValidationError as e:
        first = _one_line(e) if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{where} is not a valid ONNX graph: {first}", hint=_checker_hint(str(e))) from e
    except Exception as e:  # checker may raise other errors for unknown opsets etc.
        first = _one_line(e) if str(e).strip() else type(e).__name__
        hint = _checker_hint(str(e))
        if hint == _checker_hint(""):
            hint = "is the onnx package too old?"
        raise ModelLoadError(f"{where} cannot be checked: {first}", hint=hint) from e


def _check_opsets(proto: onnx.ModelProto, where: str) -> None:
    """Refuse a default-domain opset newer than the installed onnx knows: its ops' meaning is unknown here."""
    newest = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise ModelLoadError(
                f"{where} uses opset {opset.version}, newer than the installed onnx {onnx.__version__} knows ({newest})",
                hint="upgrade onnx (and onnxruntime), or export the model with an older opset",
            )


#: Leading bytes of files people mistake for ONNX models, and what they are.
_MAGICS = (
    (0, b"PK\x03\x04", "a zip archive (a PyTorch checkpoint or .pt file?)",
     "export it to ONNX first (e.g. torch.onnx.export)"),
    (0, b"\x1f\x8b", "gzip-compressed", "decompress it first (gunzip)"),
    (4, b"ORTM", "an ONNX Runtime (ORT-format) model", "give the .onnx model it was converted from"),
    (4, b"TFL3", "a TensorFlow Lite model", "convert it to ONNX first (e.g. tf2onnx)"),
    (0, b"\x89HDF", "an HDF5 file (a Keras model?)", "convert it to ONNX first (e.g. tf2onnx)"),
    (0, b"\x80\x02", "a Python pickle", "export the model to ONNX first"),
    (0, b"{", "a JSON/text file", "give the .onnx file"),
)


def _sniff_format(path: Path) -> tuple[str, str] | None:
    """(what the file is, hint) when its leading bytes show a known non-ONNX format, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    for offset, magic, what, hint in _MAGICS:
        if head[offset: offset + len(magic)] == magic:
            return what, hint
    return None


def load_model(source: ModelSource, *, check: bool = True) -> ir.Model:
    """Load a model into onnx_ir from a path, serialized bytes, a ModelProto or an ir.Model.

    External data is not read into memory: tensors stay memory-mapped until a pass changes them.

    Args:
        source: a path to a .onnx file, its bytes, an ``onnx.ModelProto`` or an ``onnx_ir.Model``
            (returned as is).
        check: run the ONNX checker (not the full shape check) and verify external data files.

    Returns:
        The loaded ``onnx_ir.Model``.

    Raises:
        ModelLoadError: the file is missing, empty, not ONNX, truncated, invalid, or its external
            data is missing.
    """
    if isinstance(source, ir.Model):
        return source
    if isinstance(source, onnx.ModelProto):
        if check:
            _check_opsets(source, "the model")
            _check_graph(source, "the model")
        try:
            return ir.from_proto(source)
        except Exception as e:
            raise ModelLoadError(f"the model cannot be read: {_one_line(e)}", hint="check it with `python -m onnx.checker`") from e
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ModelLoadError("the model bytes are empty", hint="the export did not finish")
        try:
            proto = onnx.load_from_string(bytes(source))
        except Exception as e:
            raise ModelLoadError(
                "the bytes are not an ONNX model (protobuf parse failed)", hint="is it truncated?"
            ) from e
        return load_model(proto, check=check)

    path = Path(os.fspath(source))
    where = str(path)
    if not path.exists():
        raise ModelLoadError(f"model file {where} does not exist", hint="check the path")
    if path.is_dir():
        raise ModelLoadError(f"{where} is a folder, not an ONNX file", hint="give the .onnx file inside it")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{where} is empty (0 bytes)", hint="the export or copy did not finish")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        sniffed = _sniff_format(path)  # only when parsing failed: a valid model is never second-guessed
        if sniffed is not None:
            raise ModelLoadError(f"{where} is not an ONNX model: it is {sniffed[0]}", hint=sniffed[1]) from e
        raise ModelLoadError(
            f"{where} is not an ONNX model: protobuf parse failed ({type(e).__name__})",
            hint="the file may be truncated or another format; re-export it",
        ) from e
    if not proto.graph.node and not proto.graph.output and not proto.opset_import:
        sniffed = _sniff_format(path)
        if sniffed is not None:
            raise ModelLoadError(f"{where} is not an ONNX model: it is {sniffed[0]}", hint=sniffed[1])
        raise ModelLoadError(
            f"{where} is not an ONNX model: it parses to an empty ModelProto",
            hint="the file may be another format (e.g. a PyTorch checkpoint); export it to ONNX first",
        )
    if check:
        _check_opsets(proto, where)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:
        if check:
            _check_graph(str(path), where)  # a broken graph: the checker's message is the precise one
        cause = e.__cause__ or e
        raise ModelLoadError(f"{where} cannot be read into the IR: {_one_line(cause)}",
                             hint="check it with `python -m onnx.checker`; re-export it") from e
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    _check_external_data(model, where)
    if check:
        # Path-based check: works for models over 2 GB and does not load external data.
        _check_graph(str(path), where)
    del proto
    return model


def external_data_files(path: str | os.PathLike) -> set[Path]:
    """The external-data files a model file references (resolved paths); empty if none or unreadable."""
    p = Path(os.fspath(path))
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception:
        return set()
    files = set()
    graphs = [proto.graph]
    while graphs:
        g = graphs.pop()
        for init in g.initializer:
            for entry in init.external_data:
                if entry.key == "location":
                    files.add((p.parent / entry.value).resolve())
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    return files


def check_output_path(output: str | os.PathLike, inputs: list[str | os.PathLike]) -> Path:
    """Check that ``output`` is writable and not one of ``inputs``; return it as a Path.

    Raises:
        OutputPathError: the output is an input, is a folder, or its folder is missing or read-only.
    """
    out = Path(os.fspath(output))
    for src in inputs:
        src_path = Path(os.fspath(src))
        if out.resolve() == src_path.resolve() or (
            out.exists() and src_path.exists() and os.path.samefile(out, src_path)
        ):
            raise OutputPathError(
                f"output path {out} is the input model",
                hint="write to a new file, e.g. model.small.onnx; the input is never overwritten",
            )
    if out.is_dir():
        raise OutputPathError(f"output path {out} is a folder", hint="give a file name ending in .onnx")
    data_file = (out.parent / (out.name + ".data")).resolve()
    for src in inputs:
        src_path = Path(os.fspath(src))
        if src_path.is_file() and data_file in external_data_files(src_path):
            raise OutputPathError(
                f"output {out} would overwrite {data_file.name}, the input model's external data",
                hint="choose another output name",
            )
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputPathError(f"output folder {parent} does not exist", hint="create it first")
    if not os.access(parent, os.W_OK | os.X_OK) or _mode_read_only(parent):
        raise OutputPathError(f"output folder {parent} is not writable", hint="choose a writable folder")
    if out.exists() and (not os.access(out, os.W_OK) or _mode_read_only(out)):
        raise OutputPathError(f"output file {out} exists and is read-only", hint="choose another output name or make it writable")
    return out


def _mode_read_only(path: Path) -> bool:
    """True if no write bit is set: read-only by intent, even for root (whom os.access lets write anyway)."""
    try:
        return not (path.stat().st_mode & 0o222)
    except OSError:
        return False


def _weight_bytes(model: ir.Model) -> int:
    return sum(t.nbytes for _, t in constant_tensors(model))


def save_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Save ``model`` to ``path`` atomically.

    Args:
        model: the model to save.
        path: destination .onnx path.
        external_data: True to write weights to ``<name>.data`` beside the model, False to embed
            them, None (default) to decide by size (over ``EXTERNAL_DATA_THRESHOLD``) or keep them
            external if the model came with external data.

    Returns:
        The destination path.

    Raises:
        OutputPathError: the destination cannot be written.
    """
    dest = Path(os.fspath(path))
    parent = dest.parent if str(dest.parent) else Path(".")
    if external_data is None:
        has_external = any(
            isinstance(t, ir.ExternalTensor) for _, t in constant_tensors(model)
        )
        external_data = has_external or _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = dest.name + ".data"
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=".onnxshrink-", dir=parent))
    except OSError as e:
        raise OutputPathError(f"cannot write to {parent}: {e.strerror}", hint="choose a writable folder with free space") from e
    try:
        tmp_model = tmpdir / dest.name
        try:
            if external_data:
                ir.save(model, tmp_model, external_data=data_name)
            else:
                if any(isinstance(t, ir.ExternalTensor) for _, t in constant_tensors(model)):
                    ir.external_data.load_to_model(model)  # embed: the references would point elsewhere
                proto = ir.to_proto(model)
                for opset in proto.opset_import:
                    if opset.domain == "":
                        opset.ClearField("domain")  # the default domain is implied; keep files minimal
                _drop_initializer_value_info(proto.graph)
                tmp_model.write_bytes(proto.SerializeToString())
                del proto
        except OSError as e:
            raise OutputPathError(f"cannot write {dest}: {e.strerror}", hint="choose a writable folder with free space") from e
        tmp_data = tmpdir / data_name
        if tmp_data.exists():
            os.replace(tmp_data, parent / data_name)
        os.replace(tmp_model, dest)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return dest


def _drop_initializer_value_info(graph: onnx.GraphProto) -> None:
    """Remove value_info entries that only repeat an initializer's own dtype and dims."""
    inits = {t.name for t in graph.initializer}
    keep = [vi for vi in graph.value_info if vi.name not in inits]
    if len(keep) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(keep)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _drop_initializer_value_info(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _drop_initializer_value_info(g)


def iter_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    """Yield the main graph and every subgraph (If/Loop/Scan bodies), recursively."""
    return iter(model.graphs())


def iter_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Yield every node of the main graph and of all subgraphs."""
    for graph in iter_graphs(model):
        yield from graph


def constant_tensors(model: ir.Model) -> Iterator[tuple[str, ir.TensorProtocol]]:
    """Yield (name, tensor) for every initializer and every Constant node's tensor, in all graphs.

    Tensors are not read: only their shape and dtype are used by callers that count bytes.
    """
    for graph in iter_graphs(model):
        for name, value in graph.initializers.items():
            if value.const_value is not None:
                yield name, value.const_value
        for node in graph:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                attr = node.attributes.get("value")
                if attr is not None and attr.type == ir.AttributeType.TENSOR:
                    # attr.value, not attr.as_tensor(): the latter's Protocol isinstance check costs ~100 µs
                    yield node.outputs[0].name or "", attr.value


@dataclasses.dataclass
class Annotations:
    """What the input file declared, by name: typed intermediate values, unnamed nodes, output shapes."""

    typed_values: set[str]
    unnamed_nodes: set[str]
    outputs: dict[str, tuple[Any, Any]]


def snapshot_annotations(model: ir.Model) -> Annotations:
    """Record the input's value annotations and unnamed nodes (see :func:`strip_added_annotations`).

    Names, not object identities, are recorded: passes may rebuild graphs.
    """
    typed: set[str] = set()
    unnamed: set[str] = set()
    for node in iter_nodes(model):
        if not node.name and node.outputs and node.outputs[0].name:
            unnamed.add(node.outputs[0].name)
        for v in node.outputs:
            if v.name and (v.type is not None or v.shape is not None):
                typed.add(v.name)
    outputs = {v.name: (v.type, v.shape) for v in model.graph.outputs if v.name}
    return Annotations(typed, unnamed, outputs)


def strip_added_annotations(model: ir.Model, before: Annotations) -> None:
    """Drop what analysis added and the file did not have, so saving never grows the model for nothing.

    Shape inference annotates every value (about 20% of a CNN's file as value_info) and fills in output
    shapes; name fixing names every node. Runtimes infer the one and do not need the other. What the
    input declared is kept (output types and shapes exactly as declared), and so are the names of nodes
    the passes created.
    """
    for node in iter_nodes(model):
        if node.outputs and node.outputs[0].name in before.unnamed_nodes:
            node.name = None
        for v in node.outputs:
            if v.name not in before.typed_values and not v.is_graph_output():
                v.type = None
                v.shape = None
    for v in model.graph.outputs:
        if v.name in before.outputs:
            tp, shape = before.outputs[v.name]
            if tp is not None:
                v.type = tp
            v.shape = shape


@dataclasses.dataclass
class ModelStats:
    """Size figures of a model. ``file_bytes`` is None until the model is on disk."""

    nodes: int
    params: int
    weight_bytes: int
    macs: int | None
    opset: int
    op_counts: dict[str, int]
    file_bytes: int | None = None

    def to_dict(self) -> dict:
        """Return the stats as a JSON-ready dict with stable keys."""
        return dataclasses.asdict(self)


def _dim_or_one(d: object) -> int:
    return d if isinstance(d, int) and d > 0 else 1


def _shape_dims(value: ir.Value | None) -> list[int] | None:
    if value is None or value.shape is None:
        return None
    return [_dim_or_one(d) for d in value.shape]


def _node_macs(node: ir.Node) -> int | None:
    """Multiply-accumulates of one Conv/ConvTranspose/Gemm/MatMul node, unknown dims counted as 1."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return None
    if op in ("Conv", "ConvTranspose"):
        w = _shape_dims(node.inputs[1])
        out = _shape_dims(node.outputs[0])
        if w is None or out is None or len(w) < 3:
            return None
        if op == "Conv":
            # out: [N, M, *spatial_out]; w: [M, C/g, *k]
            return int(np.prod(out) * np.prod(w[1:]))
        x = _shape_dims(node.inputs[0])
        if x is None:
            return None
        # every input element is multiplied by a [M/g, *k] slice of the kernel
        return int(np.prod(x) * np.prod(w[1:]))
    if op == "Gemm":
        a = _shape_dims(node.inputs[0])
        b = _shape_dims(node.inputs[1])
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return None
        trans_a = node.attributes.get_int("transA", 0)
        trans_b = node.attributes.get_int("transB", 0)
        m, k = (a[1], a[0]) if trans_a else (a[0], a[1])
        n = b[0] if trans_b else b[1]
        return m * k * n
    if op == "MatMul":
        a = _shape_dims(node.inputs[0])
        out = _shape_dims(node.outputs[0])
        if a is None or out is None or not a:
            return None
        return int(np.prod(out) * a[-1])
    return None


def model_stats(model: ir.Model) -> ModelStats:
    """Count nodes, parameters, weight bytes, op types and MACs of a model (weights are not read).

    MACs are per sample: dynamic dimensions count as 1. They need value shapes; nodes whose shapes
    are unknown are left out of the sum (and ``macs`` is None if none is known).
    """
    op_counts: collections.Counter[str] = collections.Counter()
    macs_total = 0
    macs_known = False
    nodes = 0
    for node in iter_nodes(model):
        nodes += 1
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        op_counts[key] += 1
        m = _node_macs(node)
        if m is not None:
            macs_total += m
            macs_known = True
    params = 0
    weight_bytes = 0
    for _, tensor in constant_tensors(model):
        params += int(np.prod(tensor.shape.numpy())) if tensor.shape is not None else 0
        weight_bytes += tensor.nbytes
    return ModelStats(
        nodes=nodes,
        params=params,
        weight_bytes=weight_bytes,
        macs=macs_total if macs_known else None,
        opset=model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)),
        op_counts=dict(sorted(op_counts.items())),
    )


#: Initializers larger than this are handed to onnx shape inference as data-less stand-ins (type and
#: dims only). Shape inference reads values only of small tensors (shapes, axes, indices).
_INFER_INLINE_BYTES = 1024
_STAND_IN_LOCATION = "onnxshrink-shape-inference-stand-in"


def infer_shapes(model: ir.Model, *, data_prop: bool = True) -> bool:
    """Infer value types and shapes with ``onnx.shape_inference`` and record them on the IR values.

    Linear in the graph size: the model is serialized once with every initializer over 1 KiB replaced
    by a data-less stand-in (so no weight is read or copied, and models over 2 GB work), inferred once
    (not strict: a node onnx cannot infer, e.g. a custom op, just leaves its outputs unknown), and the
    result is copied back by walking the inferred graph beside the IR graph (subgraphs included). Unlike
    onnx_ir 1.1's ``ShapeInferencePass`` it never turns initializers into inputs (quadratic in their
    number) and never deserializes the inferred model.

    Args:
        model: the model; only value types and shapes change (initializers also get their tensor's
            dtype and dims).
        data_prop: let onnx propagate small constant values (shape arithmetic) during inference.

    Returns:
        True if any value's type or shape changed.

    Raises:
        Exception: whatever ``onnx.shape_inference`` raises on a model it cannot handle at all; callers
            decide whether that matters (the model is unchanged then).
    """
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            if value.shape is None:
                value.shape = tensor.shape
            if value.type is None:
                value.type = ir.TensorType(tensor.dtype)
            if tensor.nbytes > _INFER_INLINE_BYTES and not isinstance(tensor, ir.ExternalTensor):
                stand_in = ir.ExternalTensor(_STAND_IN_LOCATION, 0, tensor.nbytes, tensor.dtype,
                                             shape=tensor.shape, name=value.name or "")
                swapped.append((value, tensor))
                value.const_value = stand_in
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        for value, tensor in swapped:
            value.const_value = tensor
    inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=data_prop)
    del proto
    return _merge_inferred(model.graph, inferred.graph)


def _apply_type(value: ir.Value, type_proto: onnx.TypeProto) -> bool:
    try:
        tp = ir.serde.deserialize_type_proto_for_type(type_proto)
        shape = ir.serde.deserialize_type_proto_for_shape(type_proto)
    except Exception:  # map types and other forms the IR does not model
        return False
    changed = False
    if tp is not None and value.type != tp:
        value.type = tp
        changed = True
    if shape is not None and value.shape != shape:
        value.shape = shape
        changed = True
    return changed


def _merge_inferred(graph: ir.Graph, graph_proto: onnx.GraphProto) -> bool:
    """Copy inferred types/shapes of ``graph_proto`` (serialized from ``graph``) onto ``graph``'s values."""
    infos = {vi.name: vi.type for vi in graph_proto.value_info}
    for vi in graph_proto.output:
        infos.setdefault(vi.name, vi.type)
    changed = False
    node_protos = graph_proto.node
    same_nodes = len(node_protos) == len(graph)
    for i, node in enumerate(graph):
        for out in node.outputs:
            if out.name and out.name in infos:
                changed |= _apply_type(out, infos[out.name])
        if not same_nodes:
            continue
        attr_protos = None
        for attr in node.attributes.values():
            if attr.type not in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                continue
            if attr_protos is None:
                attr_protos = {a.name: a for a in node_protos[i].attribute}
            ap = attr_protos.get(attr.name)
            if ap is None:
                continue
            if attr.type == ir.AttributeType.GRAPH:
                changed |= _merge_inferred(attr.value, ap.g)
            else:
                for sub, sub_proto in zip(attr.value, ap.graphs):
                    changed |= _merge_inferred(sub, sub_proto)
    return changed


def name_matcher(pattern: str | None):
    """A predicate on node names from an ``exclude=`` option (every pass reads it the same way).

    Items are joined by ``|`` (``+`` also separates, for specs typed in a shell). An item with a glob
    character (``* ? [``) must match the whole name; a plain item matches any name that contains it.
    ``none`` or an empty pattern matches nothing.
    """
    import fnmatch
    import re

    if not pattern or pattern == "none":
        return lambda name: False
    items = [p for p in re.split(r"[+|]", pattern) if p]

    def match(name: str | None) -> bool:
        name = name or ""
        return any(fnmatch.fnmatchcase(name, p) if any(c in p for c in "*?[") else p in name for p in items)

    return match


def taken_names(*graphs: ir.Graph) -> set[str]:
    """Every value and node name in ``graphs`` (inputs, initializers, node outputs and names, subgraphs
    included): the set :func:`unique_name` checks new names against."""
    names: set[str] = set()
    for graph in graphs:
        names |= {v.name for v in graph.inputs if v.name} | set(graph.initializers)
        for node in graph.all_nodes():
            names.update(v.name for v in node.outputs if v.name)
            if node.name:
                names.add(node.name)
    return names


def unique_name(base: str, taken: Any) -> str:
    """``base``, or ``base_1``, ``base_2`` … — the first not in ``taken`` (a set, or a graph's
    ``initializers``). A set is updated with the returned name."""
    name, i = base, 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    if isinstance(taken, set):
        taken.add(name)
    return name


def constant_value(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor behind ``value`` if it is an initializer (not an overridable graph input) or the output
    of a ``Constant`` node with a tensor ``value``; else None. Never reads external data."""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return attr.as_tensor()
    return None
