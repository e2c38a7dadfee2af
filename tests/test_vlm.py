"""Frozen VLM backends: CoCa (``coca_tiny``, random init) and the ``hf`` backend on a tiny random LLaVA
built offline (every family's NTP head is in tests/test_vlm_families.py).

Real open_clip / transformers models, no mocks: shapes, gradients to the input tokens, frozen
parameters, loss only on the target, truncation, the encoders they require, and one-line errors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokensel.datamodules.encoders import EncoderError, build_encoder
from tokensel.selectors.vlm import VLMConfig, VLMError
from tokensel.selectors.vlm_backends import build_vlm, required_encoder

CAPTIONS = ["a dog sitting on a red couch next to a window", "two people riding bikes down a busy street",
            "a plate of food with broccoli and rice", "a cat"]


def _assert_frozen(vlm):
    assert not any(p.requires_grad for p in vlm.parameters())
    vlm.train()
    assert not vlm.training and not any(m.training for m in vlm.modules())


def _one_line(err: Exception, *names: str) -> str:
    message = str(err)
    assert "\n" not in message and message
    for name in names:
        assert name in message
    return message


# ---- coca ---------------------------------------------------------------------------------------
COCA = VLMConfig(backend="coca", model="coca_tiny")


@pytest.fixture(scope="module")
def coca():
    torch.manual_seed(0)
    return build_vlm(COCA)


@pytest.fixture(scope="module")
def coca_encoder():
    need = required_encoder(COCA)
    torch.manual_seed(1)
    return build_encoder(need.name, layer=need.layer, norm=need.norm)


def test_coca_requires_the_trunk_output_before_ln_post():
    need = required_encoder(COCA)
    assert (need.name, need.layer, need.norm) == ("open_clip:coca_tiny", -1, False)
    assert need.mismatch("open_clip:coca_tiny", -1, True) == "encoder.norm=False (got True)"
    with pytest.raises(VLMError) as err:
        required_encoder(VLMConfig(backend="coca", model="ViT-B-32"))
    _one_line(err.value, "ViT-B-32", "not a CoCa")
    with pytest.raises(VLMError) as err:
        required_encoder(VLMConfig(backend="coca", model="no_such_coca"))
    _one_line(err.value, "no_such_coca")


def test_coca_ntp_loss_shapes_gradient_and_frozen(coca):
    _assert_frozen(coca)
    tokens = torch.randn(4, 100, coca.width, requires_grad=True)
    out = coca.ntp_loss(tokens, [""] * 4, CAPTIONS)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert out.per_sample.shape == (4,) and torch.isfinite(out.per_sample).all()
    assert out.tokens.shape == (4,) and (out.tokens > 0).all()
    # loss = all target tokens' NLL / their count; per_sample = each sample's mean
    assert torch.allclose(out.loss, (out.per_sample * out.tokens).sum() / out.tokens.sum(), atol=1e-5)
    out.loss.backward()
    assert tokens.grad is not None and torch.isfinite(tokens.grad).all() and tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in coca.parameters())


def test_coca_loss_covers_only_the_target(coca):
    tokens = torch.randn(3, 49, coca.width)
    targets = CAPTIONS[:3]
    lengths = torch.tensor([len(coca.tokenizer.encode(t)) + 1 for t in targets])  # + the end-of-text token
    with torch.no_grad():
        bare = coca.ntp_loss(tokens, [""] * 3, targets)
        prompted = coca.ntp_loss(tokens, ["what is in this picture?", "describe it", "a long question " * 5], targets)
    assert torch.equal(bare.tokens, lengths)
    assert torch.equal(prompted.tokens, lengths)  # the prompt adds context, never labels
    assert not torch.allclose(bare.per_sample, prompted.per_sample)
    # A sample's loss does not depend on the other samples (padding) in its batch
    with torch.no_grad():
        alone = coca.ntp_loss(tokens[1:2], ["describe it"], targets[1:2])
    assert torch.allclose(alone.per_sample[0], prompted.per_sample[1], atol=1e-5)


def test_coca_matches_open_clip_caption_loss():
    """With the CLS token included, an empty prompt gives CoCa's own captioning loss."""
    import open_clip

    from tokensel.common.open_clip_configs import register_model_configs
    from tokensel.selectors.vlm_coca import CoCaVLM

    register_model_configs()
    torch.manual_seed(2)
    ref_model = open_clip.create_model("coca_tiny").eval()
    decoder = ref_model.text_decoder  # random init: give the (uninitialised) output projection values
    torch.nn.init.normal_(decoder.text_projection.data, std=decoder.width ** -0.5)
    tokenizer = open_clip.get_tokenizer("coca_tiny")
    images = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        out = ref_model(images, tokenizer(CAPTIONS[:2]))
        nll = F.cross_entropy(out["logits"].transpose(1, 2), out["labels"], ignore_index=0, reduction="none")
        expected = nll.sum(1) / (out["labels"] != 0).sum(1)
        trunk = ref_model.visual.forward_intermediates(images, indices=[-1], output_fmt="NLC", intermediates_only=True,
                                                       output_extra_tokens=True)
        with_cls = torch.cat([trunk["image_intermediates_prefix"][0], trunk["image_intermediates"][0]], 1)
        got = CoCaVLM(ref_model, tokenizer, 64).freeze().ntp_loss(with_cls, ["", ""], CAPTIONS[:2])
    assert torch.allclose(got.per_sample, expected, atol=1e-5)


@pytest.mark.parametrize("n", [100, 7, 1])
def test_coca_any_number_of_tokens(coca, n):
    tokens = torch.randn(2, n, coca.width, requires_grad=True)
    out = coca.ntp_loss(tokens, ["", ""], CAPTIONS[:2])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert tokens.grad.shape == (2, n, coca.width) and tokens.grad.abs().sum() > 0


def test_coca_truncation(coca):
    tokens = torch.randn(2, 20, coca.width)
    long_prompt = " ".join(f"word{i}" for i in range(400))
    with torch.no_grad():
        out = coca.ntp_loss(tokens, [long_prompt, ""], CAPTIONS[:2])
        assert torch.isfinite(out.loss)
        assert out.tokens.tolist() == [len(coca.tokenizer.encode(c)) + 1 for c in CAPTIONS[:2]]
        # a target longer than the budget keeps its start (no end-of-text label then)
        long_target = " ".join(["a dog"] * 200)
        out = coca.ntp_loss(tokens[:1], [long_prompt], [long_target])
        assert torch.isfinite(out.loss) and out.tokens.tolist() == [coca.budget]
    small = build_vlm(VLMConfig(backend="coca", model="coca_tiny", max_text_tokens=8))
    inputs, labels = small.text_ids(["one two three four five six", ""], ["a b c", "a b c d e f g h i j"])
    kept_prompt = inputs[0, 1:1 + 8 - 3].tolist()  # the prompt's last 5 tokens survive, its start is cut
    assert kept_prompt == small.tokenizer.encode("two three four five six")
    assert (labels[0] != -100).sum() == 4 and (labels[1] != -100).sum() == 8


def test_coca_encoder_end_to_end(coca, coca_encoder):
    assert coca_encoder.dim == coca.width and coca_encoder.grid == (10, 10)
    assert coca_encoder.preprocess.size == (160, 160)
    features = coca_encoder(torch.randn(2, 3, 160, 160))
    assert features.shape == (2, 100, coca.width) and not features.requires_grad
    tokens = features.clone().requires_grad_(True)
    out = coca.ntp_loss(tokens, ["", ""], CAPTIONS[:2])
    out.loss.backward()
    assert torch.isfinite(out.loss) and tokens.grad.abs().sum() > 0


def test_coca_weight_errors_are_one_line(tmp_path):
    missing = str(tmp_path / "coca.pt")
    with pytest.raises(VLMError) as err:
        build_vlm(VLMConfig(backend="coca", model="coca_tiny", pretrained=missing))
    _one_line(err.value, missing)
    with pytest.raises(VLMError) as err:
        build_vlm(VLMConfig(backend="coca", model="coca_ViT-B-32", pretrained="laion2b_s13b_b90k"))
    _one_line(err.value, "laion2b_s13b_b90k")


# ---- llava --------------------------------------------------------------------------------------
@pytest.mark.parametrize("library", ["hf", "hf_llava"])
def test_hf_llava_encoder_gives_the_projector_input(tiny_llava, library):
    from transformers import LlavaForConditionalGeneration

    enc = build_encoder(f"{library}:{tiny_llava}", layer=-2, norm=False)
    assert enc.grid == (4, 4) and enc.dim == 32 and enc.num_tokens == 16
    assert enc.preprocess.size == (32, 32) and enc.preprocess.interpolation == "bicubic"
    assert not any(p.requires_grad for p in enc.parameters())
    pixels = torch.randn(2, 3, 32, 32)
    features = enc(pixels)
    assert features.shape == (2, 16, 32)
    llava = LlavaForConditionalGeneration.from_pretrained(tiny_llava).eval()
    with torch.no_grad():
        expected = torch.stack(list(llava.model.get_image_features(pixel_values=pixels).pooler_output))
        assert torch.allclose(llava.model.multi_modal_projector(features), expected, atol=1e-5)
    # another layer gives other features
    assert not torch.allclose(build_encoder(f"{library}:{tiny_llava}", layer=-1, norm=False)(pixels), features)


@pytest.mark.parametrize("backend", ["hf", "llava"])
def test_llava_ntp_loss(tiny_llava, backend):
    from transformers import LlavaForConditionalGeneration

    cfg = VLMConfig(backend=backend, model=str(tiny_llava))
    need = required_encoder(cfg)
    library = "hf_llava" if backend == "llava" else "hf"
    assert (need.name, need.layer, need.norm) == (f"{library}:{tiny_llava}", -2, False)
    other = "hf" if backend == "llava" else "hf_llava"
    assert need.mismatch(f"{other}:{tiny_llava}", -2, False) is None  # two spellings, one encoder
    enc = build_encoder(need.name, layer=need.layer, norm=need.norm)
    vlm = build_vlm(cfg)
    _assert_frozen(vlm)
    pixels = torch.randn(3, 3, 32, 32)
    tokens = enc(pixels).requires_grad_(True)
    prompts = ["", "what is the total revenue in 2020?", "describe it"]
    targets = [CAPTIONS[0], "42", CAPTIONS[3]]
    out = vlm.ntp_loss(tokens, prompts, targets)
    assert out.loss.shape == () and torch.isfinite(out.loss) and out.per_sample.shape == (3,)
    out.loss.backward()
    assert torch.isfinite(tokens.grad).all() and tokens.grad.abs().sum() > 0
    # labels: the target's tokens + EOS, whatever the prompt
    head = vlm.head
    lengths = [len(head.tokenizer(" " + t, add_special_tokens=False).input_ids) + 1 for t in targets]
    assert out.tokens.tolist() == lengths
    with torch.no_grad():
        other = vlm.ntp_loss(tokens, ["a different and longer question about it?"] * 3, targets)
    assert other.tokens.tolist() == lengths and not torch.allclose(other.per_sample, out.per_sample)
    # the same loss as LLaVA's own forward on pixels, with the image token expanded and prompt labels masked
    llava = LlavaForConditionalGeneration.from_pretrained(tiny_llava).eval()
    for b in range(3):
        ids, is_label = head.conversation(prompts[b], targets[b], 16)
        at = ids.index(head.image_token_id)
        input_ids = ids[:at] + [head.image_token_id] * 16 + ids[at + 1:]
        labels = [-100] * (at + 16) + [i if lab else -100 for i, lab in zip(ids[at + 1:], is_label[at + 1:])]
        with torch.no_grad():
            ref = llava(input_ids=torch.tensor([input_ids]), pixel_values=pixels[b:b + 1], labels=torch.tensor([labels]))
        assert torch.allclose(out.per_sample[b], ref.loss, atol=1e-5)
    # fewer tokens (a top-K selection) and a prompt longer than the context both work
    kept = tokens.detach()[:, :5].requires_grad_(True)
    out = vlm.ntp_loss(kept, [" ".join(["revenue"] * 300), "", ""], targets)
    assert torch.isfinite(out.loss) and out.tokens.tolist() == lengths
    out.loss.backward()
    assert kept.grad.abs().sum() > 0


def test_llava_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "no_llava")
    with pytest.raises(EncoderError) as err:
        build_encoder(f"hf_llava:{missing}", layer=-2, norm=False)
    _one_line(err.value, missing, "no such local folder")
    with pytest.raises(VLMError) as err:
        build_vlm(VLMConfig(backend="llava", model=missing))
    _one_line(err.value, missing, "no such local folder")
    with pytest.raises(VLMError) as err:
        required_encoder(VLMConfig(backend="llava", model=missing))
    _one_line(err.value, missing)
    hub_id = "llava-hf/llava-1.5-7b-hf"
    with pytest.raises(EncoderError) as err:
        build_encoder(f"hf_llava:{hub_id}", layer=-2, norm=False)
    _one_line(err.value, hub_id, "HF_HUB_OFFLINE")
    with pytest.raises(VLMError) as err:
        build_vlm(VLMConfig(backend="llava", model=hub_id))
    _one_line(err.value, hub_id, "HF_HUB_OFFLINE")
