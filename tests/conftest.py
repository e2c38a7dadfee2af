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
# Feature caches and converted weights of a test run go to a fresh folder, never the user's own.
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

    from tokensel.vlms.llava import LLAVA15_CHAT_TEMPLATE

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

    from tokensel.vlms.llava import LLAVA15_CHAT_TEMPLATE

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


# ---- Qwen-VL: byte-level tokenizer with Qwen's special tokens, a Qwen-style chat template ----------
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
QWEN_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
                      "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
                      "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                      "{% endif %}")
# Tiny Qwen-VL images: min_pixels = 2 x 2 merged tokens, max_pixels = 4 x 4; side = patch x merge.
QWEN_LIMITS = (2, 4)


def qwen_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(LLAVA_CAPTIONS + ["user assistant Provide a one-sentence caption for the provided image.",
                                              "what is the total revenue in 2020? the answer is 42"],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN_SPECIAL, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                                         "vision_start_token": "<|vision_start|>",
                                                         "vision_end_token": "<|vision_end|>"})


def save_tiny_qwen(folder, config_cls, model_cls, processor_cls, video_cls, vision: dict, text: dict, patch: int):
    """A tiny random Qwen-VL saved like a hub folder: config, safetensors, tokenizer, processor."""
    import torch
    from transformers import Qwen2VLImageProcessor

    tokenizer = qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    config = config_cls(
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": patch,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 32, **vision},
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512,
                     "bos_token_id": None, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"], **text},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    model_cls(config).save_pretrained(folder)
    side = 2 * patch
    low, high = QWEN_LIMITS
    images = Qwen2VLImageProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                   min_pixels=(low * side) ** 2, max_pixels=(high * side) ** 2)
    processor_cls(image_processor=images, tokenizer=tokenizer, video_processor=video_cls(),
                  chat_template=QWEN_CHAT_TEMPLATE).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tmp_path_factory):
    """A tiny random Qwen2.5-VL (2-block windowed ViT, 14 px patches, 2 x 2 merger, 2-layer LLM with
    M-RoPE sections 2+3+3)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLVideoProcessor)

    return save_tiny_qwen(tmp_path_factory.mktemp("qwen2_5_vl_tiny"), Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLVideoProcessor,
                          {"window_size": 56, "fullatt_block_indexes": [1]},
                          {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4}},
                          patch=14)


@pytest.fixture(scope="session")
def tiny_qwen3_vl(tmp_path_factory):
    """A tiny random Qwen3-VL (2-block ViT, 16 px patches, DeepStack from block 0 into LLM layer 0)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor

    return save_tiny_qwen(tmp_path_factory.mktemp("qwen3_vl_tiny"), Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                          Qwen3VLProcessor, Qwen3VLVideoProcessor,
                          {"num_position_embeddings": 64, "deepstack_visual_indexes": [0]},
                          {"head_dim": 16, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3],
                                                              "mrope_interleaved": True, "rope_theta": 1e4}},
                          patch=16)


# The tiny model of every registered VLM family (vlms/): the contract tests loop over these.
FAMILY_FIXTURES = {"llava": "tiny_llava", "llava_next": "tiny_llava_next", "qwen2_5_vl": "tiny_qwen2_5_vl",
                   "qwen3_vl": "tiny_qwen3_vl"}
