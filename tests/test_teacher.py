"""The corpus teacher: a CoCa head trained once over the run's encoder, found again by its
fingerprint, loaded by the coca backend with the encoder it needs."""

import json

import pytest
import torch

from conftest import FAST_ARGS
from tokensel.common.errors import TokenselError
from tokensel.experiments.config import ConfigError, load_config
from tokensel.experiments.teacher import (HEADROOM_DRAWS, ensure_teacher, find_teacher, format_headroom, held_out_headroom,
                                         lr_factor, teacher_folder)

TEACHER_ARGS = FAST_ARGS + ["teacher.epochs=3", "teacher.lr=3e-3", "teacher.eval_batch_size=8"]


def config_of(corpus, *extra):
    return load_config("vp_noise", overrides=[a for a in TEACHER_ARGS if not a.startswith("selector.")]
                       + [f"data.root={corpus}", *extra])


@pytest.fixture(scope="module")
def built(tiny_corpus):
    config = config_of(tiny_corpus)
    lines = []
    path = ensure_teacher(config, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    return config, path, "\n".join(lines)


def test_the_teacher_is_trained_measured_and_saved_with_its_encoder(built, tiny_corpus):
    config, path, printed = built
    record = json.loads((path.parent / "teacher.json").read_text())
    losses = record["losses"]
    assert losses["n"] == 18  # every val sample of the tiny corpus
    assert losses["real"]["mean"] < losses["init"]["mean"] - 2  # it learned the corpus's text
    for label in ("head at init", "trained, real images", "trained, shuffled images", "real - shuffled"):
        assert label in printed
    room = record["headroom"]
    assert room["draws"] == HEADROOM_DRAWS and room["of"] == 16 and room["keep"] == 4  # 25 % of the tiny images' 16
    assert room["spread"]["n"] == 18 and room["verdict"] in ("separable", "within noise")
    assert room["answer_first_minus_random"]["n"] >= 1  # the tiny corpus's documents and charts have boxes
    assert "headroom: 4 of 16 tokens" in printed and "answer box first - random" in printed
    meta = record["meta"]
    assert meta["encoder"]["name"] == "timm:vit_tiny_patch16_224" and meta["width"] == 192
    assert meta["encoder"]["weights"] == "random(init_seed=0)"


def test_a_second_call_reuses_it_and_another_encoder_or_recipe_does_not(built, tiny_corpus):
    config, path, _ = built
    stamp = path.stat().st_mtime_ns
    lines = []
    assert ensure_teacher(config, log=lambda *a, **k: lines.append(" ".join(map(str, a)))) == path
    assert path.stat().st_mtime_ns == stamp and "building" not in "".join(lines)
    assert find_teacher(config_of(tiny_corpus, "encoder.init_seed=1")) is None
    assert teacher_folder(config_of(tiny_corpus, "teacher.epochs=4")) != path.parent


def test_the_coca_backend_loads_the_head_and_asks_for_its_encoder(built, tiny_corpus):
    from safetensors.torch import load_file

    from tokensel.selectors.vlm import VLMConfig
    from tokensel.selectors.vlm_backends import build_vlm, required_encoder

    config, path, _ = built
    cfg = VLMConfig(backend="coca", model="coca_head", pretrained=str(path))
    need = required_encoder(cfg)
    assert (need.name, need.layer, need.norm) == ("timm:vit_tiny_patch16_224", -1, True)
    vlm = build_vlm(cfg)
    saved = load_file(str(path))
    assert torch.equal(vlm.attn_pool.attn.k_proj_weight, saved["visual.attn_pool.attn.k_proj_weight"])
    assert torch.equal(vlm.text_decoder.text_projection, saved["text_decoder.text_projection"])
    assert vlm.width == 192
    # the same file with other weights, or under another model name: one line each
    with pytest.raises(ConfigError) as err:
        config_of(tiny_corpus, f"selector.vlm.pretrained={path}", "encoder.init_seed=1")
    assert "encoder.weights" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(TokenselError, match="is a coca_head head, not coca_tiny"):
        build_vlm(VLMConfig(backend="coca", model="coca_tiny", pretrained=str(path)))
    with pytest.raises(TokenselError, match="pretrained=corpus"):
        build_vlm(VLMConfig(backend="coca", model="coca_head", pretrained="corpus"))


def test_make_eval_uses_the_teacher_as_its_ntp_vlm_when_it_is_built(built, tiny_corpus):
    from tokensel.experiments.eval_group import ntp_vlm

    config, path, _ = built
    vlm, what = ntp_vlm(config, [])
    assert vlm is not None and str(path) in what
    vlm, what = ntp_vlm(config_of(tiny_corpus, "encoder.init_seed=1"), [])
    assert vlm is None and "make teacher" in what


def test_teacher_keys_are_checked_with_the_run_config(tiny_corpus):
    with pytest.raises(ConfigError, match="teacher.epochs=0"):
        config_of(tiny_corpus, "teacher.epochs=0")


def test_the_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 100, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:])) and factors[-1] < 0.01


class OneTokenVLM(torch.nn.Module):
    """A stand-in VLM whose loss is 1 without token 0's feature among the kept ones, else 0: its
    loss depends on local evidence (token 0) and on nothing else."""

    def ntp_loss(self, tokens, prompt, target, indices=None):
        from types import SimpleNamespace

        loss = 1.0 - (tokens[..., 0] > 0.5).any(dim=1).float()
        return SimpleNamespace(loss=loss.mean(), per_sample=loss)


def test_headroom_sees_a_loss_that_depends_on_one_token_and_a_box_on_it():
    n, num_tokens = 40, 8
    feats = torch.zeros(n, num_tokens, 4)
    feats[:, 0, 0] = 1.0  # the evidence: token 0
    answer = torch.zeros(n, num_tokens, dtype=torch.bool)
    answer[:20, 0] = True  # half the samples have a box on it
    real = torch.zeros(n).numpy()  # with all tokens the evidence is always there
    sources = ["docvqa"] * 20 + ["coco"] * 20
    room = held_out_headroom(OneTokenVLM(), feats, [""] * n, ["x"] * n, answer, real, batch_size=16, seed=0,
                             sources=sources)
    assert room["keep"] == 2 and room["of"] == num_tokens and room["draws"] == HEADROOM_DRAWS
    # a random 2 of 8 holds token 0 a quarter of the time: the loss moves with the choice of tokens
    assert room["spread"]["mean"] > 0.2 and room["best_gain"]["mean"] > 0.5 and room["verdict"] == "separable"
    assert room["random_minus_all"]["mean"] > 0.5
    by_source = room["random_minus_all_by_source"]
    assert sorted(by_source) == ["coco", "docvqa"] and by_source["coco"]["n"] == 20
    assert by_source["coco"]["mean"] * 20 + by_source["docvqa"]["mean"] * 20 == pytest.approx(room["random_minus_all"]["mean"] * n)
    assert "    coco     n=20" in format_headroom(room)
    # keeping the box first always keeps token 0: loss 0, against a random set's
    assert room["answer_first_minus_random"]["n"] == 20 and room["answer_first_minus_random"]["mean"] < -0.5
    # per source, over the samples with a box only
    assert room["answer_first_minus_random_by_source"] == {"docvqa": room["answer_first_minus_random"]}


def test_make_teacher_on_another_vlm_measures_it_as_a_build_does_and_trains_nothing(built, tiny_corpus, capsys):
    from tokensel.experiments.teacher import main, teacher_base

    config, path, _ = built
    record = json.loads((path.parent / "teacher.json").read_text())
    before = sorted(teacher_base().iterdir())
    args = [a for a in TEACHER_ARGS if not a.startswith("selector.")] + [f"data.root={tiny_corpus}"]
    assert main(["vp_noise", *args, f"selector.vlm.pretrained={path}"]) == 0
    printed = capsys.readouterr().out
    assert sorted(teacher_base().iterdir()) == before and "building" not in printed
    assert "frozen VLM coca:coca_head" in printed and "head at init" not in printed
    real = record["losses"]["real"]["mean"]
    assert f"  real images                  {real:7.3f}" in printed  # the build's own figure
    spread = record["headroom"]["spread"]
    assert f"spread of the loss {spread['mean']:.4f} ± {spread['ci95']:.4f}" in printed
