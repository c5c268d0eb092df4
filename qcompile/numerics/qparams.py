"""The one pure function that maps a clipping range to (scale, zero point), and its inverse.

Every observer ends here, so all calibration methods agree on rounding, the zero-range
case and power-of-two scales. numpy reference quantize/dequantize live beside it and
follow ONNX QuantizeLinear semantics (round half to even, saturate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

ScaleKind = Literal["float", "pow2"]

# Smallest scale we emit: keeps s_x*s_w (the int32 bias scale) a normal float32.
MIN_SCALE = float(np.finfo(np.float32).tiny) * 2**24


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: integer type, symmetry and scale form."""

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow: bool = False  # symmetric signed weights use [-(2^(b-1)-1), 2^(b-1)-1]
    scale_kind: ScaleKind = "float"

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.scale_kind not in ("float", "pow2"):
            raise ValueError(f"scale_kind must be 'float' or 'pow2', got {self.scale_kind!r}")

    @property
    def qmin(self) -> int:
        if self.signed:
            return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)
        return 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(np.int8 if self.signed else np.uint8)

    @property
    def name(self) -> str:
        return f"{'s' if self.signed else 'u'}{self.bits}{'sym' if self.symmetric else 'asym'}"


@dataclass(frozen=True)
class QParams:
    """Scale and zero point for a tensor; `axis` is set for per-channel parameters."""

    scale: np.ndarray  # float32, 0-d (per-tensor) or 1-d (per-channel)
    zero_point: np.ndarray  # spec.numpy_dtype, same shape as scale
    spec: QuantSpec
    axis: int | None = None

    @property
    def per_channel(self) -> bool:
        return self.scale.ndim == 1


def range_to_qparams(
    lo: np.ndarray | float, hi: np.ndarray | float, spec: QuantSpec, axis: int | None = None
) -> QParams:
    """Scale/zero point covering [lo, hi] (extended to include 0, so 0 is exact).

    A zero-width range (a constant-zero tensor) gets scale 1: every value maps exactly
    to the zero point, so nothing is lost.
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError("range is not finite")
    qmin, qmax = spec.qmin, spec.qmax
    if spec.symmetric:
        bound = np.maximum(-lo, hi)
        half = (qmax - qmin) / 2.0
        scale = bound / half
        if spec.signed:
            zero_point = np.zeros_like(scale)
        else:
            zero_point = np.full_like(scale, (qmax + qmin + 1) // 2)
    else:
        scale = (hi - lo) / float(qmax - qmin)
        zero_point = None
    scale = np.where(scale > 0, scale, 1.0)
    if spec.scale_kind == "pow2":
        scale = np.exp2(np.ceil(np.log2(scale)))
    scale = np.maximum(scale, MIN_SCALE).astype(np.float32)
    if zero_point is None:
        zero_point = np.clip(np.round(qmin - lo / scale.astype(np.float64)), qmin, qmax)
    zero_point = zero_point.astype(spec.numpy_dtype)
    return QParams(scale=scale, zero_point=zero_point, spec=spec, axis=axis)


def _broadcast(p: np.ndarray, x: np.ndarray, axis: int | None) -> np.ndarray:
    if p.ndim == 0 or axis is None:
        return p
    shape = [1] * x.ndim
    shape[axis] = -1
    return p.reshape(shape)


def _quantized_float(x: np.ndarray, qp: QParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """QuantizeLinear's integers held in float32, plus the broadcast scale and zero point."""
    scale = _broadcast(qp.scale, x, qp.axis).astype(np.float32)
    zp = _broadcast(qp.zero_point, x, qp.axis).astype(np.float32)
    # In place on one float32 buffer (embedding tables have tens of millions of values).
    # Adding the zero point in float32 is exact below 2**24 and saturates above it anyway.
    q = np.asarray(np.divide(np.asarray(x, np.float32), scale, dtype=np.float32))
    np.rint(q, out=q)
    q += zp
    np.clip(q, qp.spec.qmin, qp.spec.qmax, out=q)
    return q, scale, zp


def quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point)."""
    return _quantized_float(x, qp)[0].astype(qp.spec.numpy_dtype)


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    scale = _broadcast(qp.scale, q, qp.axis).astype(np.float32)
    zp = _broadcast(qp.zero_point, q, qp.axis).astype(np.int32)
    return ((q.astype(np.int32) - zp) * scale).astype(np.float32)


def fake_quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """dequantize(quantize(x)), computed in float32 in place. Same values: specs have at
    most 8 bits, so q and q − zp are exact in float32, and a float32 product rounds once."""
    q, scale, zp = _quantized_float(x, qp)
    q -= zp
    q *= scale
    return q


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """10·log10(Σx² / Σ(x − x̂)²); +inf when exact."""
    ref = np.asarray(reference, dtype=np.float64)
    err = ref - np.asarray(approx, dtype=np.float64)
    noise = float(np.sum(err * err))
    signal = float(np.sum(ref * ref))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return (
        1.0 if denom == 0.0 and not a.any() and not b.any() else float(a @ b) / max(denom, 1e-300)
    )
