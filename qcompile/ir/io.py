"""Loading models from anything users hand us, and writing them atomically.

The input file is only ever read. Output is written to a temporary file in the target
directory and renamed into place, so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from qcompile.errors import QCompileError

logger = logging.getLogger(__name__)

MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear need opset 13
# Older models are brought to 17 when the converter allows: HardSwish (14) and
# LayerNormalization (17) are what our fusions emit.
PREFERRED_OPSET = 17
# Protobuf cannot serialize a message over 2 GiB; stay well below it.
EXTERNAL_DATA_THRESHOLD = 1 << 30

ModelSource = str | os.PathLike | bytes | onnx.ModelProto | ir.Model


def load_model(source: ModelSource, *, min_opset: int = MIN_OPSET) -> ir.Model:
    """Load a model from a path, bytes, a ModelProto or an ir.Model (which is copied).

    External data is resolved relative to the model file. Models below PREFERRED_OPSET
    are upgraded with onnx's version converter; if that fails, models at `min_opset` or
    above are kept as they are, older ones are refused. Errors name the file.
    """
    path = None
    if isinstance(source, ir.Model):
        return source.clone()  # keeps external-data tensors pointing at their files
    if isinstance(source, onnx.ModelProto):
        model = ir.from_proto(source)
    elif isinstance(source, bytes):
        model = _parse_bytes(source, where=None)
    else:
        path = Path(source)
        model = _load_path(path)
    _check_nonempty(model, path)
    _unknown_dims_as_symbolic(model)
    _initializers_are_not_inputs(model)
    model = upgrade_opset(model, min_opset, path=path)
    _raise_ir_version(model)
    return model


def _initializers_are_not_inputs(model: ir.Model) -> None:
    """IR < 4 requires every initializer to be listed as a graph input; ONNX Runtime
    treats those as constants, and so do we: they are weights, not inputs to feed."""
    if model.ir_version >= 4:
        return
    inputs = list(model.graph.inputs)
    weights = [v for v in inputs if v.name in model.graph.initializers]
    for value in weights:
        model.graph.inputs.remove(value)
    if weights:
        logger.info(
            "IR %d model: %d initializers listed as inputs are constants",
            model.ir_version,
            len(weights),
        )
    model.ir_version = 4


def _raise_ir_version(model: ir.Model) -> None:
    """The IR version the model's opsets need (an upgraded opset 17 needs IR 8), so that
    initializers we add need not be graph inputs."""
    opsets = [
        onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()
    ]
    needed = onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    model.ir_version = max(model.ir_version, needed)


def _unknown_dims_as_symbolic(model: ir.Model) -> None:
    """Exporters (Paddle2ONNX) write unknown dims as -1 in value_info; ONNX means a
    dim_value is known, so after pinning an input, inference would report 8 vs -1 as a
    conflict. -1 becomes an unnamed symbolic dim, which is what the exporter meant."""
    values = [*model.graph.inputs, *model.graph.outputs]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        values.extend(node.outputs)
    for value in values:
        shape = value.shape
        if shape is not None and any(isinstance(d, int) and d < 0 for d in shape):
            value.shape = ir.Shape([None if isinstance(d, int) and d < 0 else d for d in shape])


def _load_path(path: Path) -> ir.Model:
    if not path.exists():
        raise QCompileError("model file does not exist", path=str(path))
    if path.is_dir():
        raise QCompileError("expected an .onnx file but got a directory", path=str(path))
    try:
        # ir.load keeps external data lazily mapped, so >2 GB models load without copies.
        model = ir.load(str(path))
    except DecodeError as exc:
        raise QCompileError(
            "not a valid ONNX model: the protobuf could not be parsed (truncated or corrupt file?)",
            path=str(path),
            hint="re-export the model or check that the download completed",
        ) from exc
    except Exception as exc:  # onnx-ir raises several types for malformed protos
        raise QCompileError(f"could not read the ONNX model: {exc}", path=str(path)) from exc
    _check_external_data(model, path)
    external = sum(
        v.const_value.nbytes
        for v in model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    )
    if external and external <= EXTERNAL_DATA_THRESHOLD:
        # Small enough to hold: load it, so the model serializes self-contained for ORT.
        model = ir.external_data.load_to_model(model)
    return model


def _parse_bytes(data: bytes, where: str | None) -> ir.Model:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as exc:
        raise QCompileError(
            "not a valid ONNX model: the protobuf could not be parsed (truncated or corrupt?)",
            path=where,
        ) from exc
    return ir.from_proto(proto)


def _check_external_data(model: ir.Model, path: Path) -> None:
    base = path.parent
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            location = base / tensor.location
            if not location.exists():
                raise QCompileError(
                    f"external data file '{tensor.location}' is missing",
                    path=str(path),
                    tensor=value.name,
                    hint=f"place '{tensor.location}' next to the model (looked in {base})",
                )


def _check_nonempty(model: ir.Model, path: Path | None) -> None:
    if len(model.graph) == 0:
        raise QCompileError(
            "the model's graph has no nodes",
            path=str(path) if path else None,
            hint="is this a complete model file?",
        )
    if not model.graph.outputs:
        raise QCompileError("the model's graph has no outputs", path=str(path) if path else None)


def upgrade_opset(model: ir.Model, min_opset: int, *, path: Path | None = None) -> ir.Model:
    """Upgrade the default-domain opset to at least `min_opset` with onnx's version converter."""
    version = model.opset_imports.get("", None)
    if version is None:
        raise QCompileError(
            "the model imports no default ONNX opset", path=str(path) if path else None
        )
    newest = onnx.defs.onnx_opset_version()
    if version > newest:
        raise QCompileError(
            f"the model uses opset {version}, newer than the newest this onnx knows ({newest})",
            path=str(path) if path else None,
            hint=f"re-export with opset <= {newest} or upgrade onnx/onnxruntime",
        )
    target = max(min_opset, PREFERRED_OPSET)
    if version >= target:
        return model
    logger.info("upgrading opset %d -> %d", version, target)
    proto = ir.to_proto(model)
    try:
        upgraded = onnx.version_converter.convert_version(proto, target)
        onnx.checker.check_model(upgraded)
    except Exception as exc:
        if version >= min_opset:
            logger.warning("keeping opset %d: the upgrade to %d failed (%s)", version, target, exc)
            return model
        raise QCompileError(
            f"could not upgrade the model from opset {version} to {target}: {exc}",
            path=str(path) if path else None,
            hint=f"re-export the model with opset >= {min_opset}",
        ) from exc
    # The converter's shape inference leaves value_info for every tensor; ONNX Runtime
    # fuses more with it (Add+LayerNormalization -> SkipLayerNormalization, which its
    # CPU kernels run slower), so an upgraded FP32 model would not time like the
    # user's. Keep only the annotations the user's model had.
    declared = {v.name for v in proto.graph.value_info}
    kept = [v for v in upgraded.graph.value_info if v.name in declared]
    del upgraded.graph.value_info[:]
    upgraded.graph.value_info.extend(kept)
    return ir.from_proto(upgraded)


def to_proto(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)


def model_nbytes(model: ir.Model) -> int:
    """Bytes taken by initializers (the bulk of a model file)."""
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def check_output_path(
    output: str | os.PathLike, *, inputs: tuple[str | os.PathLike, ...] = ()
) -> Path:
    """Refuse to write over an input, into a missing directory, or where we cannot write."""
    out = Path(output)
    for item in inputs:
        if item is not None and out.resolve() == Path(item).resolve():
            raise QCompileError(
                "the output path is the input model; refusing to overwrite the input",
                path=str(out),
                hint="choose a different -o/--output path",
            )
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise QCompileError(
            "the output directory does not exist", path=str(out), hint=f"create {parent} first"
        )
    if out.is_dir():
        raise QCompileError("the output path is a directory", path=str(out))
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise QCompileError("cannot write the output file (permission denied)", path=str(out))
    return out


def save_model(
    model: ir.Model | onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
) -> Path:
    """Write `model` to `path` atomically; large models get a `<name>.data` file beside them.

    external_data=None decides by size (over 1 GiB of initializers).
    """
    out = check_output_path(path)
    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    if external_data is None:
        external_data = model_nbytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = out.name + ".data"
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp_model = tmp_dir / out.name
        try:
            if external_data:
                ir.save(model, tmp_model, external_data=data_name)
            else:
                ir.save(model, tmp_model)
        except OSError as exc:
            raise QCompileError(f"could not write the model: {exc}", path=str(out)) from exc
        if external_data:
            os.replace(tmp_dir / data_name, out.parent / data_name)
        os.replace(tmp_model, out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it, so a reader never sees
    half a file (reports, the mixed-precision measurement cache)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def serialized_size(model: ir.Model) -> int:
    """Bytes the model takes saved: its protobuf plus tensors kept in external files
    (serializing those would load them, and past 2 GB protobuf cannot hold them)."""
    external = sum(
        v.const_value.nbytes
        for v in model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    )
    return ir.to_proto(model).ByteSize() + external
