"""Torch exports for the corpus: transformers architectures at random init (fixed seed,
small configs), exported with both torch exporters at several opsets, dynamic batch (and
sequence) axes. Random weights are fine for structure, speed and FP32 equivalence, never
for accuracy claims.

`python -m benchmarks.corpus_torch` exports them into `$QCOMPILE_CACHE/corpus/` (default
~/.cache/qcompile/corpus; needs the zoo extra: torch and transformers); `benchmarks.corpus`
then picks up every exported file. A model an exporter cannot export is listed in
`export_failures.txt` there, with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.zoo import cache_dir

SEED = 0


def corpus_dir() -> Path:
    return cache_dir() / "corpus"


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable  # () -> torch module returning one tensor
    inputs: Callable[[np.random.Generator], dict[str, np.ndarray]]
    kind: str  # "vision" | "text" | "seq2seq" | "audio"


def _image(size=32, channels=3):
    return lambda rng: {
        "pixel_values": rng.standard_normal((1, channels, size, size)).astype(np.float32)
    }


def _tokens(vocab=1000, seq=16, mask=True):
    def make(rng):
        feed = {"input_ids": rng.integers(0, vocab, (1, seq)).astype(np.int64)}
        if mask:
            feed["attention_mask"] = np.ones((1, seq), np.int64)
        return feed

    return make


def _first(module_cls, config, **call):
    """An HF model wrapped to return its first output tensor (logits / hidden states)."""
    import torch

    class First(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = module_cls(config).eval()

        def forward(self, *args):
            names = list(call)
            out = self.model(**dict(zip(names, args, strict=True)), return_dict=True)
            return out[0] if not hasattr(out, "logits") else out.logits

    return First().eval()


def _vision(name, cls, cfg_cls, size=32, **cfg):
    import transformers as t

    return Arch(
        name,
        lambda: _first(getattr(t, cls), getattr(t, cfg_cls)(**cfg), pixel_values=None),
        _image(size, cfg.get("num_channels", 3)),
        "vision",
    )


def _text(name, cls, cfg_cls, vocab=1000, mask=True, **cfg):
    import transformers as t

    names = {"input_ids": None, **({"attention_mask": None} if mask else {})}
    return Arch(
        name,
        lambda: _first(getattr(t, cls), getattr(t, cfg_cls)(**cfg), **names),
        _tokens(vocab, mask=mask),
        "text",
    )


SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
LM = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
          intermediate_size=128, max_position_embeddings=64, use_cache=False)  # fmt: skip


def architectures() -> list[Arch]:
    return [
        _vision("vit", "ViTForImageClassification", "ViTConfig", image_size=32, patch_size=8, **SMALL),
        _vision("deit", "DeiTForImageClassification", "DeiTConfig", image_size=32, patch_size=8, **SMALL),
        _vision("beit", "BeitForImageClassification", "BeitConfig", image_size=32, patch_size=8, **SMALL),
        _vision("swin", "SwinForImageClassification", "SwinConfig", image_size=32, patch_size=4,
                embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4),
        _vision("convnext", "ConvNextForImageClassification", "ConvNextConfig",
                hidden_sizes=[16, 32], depths=[1, 1], num_stages=2),
        _vision("convnextv2", "ConvNextV2ForImageClassification", "ConvNextV2Config",
                hidden_sizes=[16, 32], depths=[1, 1], num_stages=2),
        _vision("resnet", "ResNetForImageClassification", "ResNetConfig",
                embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck"),
        _vision("regnet", "RegNetForImageClassification", "RegNetConfig",
                embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8),
        _vision("mobilenet_v2", "MobileNetV2ForImageClassification", "MobileNetV2Config",
                image_size=32, depth_multiplier=0.35),
        _vision("mobilenet_v1", "MobileNetV1ForImageClassification", "MobileNetV1Config",
                image_size=32, depth_multiplier=0.25),
        _vision("efficientnet", "EfficientNetForImageClassification", "EfficientNetConfig",
                image_size=32, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320),
        _vision("mobilevit", "MobileViTForImageClassification", "MobileViTConfig", image_size=32,
                hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64]),
        _vision("segformer", "SegformerForSemanticSegmentation", "SegformerConfig",
                num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                decoder_hidden_size=32, num_labels=4),
        _vision("levit", "LevitForImageClassification", "LevitConfig", image_size=32,
                hidden_sizes=[32, 48], num_attention_heads=[2, 2], depths=[1, 1], key_dim=[8, 8],
                down_ops=[["Subsample", 8, 2, 4, 2, 2]], attention_ratio=[2, 2], mlp_ratio=[2, 2]),
        _vision("poolformer", "PoolFormerForImageClassification", "PoolFormerConfig",
                hidden_sizes=[16, 32], depths=[1, 1], num_encoder_blocks=2,
                patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1]),
        _vision("dinov2", "Dinov2Model", "Dinov2Config", image_size=32, patch_size=8, **SMALL),
        _vision("yolos", "YolosForObjectDetection", "YolosConfig", image_size=[32, 32],
                patch_size=8, num_detection_tokens=4, **SMALL),
        _text("bert", "BertModel", "BertConfig", vocab_size=1000, max_position_embeddings=64, **SMALL),
        _text("distilbert", "DistilBertModel", "DistilBertConfig", vocab_size=1000, dim=64,
              n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64),
        _text("roberta", "RobertaModel", "RobertaConfig", vocab_size=1000,
              max_position_embeddings=64, **SMALL),
        _text("albert", "AlbertModel", "AlbertConfig", vocab_size=1000, embedding_size=32,
              max_position_embeddings=64, **SMALL),
        _text("electra", "ElectraModel", "ElectraConfig", vocab_size=1000, embedding_size=32,
              max_position_embeddings=64, **SMALL),
        _text("mpnet", "MPNetModel", "MPNetConfig", vocab_size=1000, max_position_embeddings=64, **SMALL),
        _text("deberta_v2", "DebertaV2Model", "DebertaV2Config", vocab_size=1000,
              max_position_embeddings=64, **SMALL),
        _text("gpt2", "GPT2LMHeadModel", "GPT2Config", vocab_size=1000, n_embd=64, n_layer=2,
              n_head=4, n_positions=64, use_cache=False),
        _text("gpt_neo", "GPTNeoForCausalLM", "GPTNeoConfig", vocab_size=1000, hidden_size=64,
              num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
              max_position_embeddings=64, window_size=8, use_cache=False),
        _text("opt", "OPTForCausalLM", "OPTConfig", vocab_size=1000, hidden_size=64,
              num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64,
              max_position_embeddings=64, use_cache=False),
        _text("llama", "LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2, **LM),
        _text("mistral", "MistralForCausalLM", "MistralConfig", num_key_value_heads=2, **LM),
        _text("qwen2", "Qwen2ForCausalLM", "Qwen2Config", num_key_value_heads=2, **LM),
        _text("phi", "PhiForCausalLM", "PhiConfig", **LM),
        _text("gemma", "GemmaForCausalLM", "GemmaConfig", num_key_value_heads=2, head_dim=16, **LM),
        _text("bloom", "BloomForCausalLM", "BloomConfig", vocab_size=1000, hidden_size=64,
              n_layer=2, n_head=4, use_cache=False),
        _seq2seq("t5", "T5ForConditionalGeneration", "T5Config", vocab_size=1000, d_model=64,
                 d_kv=16, d_ff=128, num_layers=2, num_heads=4, use_cache=False),
        _seq2seq("bart", "BartForConditionalGeneration", "BartConfig", vocab_size=1000,
                 d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                 max_position_embeddings=64, use_cache=False),
    ]  # fmt: skip


def _seq2seq(name, cls, cfg_cls, **cfg):
    import transformers as t

    names = {"input_ids": None, "attention_mask": None, "decoder_input_ids": None}

    def inputs(rng):
        return {
            **_tokens(1000)(rng),
            "decoder_input_ids": rng.integers(0, 1000, (1, 16)).astype(np.int64),
        }

    return Arch(
        name,
        lambda: _first(getattr(t, cls), getattr(t, cfg_cls)(**cfg), **names),
        inputs,
        "seq2seq",
    )


# (exporter, opset): TorchScript at an old and the default opset; dynamo at its default
EXPORTS = (("torchscript", 14), ("torchscript", 17), ("dynamo", 18))
# CNN-only architectures also at opset 11 (what older deployment stacks pin)
OPSET11 = ("resnet", "regnet", "mobilenet_v1", "mobilenet_v2", "efficientnet", "convnext")
# a few also at the newest opset the dynamo exporter writes
NEWEST = 23
AT_NEWEST = ("resnet", "mobilenet_v2", "vit", "bert", "gpt2", "llama")


def export(arch: Arch, exporter: str, opset: int, out: Path) -> None:
    import torch

    torch.manual_seed(SEED)
    module = arch.build()
    feed = arch.inputs(np.random.default_rng(SEED))
    # batch 2: torch.export specializes a size-1 dim to a constant
    feed = {k: np.concatenate([v, v]) for k, v in feed.items()}
    names = list(feed)
    args = tuple(torch.from_numpy(v) for v in feed.values())
    axes = {
        n: ({0: "batch", 1: "sequence"} if v.ndim == 2 else {0: "batch"}) for n, v in feed.items()
    }
    if exporter == "dynamo":
        batch, sequence = (
            torch.export.Dim("batch", max=64),
            torch.export.Dim("sequence", min=2, max=64),
        )
        # forward(*args): one entry for the varargs tuple, one spec per input in it
        dims = (
            tuple({0: batch, 1: sequence} if v.ndim == 2 else {0: batch} for v in feed.values()),
        )
        program = torch.onnx.export(module, args, input_names=names, output_names=["output"],
                                    opset_version=opset, dynamo=True, dynamic_shapes=dims,
                                    external_data=False)  # fmt: skip
        program.save(str(out))
    else:
        torch.onnx.export(module, args, str(out), input_names=names, output_names=["output"],
                          opset_version=opset, dynamic_axes=axes, dynamo=False)  # fmt: skip


def export_all(only: str | None = None) -> list[str]:
    folder = corpus_dir()
    folder.mkdir(parents=True, exist_ok=True)
    failures = []
    for arch in architectures():
        if only and only not in arch.name:
            continue
        plans = list(EXPORTS) + ([("torchscript", 11)] if arch.name in OPSET11 else [])
        plans += [("dynamo", NEWEST)] if arch.name in AT_NEWEST else []
        for exporter, opset in plans:
            out = folder / f"{arch.name}.{exporter}.opset{opset}.onnx"
            if out.exists():
                continue
            start = time.perf_counter()
            try:
                export(arch, exporter, opset, out)
                print(f"exported {out.name} in {time.perf_counter() - start:.1f}s", flush=True)
            except Exception as exc:  # noqa: BLE001 - recorded, the corpus goes on
                out.unlink(missing_ok=True)
                text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # the exporter colours its text
                reason = f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"
                failures.append(f"{out.name}\t{reason}")
                print(f"FAILED {out.name}: {reason}", flush=True)
                if os.environ.get("QCOMPILE_DEBUG"):
                    traceback.print_exc()
    # keep the failures of models this run did not try again
    listed = folder / "export_failures.txt"
    tried = {f.split("\t")[0] for f in failures} | {p.name for p in folder.glob("*.onnx")}
    earlier = listed.read_text().splitlines() if listed.exists() else []
    kept = [
        f
        for f in earlier
        if f and f.split("\t")[0] not in tried and (only is None or only not in f.split(".")[0])
    ]
    listed.write_text("\n".join(sorted(kept + failures)) + "\n")
    (folder / "feeds.json").write_text(json.dumps({a.name: a.kind for a in architectures()}))
    return failures


def exported_models() -> list:
    """CorpusModel entries for every export in the cache (none when nothing was exported)."""
    import onnx

    from benchmarks.corpus import CorpusModel, calibration_feeds

    folder = corpus_dir()
    by_name = {a.name: a for a in architectures()} if folder.exists() else {}
    entries = []
    for path in sorted(folder.glob("*.onnx")) if folder.exists() else []:
        arch = by_name.get(path.name.split(".")[0])
        if arch is None:
            continue

        def feeds(model, arch=arch):
            rng = np.random.default_rng(SEED)
            given = []
            for _ in range(10):
                feed = arch.inputs(rng)
                feed = {k: np.concatenate([v, arch.inputs(rng)[k]]) for k, v in feed.items()}
                given.append(feed)  # batch 2: the dynamic axis is exercised
            return calibration_feeds(model, given)

        entries.append(
            CorpusModel(
                path.stem,
                "torch/" + path.name.split(".")[1],
                lambda p=path: onnx.load(str(p)),
                feeds,
                (arch.kind,),
            )  # fmt: skip
        )
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.corpus_torch")
    parser.add_argument("--only", default=None)
    args = parser.parse_args(argv)
    failures = export_all(args.only)
    print(f"{len(failures)} export failures (listed in {corpus_dir() / 'export_failures.txt'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
