"""Calibration data readers: .npz, .npy, folders of images, and Python iterables of feeds.

Conventions (DEVELOPERS.md): an .npz holds one array per model input name. An array of
the input's rank is samples stacked along the batch axis and is split into the model's
batch size; an array of rank + 1 lists complete feeds along axis 0. Scalar and integer
inputs (token ids, masks, sample rates) pass through unquantized. Random data is produced
only when asked for explicitly with `"random"`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompile.errors import QCompileError

Feed = dict[str, np.ndarray]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None  # None dims / strings are dynamic

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def batch(self) -> int | None:
        """Fixed batch size (axis 0) or None when dynamic."""
        if not self.shape:
            return None
        return self.shape[0] if isinstance(self.shape[0], int) else None


def input_specs(model: ir.Model) -> list[InputSpec]:
    """Graph inputs that need feeding (initializer-backed inputs are optional, skipped)."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        shape = None
        if value.shape is not None:
            # Symbolic dims, unnamed dims and exporters' -1 are all dynamic.
            shape = tuple(d if isinstance(d, int) and d > 0 else None for d in value.shape)
        specs.append(InputSpec(value.name, np.dtype(dtype), shape))
    return specs


@dataclass(frozen=True)
class ImageSpec:
    """How to turn image files into a model input."""

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    scale: float = 1.0 / 255.0  # applied before mean/std
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    color: Literal["RGB", "BGR", "L"] = "RGB"
    dtype: str = "float32"

    @classmethod
    def parse(cls, text: str) -> ImageSpec:
        """Parse 'size=224x224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=NCHW'."""
        kwargs: dict[str, object] = {}
        for item in filter(None, (t.strip() for t in text.split(","))):
            key, _, value = item.partition("=")
            try:
                if key == "size":
                    h, _, w = value.lower().partition("x")
                    kwargs["size"] = (int(h), int(w or h))
                elif key in ("mean", "std"):
                    kwargs[key] = tuple(float(v) for v in value.split("/"))
                elif key == "scale":
                    kwargs[key] = float(value)
                elif key in ("layout", "color", "dtype"):
                    kwargs[key] = value
                else:
                    raise QCompileError(
                        f"unknown image preprocessing key '{key}'",
                        hint="keys: size, mean, std, scale, layout, color, dtype",
                    )
            except ValueError as exc:
                raise QCompileError(f"bad image preprocessing value '{item}'") from exc
        if "size" not in kwargs:
            raise QCompileError(
                "image preprocessing needs size=HxW", hint="e.g. --image-spec size=224x224"
            )
        spec = cls(**kwargs)  # type: ignore[arg-type]
        if spec.layout not in ("NCHW", "NHWC") or spec.color not in ("RGB", "BGR", "L"):
            raise QCompileError("image layout must be NCHW|NHWC and color RGB|BGR|L")
        return spec


def load_image(path: Path, spec: ImageSpec) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if spec.color == "L" else "RGB")
            img = img.resize((spec.size[1], spec.size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as exc:
        raise QCompileError(f"cannot read image: {exc}", path=str(path)) from exc
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if spec.color == "BGR":
        arr = arr[:, :, ::-1]
    channels = arr.shape[2]
    mean = np.resize(np.asarray(spec.mean, np.float32), channels)
    std = np.resize(np.asarray(spec.std, np.float32), channels)
    arr = (arr * spec.scale - mean) / std
    if spec.layout == "NCHW":
        arr = arr.transpose(2, 0, 1)
    return arr.astype(spec.dtype)


class CalibrationSource:
    """A re-iterable stream of validated feeds for a model."""

    def __init__(
        self,
        feeds: Iterable[Feed] | Iterator[Feed],
        specs: Sequence[InputSpec],
        origin: str,
        count: int | None = None,
    ) -> None:
        self._feeds = feeds
        self.specs = list(specs)
        self.origin = origin
        self.count = count

    def __iter__(self) -> Iterator[Feed]:
        for i, feed in enumerate(self._feeds):
            yield validate_feed(feed, self.specs, where=f"{self.origin} feed {i}")

    def __len__(self) -> int:
        if self.count is None:
            raise TypeError("length unknown")
        return self.count


def open_calibration(
    source: str | os.PathLike | Iterable[Mapping[str, np.ndarray]] | Mapping[str, np.ndarray],
    specs: Sequence[InputSpec],
    *,
    batch_size: int = 8,
    image_spec: ImageSpec | None = None,
    random_count: int = 8,
    seed: int = 0,
) -> CalibrationSource:
    """Open any supported calibration source as a stream of feeds."""
    if isinstance(source, str) and source == "random":
        feeds = random_feeds(specs, random_count, seed, batch_size)
        return CalibrationSource(feeds, specs, "random data", len(feeds))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise QCompileError("calibration data not found", path=str(path))
        if path.is_dir():
            return _image_folder(path, specs, image_spec, batch_size)
        if path.suffix == ".npz":
            try:
                with np.load(path, allow_pickle=False) as npz:
                    arrays = {k: npz[k] for k in npz.files}
            except Exception as exc:
                raise QCompileError(
                    f"cannot read .npz calibration file: {exc}", path=str(path)
                ) from exc
            return _from_arrays(arrays, specs, batch_size, str(path))
        if path.suffix == ".npy":
            if len(specs) != 1:
                raise QCompileError(
                    f"a .npy file feeds one input, but the model has {len(specs)}",
                    path=str(path),
                    hint="use an .npz with one array per input name: "
                    + ", ".join(s.name for s in specs),
                )
            try:
                array = np.load(path, allow_pickle=False)
            except Exception as exc:
                raise QCompileError(
                    f"cannot read .npy calibration file: {exc}", path=str(path)
                ) from exc
            return _from_arrays({specs[0].name: array}, specs, batch_size, str(path))
        raise QCompileError(
            "unsupported calibration file type",
            path=str(path),
            hint="use .npz (one array per input), .npy (single input) or a folder of images",
        )
    if isinstance(source, Mapping):
        return _from_arrays(
            {k: np.asarray(v) for k, v in source.items()}, specs, batch_size, "arrays"
        )
    if isinstance(source, Iterable):
        if iter(source) is source:
            # a one-shot iterator: calibration runs more than once (smoothing, then ranges)
            source = list(source)
        count = len(source) if hasattr(source, "__len__") else None  # type: ignore[arg-type]
        feeds = _MappedFeeds(source)
        return CalibrationSource(feeds, specs, "iterable", count)
    raise QCompileError(f"unsupported calibration source of type {type(source).__name__}")


def read_labels(source: str | os.PathLike | Sequence[int] | np.ndarray) -> np.ndarray:
    """Class labels for `--metric accuracy`: a .npy/.txt file or an array, one integer
    per verification sample in data order."""
    origin = "labels"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        origin = str(path)
        if not path.is_file():
            raise QCompileError("labels file not found", path=origin)
        try:
            array = (
                np.load(path, allow_pickle=False)
                if path.suffix == ".npy"
                else np.loadtxt(path, dtype=np.int64, ndmin=1)
            )
        except Exception as exc:
            raise QCompileError(
                f"cannot read labels: {exc}",
                path=origin,
                hint="use a .npy array or a text file with one integer per sample",
            ) from exc
    else:
        array = np.asarray(source)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        raise QCompileError(
            f"labels must be a non-empty 1-D integer array, got {array.dtype} {array.shape}",
            path=origin if origin != "labels" else None,
        )
    return array


class _MappedFeeds:
    """Re-iterable view of user feeds as dicts of arrays."""

    def __init__(self, source: Iterable[Mapping[str, np.ndarray]]) -> None:
        self.source = source

    def __iter__(self) -> Iterator[Feed]:
        return ({k: np.asarray(v) for k, v in feed.items()} for feed in self.source)


def _from_arrays(
    arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec], batch_size: int, origin: str
) -> CalibrationSource:
    names = {s.name for s in specs}
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise QCompileError(
            "calibration data has no array for a model input",
            tensor=missing[0],
            path=origin,
            hint=f"provide one array per input; model inputs: {', '.join(sorted(names))}; found: {', '.join(sorted(arrays))}",
        )
    extra = sorted(set(arrays) - names)
    if extra:
        raise QCompileError(
            "calibration data has an array that matches no model input",
            tensor=extra[0],
            path=origin,
            hint=f"model inputs: {', '.join(sorted(names))}",
        )
    per_input: dict[str, list[np.ndarray]] = {}
    for spec in specs:
        per_input[spec.name] = _split(arrays[spec.name], spec, batch_size, origin)
    counts = {len(v) for v in per_input.values() if len(v) > 1}
    if len(counts) > 1:
        raise QCompileError(
            "calibration arrays give different numbers of feeds: "
            + ", ".join(f"{k}={len(v)}" for k, v in per_input.items()),
            path=origin,
            hint="stack the same number of samples for every input",
        )
    n = counts.pop() if counts else 1
    feeds = [
        {name: (chunks[i] if len(chunks) > 1 else chunks[0]) for name, chunks in per_input.items()}
        for i in range(n)
    ]
    return CalibrationSource(feeds, specs, origin, n)


def _split(array: np.ndarray, spec: InputSpec, batch_size: int, origin: str) -> list[np.ndarray]:
    if spec.rank is None:
        return [array]
    if spec.rank == 0:
        if array.ndim == 0:
            return [array]
        if array.ndim == 1:
            return list(array)
    elif array.ndim == spec.rank + 1:
        return list(array)
    elif array.ndim == spec.rank:
        step = spec.batch or batch_size
        if spec.batch is not None and array.shape[0] % spec.batch:
            raise QCompileError(
                f"{array.shape[0]} samples do not split into the model's batch size {spec.batch}",
                tensor=spec.name,
                path=origin,
            )
        return [array[i : i + step] for i in range(0, array.shape[0], step)]
    raise QCompileError(
        f"calibration array has rank {array.ndim}; the input has rank {spec.rank}",
        tensor=spec.name,
        path=origin,
        hint=f"use rank {spec.rank} (samples stacked on the batch axis) or {spec.rank + 1} (a list of feeds)",
    )


def validate_feed(feed: Mapping[str, np.ndarray], specs: Sequence[InputSpec], where: str) -> Feed:
    """Check names, dtypes, shapes and finiteness; cast safe dtype differences."""
    out: Feed = {}
    for spec in specs:
        if spec.name not in feed:
            raise QCompileError(
                f"{where} has no value for input",
                tensor=spec.name,
                hint="every feed needs every model input",
            )
        array = np.asarray(feed[spec.name])
        if array.dtype != spec.dtype:
            same_kind = (array.dtype.kind == "f") == (
                spec.dtype.kind == "f"
            ) and array.dtype.kind != "b"
            if not same_kind and not (spec.dtype.kind == "b" and array.dtype.kind in "iub"):
                raise QCompileError(
                    f"{where}: dtype {array.dtype} cannot feed an input of type {spec.dtype}",
                    tensor=spec.name,
                    hint=f"convert the array to {spec.dtype}",
                )
            array = array.astype(spec.dtype)
        if spec.shape is not None:
            if array.ndim != len(spec.shape):
                raise QCompileError(
                    f"{where}: shape {array.shape} has rank {array.ndim}, the input has rank {len(spec.shape)}",
                    tensor=spec.name,
                )
            for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
                if isinstance(want, int) and want != got:
                    raise QCompileError(
                        f"{where}: shape {tuple(array.shape)} does not match the input's {_fmt(spec.shape)} at axis {axis}",
                        tensor=spec.name,
                    )
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise QCompileError(
                f"{where} contains NaN or Inf", tensor=spec.name, hint="clean the calibration data"
            )
        out[spec.name] = array
    return out


def _fmt(shape: Sequence[object]) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else "?" for d in shape) + ")"


def random_feeds(
    specs: Sequence[InputSpec], count: int, seed: int, batch_size: int = 1
) -> list[Feed]:
    """Random feeds, only when asked for explicitly: N(0,1) floats, zeros/ones for ints."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for spec in specs:
            if spec.shape is None or any(not isinstance(d, int) for d in spec.shape[1:]):
                raise QCompileError(
                    "random calibration needs fixed input shapes",
                    tensor=spec.name,
                    hint="pin dynamic dims with --input-shape NAME=D0,D1,...",
                )
            shape = tuple(d if isinstance(d, int) else batch_size for d in spec.shape)
            if spec.dtype.kind == "f":
                feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            else:
                feed[spec.name] = np.ones(shape, dtype=spec.dtype)
        feeds.append(feed)
    return feeds


def _image_folder(
    path: Path, specs: Sequence[InputSpec], image_spec: ImageSpec | None, batch_size: int
) -> CalibrationSource:
    if image_spec is None:
        raise QCompileError(
            "a folder of images needs preprocessing settings",
            path=str(path),
            hint="pass --image-spec size=HxW[,mean=...,std=...,layout=NCHW]",
        )
    float_inputs = [s for s in specs if s.dtype.kind == "f"]
    if len(float_inputs) != 1 or len(specs) != 1:
        raise QCompileError(
            "a folder of images feeds models with exactly one input", path=str(path)
        )
    spec = specs[0]
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise QCompileError(
            "the image folder has no images",
            path=str(path),
            hint=f"supported: {', '.join(IMAGE_SUFFIXES)}",
        )
    step = spec.batch or batch_size
    if spec.batch is not None:
        n = len(files) // spec.batch  # fixed batch: a ragged tail is dropped
        if n == 0:
            raise QCompileError(
                f"fewer images than the model's batch size {spec.batch}", path=str(path)
            )
    else:
        n = (len(files) + step - 1) // step

    class _Reiterable:
        def __iter__(self) -> Iterator[Feed]:
            for i in range(0, n * step, step):
                yield {
                    spec.name: np.stack([load_image(f, image_spec) for f in files[i : i + step]])
                }

    return CalibrationSource(_Reiterable(), specs, str(path), n)
