"""``timm_cnn:<model>``: a CNN's final feature map as tokens, and one-line errors for what it cannot do."""

import pytest
import torch

from tokensel.datamodules.encoders import EncoderError, build_encoder

NAME = "timm_cnn:tf_efficientnet_lite0"


def test_tokens_are_the_final_feature_map_in_raster_order():
    enc = build_encoder(NAME, image_size=96)
    assert enc.grid == (3, 3) and enc.dim == 1280 and enc.preprocess.size == (96, 96)
    assert enc.preprocess.mean == (0.5, 0.5, 0.5)  # timm's data config of the model
    x = torch.randn(2, 3, 96, 96)
    out = enc(x)
    with torch.no_grad():
        fmap = enc.model.forward_features(x)  # (2, 1280, 3, 3)
    assert out.shape == (2, 9, 1280)
    assert torch.equal(out[:, 1 * 3 + 2], fmap[:, :, 1, 2])  # token (row 1, column 2)


def test_default_size_is_the_models_own():
    enc = build_encoder(NAME)
    assert enc.preprocess.size == (224, 224) and enc.grid == (7, 7) and enc.num_tokens == 49


@pytest.mark.parametrize("kwargs, words", [
    ({"layer": -2}, ["encoder.layer=-2", "use encoder.layer=-1"]),
    ({"name": "timm_cnn:vit_tiny_patch16_224"}, ["timm_cnn:vit_tiny_patch16_224", "encoder.name=timm:vit_tiny_patch16_224"]),
    ({"name": "timm_cnn:no_such_net"}, ["timm_cnn:no_such_net", "no such model"]),
])
def test_what_a_cnn_cannot_do_is_one_line(kwargs, words):
    with pytest.raises(EncoderError) as err:
        build_encoder(**{"name": NAME, "image_size": 64, **kwargs})
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_no_cls_attention():
    enc = build_encoder(NAME, image_size=64)
    with pytest.raises(EncoderError, match="has no CLS token .a convolutional network."):
        enc.check_cls_attention(-1)
