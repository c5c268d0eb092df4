"""Dyadic requantization (HAWQ-V3): a real rescale factor as m / 2**s, applied in integers.

An integer-only graph turns an int32 accumulator `acc` (real value acc·s_in) into the
next layer's integers (real value (y − zp)·s_out) with

    y = clamp( round_half_even(acc · m / 2**s) + zp, qmin, qmax ),   m / 2**s ≈ s_in / s_out

with 0 <= m < 2**31 and 1 <= s <= 61. Rounding is **half to even**, as ONNX QuantizeLinear
rounds. Round-half-up (add half, shift) is one op cheaper, but with power-of-two scales
(FPGA target) exact ties are frequent — a shift by k leaves a tie in one value of 2**k —
and always rounding them up biases every layer the same way: it cost 1.6 dB of output
SQNR on the test CNN, which half-to-even gives back.

ONNX's BitShift is defined for unsigned types only, so the signed shift is built from
standard ops on a biased value (`_Emitter.requantize` in integer.py):

    p = acc·m                            |acc| <= 2**31, m < 2**31  =>  |p| < 2**62
    u = p + 2**(s−1) + 2**62             0 <= u < 2**63: exact in int64 and uint64
    q = u >> s                           = floor((p + 2**(s−1)) / 2**s) + 2**(62−s), because
                                           2**62 / 2**s is an integer
    tie = (q << s) == u                  p + 2**(s−1) divisible by 2**s: p was exactly half-way
    q −= tie · (q − ((q >> 1) << 1))     ties go to the even neighbour; q and the result
                                           differ by 2**(62−s), which is even for s <= 61
    r = q − 2**(62−s)
So every step is an exact integer operation for every int32 accumulator;
`tests/test_integer.py` checks the boundaries (±2**31, m = 2**31 − 1, s = 1 and 61, ties)
in ONNX Runtime against Python's unbounded integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MULTIPLIER_BITS = 31  # m < 2**31
MIN_SHIFT = 1  # s >= 1 so that the tie test below always has a bit to look at
MAX_SHIFT = 61  # s <= 61 keeps 2**(62−s) even, so parity survives the bias
BIAS = 1 << 62


@dataclass(frozen=True)
class Dyadic:
    """m / 2**s, elementwise (0-d for per-tensor, 1-d for per-channel)."""

    multiplier: np.ndarray  # int64, in [0, 2**31)
    shift: np.ndarray  # int64, in [0, 62]

    @property
    def value(self) -> np.ndarray:
        return self.multiplier.astype(np.float64) / np.exp2(self.shift.astype(np.float64))


class DyadicRangeError(ValueError):
    """A requantization factor no int32 multiplier and shift can express (scales that
    differ by 2**31 or more: e.g. vanishing activations of a random-init model)."""


def to_dyadic(real: np.ndarray | float, *, max_multiplier_bits: int = MULTIPLIER_BITS) -> Dyadic:
    """The closest m / 2**s to `real` (>= 0) with m < 2**max_multiplier_bits.

    Powers of two (power-of-two scales on the FPGA target) come out as m = 1 or 2**k:
    requantization is then a shift only. Otherwise m is normalized into
    [2**(bits−1), 2**bits), the finest representation; factors too small for s <= 62 round
    to 0 (the output is then constant, which is what the real factor says to 2**-62).
    """
    real = np.asarray(real, dtype=np.float64)
    limit = 1 << max_multiplier_bits
    if np.any(real < 0) or not np.all(np.isfinite(real)) or np.any(real >= limit):
        raise DyadicRangeError(
            f"requantization factors must be in [0, 2**{max_multiplier_bits}), got "
            f"{float(np.max(real)) if real.size else 0.0:.3g}"
        )
    mantissa, exponent = np.frexp(real)  # real = mantissa · 2**exponent, mantissa in [0.5, 1)
    pow2 = mantissa == 0.5
    # general case: m = round(mantissa · 2**bits), s = bits − exponent
    shift = max_multiplier_bits - exponent.astype(np.int64)
    multiplier = np.rint(mantissa * limit).astype(np.int64)
    # mantissa rounding up to 1.0 gives m == 2**bits: halve it (exact) and shift one less
    carry = multiplier >= limit
    multiplier = np.where(carry, multiplier // 2, multiplier)
    shift = np.where(carry, shift - 1, shift)
    # exact powers of two: m = 1, s = −log2(real) (or m = real, s = 0 when real >= 1)
    p2_shift = 1 - exponent.astype(np.int64)
    multiplier = np.where(pow2 & (p2_shift >= 0), 1, multiplier)
    shift = np.where(pow2 & (p2_shift >= 0), p2_shift, shift)
    # too small for s <= 61: shift the multiplier down instead (it may reach 0)
    over = np.maximum(shift - MAX_SHIFT, 0)
    multiplier = np.where(over > 0, rounding_shift(multiplier, over), multiplier)
    shift = np.minimum(shift, MAX_SHIFT)
    # s = 0 (factors >= 2**30): one more bit of shift, the multiplier doubled, when it fits
    low = (shift < MIN_SHIFT) & (multiplier < limit // 2)
    multiplier = np.where(low, multiplier * 2, multiplier)
    shift = np.where(low, shift + 1, shift)
    zero = real == 0
    multiplier = np.where(zero, 0, multiplier).astype(np.int64)
    shift = np.where(zero, MIN_SHIFT, shift).astype(np.int64)
    if np.any(shift < MIN_SHIFT):
        raise ValueError("requantization factor too large for a 31-bit multiplier")
    return Dyadic(multiplier, shift)


def to_dyadic_saturating(real: float, out_span: int) -> Dyadic:
    """`to_dyadic`, except that a factor of 2**31 or more, for an output of at most 2**17
    codes, becomes the largest factor expressed here (m = 2**31 − 1, s = 1, about 2**30):
    one input step then already overflows the output range at either factor, so every
    nonzero input saturates and zero gives the zero point — exactly what the real factor
    gives. Such factors come from calibrated ranges that vanish: a random-init MobileViT
    concatenates a branch calibrated at ~1e-29 with an all-zero one (scale 1)."""
    if real >= 1 << MULTIPLIER_BITS and np.isfinite(real) and out_span <= 1 << 17:
        return Dyadic(np.asarray((1 << MULTIPLIER_BITS) - 1, np.int64), np.asarray(1, np.int64))
    return to_dyadic(real)


def rounding_shift(p: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """p / 2**s rounded half to even, on int64 (s = 0: p itself) — the reference semantics."""
    p = np.asarray(p, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    half = np.where(shift > 0, np.left_shift(np.int64(1), np.maximum(shift - 1, 0)), 0)
    up = p + half
    r = np.right_shift(up, shift)
    tie = (shift > 0) & (np.left_shift(r, shift) == up)
    return r - (tie & (r & 1).astype(bool)).astype(np.int64)


def requantize(
    acc: np.ndarray, d: Dyadic, zero_point: int | np.ndarray, qmin: int, qmax: int
) -> np.ndarray:
    """The reference: clamp(round_half_up(acc·m / 2**s) + zp, qmin, qmax), as int64."""
    p = np.asarray(acc, dtype=np.int64) * d.multiplier
    return np.clip(rounding_shift(p, d.shift) + np.asarray(zero_point, np.int64), qmin, qmax)


def shift_constants(d: Dyadic) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bias added before the unsigned shift, shift as uint64, bias removed after) for the
    biased-unsigned construction in the module docstring."""
    s = d.shift.astype(np.int64)
    half = np.where(s > 0, np.left_shift(np.int64(1), np.maximum(s - 1, 0)), 0)
    before = (half + BIAS).astype(np.int64)
    after = np.right_shift(np.int64(BIAS), s).astype(np.int64)
    return before, s.astype(np.uint64), after
