"""vp_noise: the AutoSelect objective with a frozen CoCa, as a module and through training."""

from dataclasses import asdict

import lightning as L
import pytest
import torch

from conftest import FAST_ARGS, read_scalars, run_module
from tokensel.datamodules.batch import FeatureDims
from tokensel.experiments.config import ConfigError, load_config
from tokensel.selectors.budget import BudgetError
from tokensel.selectors.catalog import selector_entry

VP_FAST = [a for a in FAST_ARGS if not a.startswith(("selector.", "encoder."))] + [
    "selector.depth=1", "selector.tau_steps=10", "optim.lr=1e-3",
]
# the random coca_tiny with its own trunk as the encoder (the tests' VLM; the default is the corpus teacher)
COCA_TINY = ["encoder.name=open_clip:coca_tiny", "encoder.pretrained=", "encoder.layer=-1", "encoder.norm=false",
             "encoder.image_size=null", "selector.vlm.model=coca_tiny", "selector.vlm.pretrained="]
# the default corpus teacher, over the tests' tiny random ViT, trained briefly
TEACHER_FAST = [a for a in FAST_ARGS if a.startswith("encoder.")] + ["teacher.epochs=3", "teacher.lr=3e-3"]


def state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def encoder():
    from tokensel.datamodules.encoders import build_encoder

    return build_encoder("open_clip:coca_tiny", layer=-1, norm=False)


def make_module(encoder, **overrides):
    entry = selector_entry("vp_noise")
    config = entry.make_config()
    config.vlm.model = "coca_tiny"
    config.depth = 1
    for key, value in overrides.items():
        setattr(config, key, value)
    dims = FeatureDims(encoder.num_tokens, encoder.dim, encoder.grid, 32)
    return entry.module_cls(selector=asdict(config), dims=dims.as_dict())


def batch_of(encoder, n=4, targets=None):
    from tokensel.datamodules.batch import FeatureBatch

    torch.manual_seed(0)
    features = encoder(torch.randn(n, 3, *encoder.preprocess.size))
    targets = targets or [f"a photo of {w}" for w in ("a cat", "two dogs", "a red bus", "a chart")[:n]]
    prompts = ["", "", "What is shown?", ""][:n]
    return FeatureBatch(features, encoder.grid, torch.rand(n, 3, 32, 32), prompts, targets, ["coco"] * n,
                        [f"k{i}" for i in range(n)])


def test_training_step_reaches_scorer_and_denoiser_but_not_the_vlm(encoder):
    module = make_module(encoder).train()
    out = module.step(batch_of(encoder))
    assert torch.isfinite(out.loss) and out.loss > 0
    assert out.keep.shape == (4, encoder.num_tokens)
    assert torch.allclose(out.keep.sum(1), torch.full((4,), float(module.k)), atol=1e-3)  # sum(alpha) = K
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.net.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.denoiser.parameters())
    assert all(not p.requires_grad and p.grad is None for p in module.vlm.parameters())
    params = {id(p) for group in module.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert not params & {id(p) for p in module.vlm.parameters()}


def test_validation_compares_hard_topk_with_all_tokens(encoder):
    module = make_module(encoder).eval()
    with torch.no_grad():
        out = module.step(batch_of(encoder))
    assert set(out.scalars) >= {"ntp_topk", "ntp_full", "keep_ratio"}
    assert out.keep.sum(1).tolist() == [module.k] * 4  # a hard top-K mask
    assert out.scalars["keep_ratio"].item() == pytest.approx(module.k / encoder.num_tokens)


def test_empty_text_is_skipped_and_counted(encoder):
    module = make_module(encoder).train()
    out = module.step(batch_of(encoder, targets=["a cat", "", "  ", "a dog"]))
    assert out.n == 2 and module.empty_text == 2 and torch.isfinite(out.loss)
    everything_empty = module.step(batch_of(encoder, n=2, targets=["", ""]))
    assert everything_empty.n == 0 and everything_empty.loss.item() == 0.0


def test_checkpoint_leaves_out_the_vlm(encoder):
    module = make_module(encoder)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and not any(k.startswith("vlm.") for k in checkpoint["state_dict"])
    assert any(k.startswith("net.") for k in checkpoint["state_dict"])


@pytest.mark.parametrize("overrides", [{"k": 10_000}, {"k": None, "keep_ratio": 0.001}])
def test_budget_outside_0_n_is_a_clear_error(encoder, overrides):
    with pytest.raises(BudgetError, match="0 < K < N"):
        make_module(encoder, **overrides)


def test_backend_declares_its_encoder_and_a_mismatch_is_one_line():
    with pytest.raises(ConfigError) as err:
        load_config("vp_noise", overrides=COCA_TINY + ["encoder.name=timm:vit_tiny_patch16_224"])
    assert "encoder.name='open_clip:coca_tiny'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="selector.vlm.backend='gpt'"):
        load_config("vp_noise", overrides=["selector.vlm.backend=gpt"])
    with pytest.raises(ConfigError, match="/no/such/llava"):
        load_config("vp_noise", overrides=["selector.vlm.backend=llava", "selector.vlm.model=/no/such/llava"])


def test_frozen_encoder_and_vlm_are_bit_identical_after_training(tiny_corpus, tmp_path):
    from tokensel.datamodules.datamodule import FeatureDataModule

    config = load_config("vp_noise", overrides=VP_FAST + COCA_TINY + [
        f"data.root={tiny_corpus}", f"run.root={tmp_path}", "trainer.max_steps=3", "data.feature_cache=off"])
    L.seed_everything(0)
    datamodule = FeatureDataModule(config.data, config.encoder)
    entry = selector_entry("vp_noise")
    module = entry.module_cls(selector=asdict(config.selector), dims=datamodule.dims.as_dict(), optim=asdict(config.optim))
    encoder_before, vlm_before, scorer_before = state(datamodule.encoder), state(module.vlm), state(module.net)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    assert all(torch.equal(encoder_before[k], v) for k, v in state(datamodule.encoder).items())
    assert all(torch.equal(vlm_before[k], v) for k, v in state(module.vlm).items())
    assert not all(torch.equal(scorer_before[k], v) for k, v in state(module.net).items())


@pytest.mark.slow
def test_short_run_lowers_the_ntp_loss_and_logs_the_tags(tiny_corpus, tmp_path):
    args = VP_FAST + COCA_TINY + [f"data.root={tiny_corpus}", f"run.root={tmp_path}", "trainer.max_epochs=4",
                                  "trainer.log_every_n_steps=1"]
    result = run_module("tokensel.experiments.train", "vp_noise", *args, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scalars = read_scalars(tmp_path / "vp_noise" / "version_0")
    for tag in ("train/ntp", "train/tau", "train/keep_ratio", "train/alpha_entropy", "val/ntp_topk", "val/ntp_full"):
        assert scalars.get(tag), f"{tag} missing; have {sorted(scalars)}"
    ntp = [v for _, v in scalars["train/ntp"]]
    assert sum(ntp[-5:]) / 5 < sum(ntp[:5]) / 5, ntp
    tau = [v for _, v in scalars["train/tau"]]
    assert tau[0] == pytest.approx(2.0) and tau[-1] == pytest.approx(0.1)


@pytest.mark.slow
def test_the_default_vlm_is_the_corpus_teacher_built_first(tiny_corpus, tmp_path):
    """The default config's VLM, ``pretrained: corpus``, is built before training; the checkpoint names its file."""
    from tokensel.selectors.inference import read_checkpoint

    args = VP_FAST + TEACHER_FAST + [f"data.root={tiny_corpus}", f"run.root={tmp_path}", "trainer.max_steps=2"]
    result = run_module("tokensel.experiments.train", "vp_noise", *args, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "corpus teacher: building" in result.stdout and "trained, shuffled images" in result.stdout
    hp = read_checkpoint(tmp_path / "vp_noise" / "version_0" / "checkpoints" / "last.ckpt")["hyper_parameters"]
    teacher = hp["selector"]["vlm"]["pretrained"]
    assert teacher.endswith("open_clip_model.safetensors") and teacher in result.stdout


@pytest.mark.slow
def test_llava_backend_trains_end_to_end_and_the_scorer_loads_without_lightning(tiny_llava, tiny_corpus, tmp_path):
    from tokensel.selectors.catalog import load_selector

    args = VP_FAST + [f"data.root={tiny_corpus}", f"run.root={tmp_path}", "trainer.max_steps=3",
                      f"encoder.name=hf_llava:{tiny_llava}", "encoder.pretrained=", "encoder.layer=-2",
                      "encoder.norm=false", "encoder.image_size=null", "selector.vlm.backend=llava",
                      f"selector.vlm.model={tiny_llava}", "selector.vlm.pretrained="]
    result = run_module("tokensel.experiments.train", "vp_noise", *args, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "vp_noise" / "version_0"
    scalars = read_scalars(run_dir)
    assert len(scalars["train/ntp"]) == 3 and scalars["val/ntp_topk"] and scalars["val/ntp_full"]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("vlm.") for k in ckpt["state_dict"])
    scorer = load_selector(run_dir / "checkpoints" / "last.ckpt")
    features = torch.randn(2, scorer.dims.num_tokens, scorer.dims.dim)
    indices, kept = scorer.select(features, 4)
    assert indices.shape == (2, 4) and (indices[:, 1:] > indices[:, :-1]).all()
    assert torch.equal(kept[0], features[0, indices[0]])
