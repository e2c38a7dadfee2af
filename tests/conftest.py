"""Shared fixtures: a tiny generated corpus and helpers to run the real entry points."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# No test may reach for a model hub: fail fast instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Feature caches and converted weights of this session go to a fresh folder, never the user's own.
os.environ["TOKENSEL_CACHE"] = tempfile.mkdtemp(prefix="tokensel-test-cache-")

TINY_TRAIN = {"coco": 40, "docvqa": 24, "chartqa": 16}  # uneven on purpose
TINY_VAL = {"coco": 8, "docvqa": 6, "chartqa": 4}
# Small enough to run in seconds on 2 CPU cores: a tiny random-init ViT, not the laptop default's
# pretrained DINOv2 (tests of the real weights name it themselves).
FAST_ARGS = [
    "encoder.name=timm:vit_tiny_patch16_224", "encoder.pretrained=", "encoder.image_size=64", "data.recon_size=32", "data.batch_size=8", "data.num_workers=0",
    "data.shuffle_buffer=16", "selector.depth=1", "selector.reconstructor_depth=1",
    "selector.image_decoder_depth=1", "selector.image_decoder_channels=32",
    "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    "run.panels_every_n_steps=2",
]


LLAVA_CAPTIONS = ["a dog sitting on a red couch next to a window", "two people riding bikes down a busy street",
                  "a plate of food with broccoli and rice", "a cat"]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A generated corpus in the real shard format, with uneven shards per source."""
    from tokensel.datamodules.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(root, seed=0, train=TINY_TRAIN, val=TINY_VAL, max_samples_per_shard=7)
    return root


def run_module(module: str, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m <module> args`` from the repo root, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a run folder's TensorBoard events (the reports' own reader, imported late
    so that collecting the tests stays light)."""
    from tokensel.experiments.report import read_scalars as read

    return read(run_dir)


def read_image_tags(run_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    acc.Reload()
    return acc.Tags()["images"]


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """A tiny random LLaVA (CLIP 32px/8px patches, 2-layer Llama) with a byte-level BPE tokenizer
    trained here, saved like a hub folder: config, safetensors, tokenizer, preprocessor config."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    from tokensel.selectors.vlm_llava import LLAVA15_CHAT_TEMPLATE

    corpus = LLAVA_CAPTIONS + ["USER: ASSISTANT: Provide a one-sentence caption for the provided image.",
                         "what is the total revenue in 2020? the answer is 42"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        extra_special_tokens={"image_token": "<image>"})
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=16,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llava_tiny")
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    images.save_pretrained(folder)
    LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=LLAVA15_CHAT_TEMPLATE).save_pretrained(folder)
    return folder


# (height, width) grids of the tiny LLaVA-NeXT: images of different shapes get 3 or 5 views.
TINY_NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


@pytest.fixture(scope="session")
def tiny_llava_next(tiny_llava, tmp_path_factory):
    """A tiny random LLaVA-NeXT (the tiny LLaVA's tower, LLM and tokenizer; anyres views of 32 px
    over TINY_NEXT_PINPOINTS), saved like a hub folder."""
    import torch
    from transformers import (AutoTokenizer, LlavaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    from tokensel.selectors.vlm_llava import LLAVA15_CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(tiny_llava)
    small = LlavaConfig.from_pretrained(tiny_llava)
    small.text_config.max_position_embeddings = 256  # up to 5 views of 16 tokens, plus newlines
    config = LlavaNextConfig(vision_config=small.vision_config, text_config=small.text_config,
                             image_token_index=small.image_token_id, image_grid_pinpoints=TINY_NEXT_PINPOINTS)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llava_next_tiny")
    LlavaNextForConditionalGeneration(config).save_pretrained(folder)
    images = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                     image_grid_pinpoints=TINY_NEXT_PINPOINTS)
    LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       chat_template=LLAVA15_CHAT_TEMPLATE).save_pretrained(folder)
    return folder
