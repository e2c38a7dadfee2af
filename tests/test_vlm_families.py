"""The contract every VLM family of vlms/ meets, on its tiny random model (tests/conftest.py
FAMILY_FIXTURES): the full-token row is the model's own forward, greedy answers do not depend on
the batch, kept tokens carry the positions the option promises, per-image counts are right when
images differ, and the NTP head is the model's own loss. A family registered without a fixture
fails here."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAMILY_FIXTURES
from tokensel.common.errors import TokenselError
from tokensel.common.selection import SelectionContext
from tokensel.datamodules.batch import FeatureDims
from tokensel.selectors.budget import resolve_budget
from tokensel.selectors.catalog import build_baseline, build_net
from tokensel.vlms import FAMILIES, open_vlm

QUESTIONS = ["what is the total revenue in 2020?", "describe the image", "a cat", "two people riding bikes"]
FAMILY_NAMES = FAMILIES.names()


def test_every_registered_family_has_a_tiny_model():
    assert sorted(FAMILY_FIXTURES) == sorted(FAMILY_NAMES)


@pytest.fixture(scope="module")
def folders(request):
    return {name: request.getfixturevalue(fixture) for name, fixture in FAMILY_FIXTURES.items()}


@pytest.fixture(scope="module")
def loaded(folders):
    return {}


def vlm_of(folders, loaded, name, **options):
    """The family of ``name`` (model and processor loaded once), with ``options``."""
    if name not in loaded:
        loaded[name] = open_vlm(str(folders[name]))
    base = loaded[name]
    return type(base)(base.model, base.processor, **options) if options else base


def images(vlm, n: int, start: int = 0) -> list:
    """``n`` images of different sizes (a Qwen-VL gives each its own grid; a NeXT its own views)."""
    rng = np.random.default_rng(start)
    unit = getattr(vlm, "factor", None)  # Qwen-VL: one merged token is unit x unit pixels
    sizes = [(2 * unit + unit * i, 3 * unit - unit * (i % 2)) if unit else (32 + 8 * i, 40) for i in range(start, start + n)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def fixed(vlm):
    """The same model at one fixed resolution (4 x 4 merged tokens) where it varies by image."""
    return type(vlm)(vlm.model, vlm.processor, image_size=4 * vlm.factor) if vlm.variable_resolution else vlm


def trained_selector(vlm):
    """A vp_noise Scorer (random weights) at the family's candidate geometry: a trained selector."""
    n, width = vlm.candidate_geometry()
    return build_net("vp_noise", FeatureDims(n, width, vlm.fixed_grid(), 32), width=16, head_dim=8, depth=1)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_the_full_token_row_is_the_models_own_forward(folders, loaded, name):
    vlm = vlm_of(folders, loaded, name)
    pictures, questions = images(vlm, 2), QUESTIONS[:2]
    with torch.no_grad():
        own = vlm.model(**vlm.encode(pictures, questions)).logits[:, -1]
        ours = vlm.model(**vlm.prune(pictures, questions).inputs).logits[:, -1]
    assert torch.allclose(own, ours, atol=1e-5)


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("selector, budget", [(None, None), ("uniform", 4), ("divprune", 0.25), ("cdpruner", 0.25),
                                              ("trained", 0.25)])
def test_greedy_answers_at_batch_1_and_4_are_identical(folders, loaded, name, selector, budget):
    vlm = vlm_of(folders, loaded, name)
    if selector == "trained":
        vlm = fixed(vlm)
        chosen = trained_selector(vlm)
    else:
        chosen = build_baseline(selector, vlm.selection_grid) if selector else None
    pictures = images(vlm, 4)
    together = vlm.generate(pictures, QUESTIONS, chosen, budget, max_new_tokens=5)
    alone = [vlm.generate([p], [q], chosen, budget, max_new_tokens=5)[0] for p, q in zip(pictures, QUESTIONS)]
    assert together == alone and any(together)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_a_query_aware_selector_is_conditioned_on_the_question(folders, loaded, name):
    vlm = vlm_of(folders, loaded, name)
    cdpruner = build_baseline("cdpruner", vlm.selection_grid)
    picture = images(vlm, 1)
    kept = []
    for question in QUESTIONS:
        prompt = vlm.prune(picture, [question], cdpruner, 0.25)
        candidates = vlm.candidates(vlm.encode(picture, [question]))
        # the same choice as cdpruner on the VLM's own question embedding and projected candidates
        tokens = vlm.token_embeddings(candidates)[0].float()
        V, N = candidates.features[0].shape[:2]
        context = SelectionContext(instruction_embedding=vlm.question_embedding([question]).expand(V, -1),
                                   token_embedding=tokens.reshape(V, N, -1))
        direct, _ = cdpruner.select(candidates.features[0], 0.25, context=context)
        offsets = torch.arange(V).unsqueeze(1) * N
        assert torch.equal(prompt.kept[0].cpu(), (direct + offsets).reshape(-1)), question
        kept.append(tuple(prompt.kept[0].tolist()))
    assert len(set(kept)) > 1  # another question, another selection


def eager_cls_row(tower, pixels: torch.Tensor, block: int) -> torch.Tensor:
    """The reference: the head-mean CLS->patch row of block ``block`` from transformers' own eager
    attention weights (prefix keys dropped)."""
    eager = copy.deepcopy(tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        weights = eager(pixel_values=pixels, output_attentions=True).attentions[block]  # (B, H, L, L)
    return weights[:, :, 0, 1:].mean(1)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_cls_attention_selectors_read_the_feature_layers_attention(folders, loaded, name):
    """VisionZip / EViT inside a pruned VLM: the CLS row of the block whose output is the feature
    layer, equal to the model's own eager attention; cls_attention keeps its top-k; answers do not
    depend on the batch. A family with no CLS token refuses in one line."""
    vlm = vlm_of(folders, loaded, name)
    pictures = images(vlm, 4)
    visionzip, cls_top = (build_baseline(n, vlm.selection_grid) for n in ("visionzip", "cls_attention"))
    if not vlm.cls_attention:
        with pytest.raises(TokenselError, match="CLS attention") as err:
            vlm.prune(pictures[:1], QUESTIONS[:1], visionzip, 0.25)
        assert "\n" not in str(err.value)
        return
    batch = vlm.encode(pictures, QUESTIONS)
    candidates = vlm.candidates(batch, cls_attention=True)
    base_views = batch["pixel_values"][:, 0] if vlm.anyres else batch["pixel_values"]
    reference = eager_cls_row(vlm.model.model.vision_tower, base_views, vlm.layer)
    ours = torch.stack([a[0] for a in candidates.cls_attention])
    assert torch.allclose(ours, reference, atol=1e-6)
    prompt = vlm.prune(pictures, QUESTIONS, cls_top, 4)
    for i, kept in enumerate(prompt.kept):
        attention = candidates.cls_attention[i]  # (V, N): the top 4 of each view
        top = torch.cat([a.topk(4).indices.sort().values + v * a.shape[0] for v, a in enumerate(attention)])
        assert torch.equal(kept.cpu(), top)
    for selector in (cls_top, visionzip):
        together = vlm.generate(pictures, QUESTIONS, selector, 0.25, max_new_tokens=5)
        alone = [vlm.generate([p], [q], selector, 0.25, max_new_tokens=5)[0] for p, q in zip(pictures, QUESTIONS)]
        assert together == alone and any(together)


@pytest.mark.parametrize("tower_kind", ["clip", "dinov2"])
def test_tower_cls_attention_equals_the_towers_eager_attention(tower_kind):
    """CLIP-style and DINOv2-style transformers towers (make vlm's LLaVA has a DINOv2 tower)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

    from tokensel.common.attention import capture_cls_row
    from tokensel.vlms.llava import tower_cls_attention_site

    torch.manual_seed(0)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    tower = (CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, **shape)) if tower_kind == "clip"
             else Dinov2Model(Dinov2Config(image_size=28, patch_size=7, **shape))).eval()
    pixels = torch.randn(2, 3, tower.config.image_size, tower.config.image_size)
    for block in (-2, 0):
        module, cls_row = tower_cls_attention_site(tower, block, 16)
        with torch.no_grad():
            _, row = capture_cls_row(module, cls_row, lambda: tower(pixel_values=pixels), tower_kind)
        assert row.shape == (2, 16) and torch.allclose(row, eager_cls_row(tower, pixels, block), atol=1e-6)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_per_image_counts_are_right_when_image_sizes_differ(folders, loaded, name):
    vlm = vlm_of(folders, loaded, name)
    pictures = images(vlm, 4)
    batch = vlm.encode(pictures, QUESTIONS)
    candidates = vlm.candidates(batch)
    if vlm.variable_resolution:  # the processor's own grid per image
        expected = [int(t * h * w) // vlm.merge ** 2 for t, h, w in batch["image_grid_thw"].tolist()]
        assert len(set(expected)) > 1
    elif vlm.anyres:  # views per image
        expected = [len(x) * 16 for x in candidates.features]
        assert len(set(expected)) > 1
    else:
        expected = [16] * 4
    assert candidates.counts == expected
    assert [g[0] * g[1] * len(x) for g, x in zip(candidates.grids, candidates.features)] == expected
    prompt = vlm.prune(pictures, QUESTIONS, build_baseline("l2norm", vlm.selection_grid), 0.5)
    per_view = [c // len(x) for c, x in zip(expected, candidates.features)]
    assert prompt.candidate_tokens == expected
    assert prompt.image_tokens == [len(x) * resolve_budget(0.5, n) for x, n in zip(candidates.features, per_view)]
    assert [len(k) for k in prompt.kept] == prompt.image_tokens


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_kept_tokens_carry_the_positions_the_option_promises(folders, loaded, name):
    vlm = vlm_of(folders, loaded, name)
    pictures, questions = images(vlm, 3), QUESTIONS[:3]
    selector = build_baseline("divprune", vlm.selection_grid)
    if not vlm.mrope:  # 1-D: one position per token of the pruned prompt, as generate numbers it
        with pytest.raises(TokenselError, match="compact"):
            type(vlm)(vlm.model, vlm.processor, positions="compact")
        assert "position_ids" not in vlm.prune(pictures, questions, selector, 0.5).inputs
        return
    batch = vlm.encode(pictures, questions)
    rope, _ = vlm.model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                             image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    for positions in ("original", "compact"):
        prompt = type(vlm)(vlm.model, vlm.processor, positions=positions).prune(pictures, questions, selector, 0.5)
        ids, mask, pos = prompt.inputs["input_ids"], prompt.inputs["attention_mask"], prompt.inputs["position_ids"]
        for row, kept in enumerate(prompt.kept):
            real = mask[row].bool()
            ours = pos[:, row][:, real]
            image = ids[row][real] == vlm.image_token_id
            if positions == "compact":  # consecutive ids on every axis; decoding goes on after the pruned length
                assert torch.equal(ours, torch.arange(int(real.sum())).expand(3, -1))
                continue
            full_real = batch["attention_mask"][row].bool()
            full = rope[:, row][:, full_real]
            slots = (batch["input_ids"][row][full_real] == vlm.image_token_id).nonzero().flatten()
            assert torch.equal(ours[:, image], full[:, slots[kept]])  # position_ids[:, :, kept] of the full prompt
            assert torch.equal(ours[:, ~image], full[:, batch["input_ids"][row][full_real] != vlm.image_token_id])
            assert torch.equal(ours[:, -1], full[:, -1])  # so decoding continues after the unpruned length


def test_qwen3_deepstack_features_are_compacted_with_the_keep_list(folders, loaded):
    vlm = vlm_of(folders, loaded, "qwen3_vl")
    pictures, questions = images(vlm, 2), QUESTIONS[:2]
    full = vlm.candidates(vlm.encode(pictures, questions)).extras["deepstack"]
    prompt = vlm.prune(pictures, questions, build_baseline("divprune", vlm.selection_grid), 0.5)
    out = prompt.inputs["mm_encoder_outputs"]["image"]
    assert len(out.deepstack_features) == len(vlm.model.config.vision_config.deepstack_visual_indexes)
    for layer, per_image in enumerate(out.deepstack_features):
        for i, kept in enumerate(prompt.kept):
            assert torch.equal(per_image[i], full[i][layer][kept]) and len(kept) < len(full[i][layer])


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_the_ntp_head_is_the_models_own_loss(folders, loaded, name):
    vlm = fixed(vlm_of(folders, loaded, name))
    head = vlm.ntp_head(64)
    picture, prompt, target = images(vlm, 1), "what is the total revenue in 2020?", "the answer is 42"
    batch = vlm.encode(picture, [prompt])
    candidates = vlm.candidates(batch)
    tokens = candidates.features[0][:1].detach().clone().requires_grad_(True)  # the first view's N tokens
    n = tokens.shape[1]
    out = head.ntp_loss(tokens, [prompt], [target])
    out.loss.backward()
    assert torch.isfinite(out.loss) and tokens.grad.abs().sum() > 0
    if vlm.anyres:  # one view's tokens: the model's own forward lays out whole anyres images only
        return
    ids, labels = head.conversation(prompt, target, n)
    at = ids.index(vlm.image_token_id)
    input_ids = torch.tensor([ids[:at] + [vlm.image_token_id] * n + ids[at + 1:]])
    label_ids = torch.tensor([[-100] * (at + n) + [i if lab else -100 for i, lab in zip(ids[at + 1:], labels[at + 1:])]])
    kwargs = {"input_ids": input_ids, "labels": label_ids}
    if vlm.mrope:  # the model's own rope index over the same image; DeepStack zeroed (the head has none)
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        depth = len(candidates.extras.get("deepstack", [[]])[0])
        kwargs.update(mm_token_type_ids=(input_ids == vlm.image_token_id).long(), image_grid_thw=batch["image_grid_thw"],
                      mm_encoder_outputs={"image": BaseModelOutputWithDeepstackFeatures(
                          pooler_output=(candidates.tokens[0],),
                          deepstack_features=[(torch.zeros_like(candidates.tokens[0]),)] * depth)})
    else:
        kwargs["pixel_values"] = batch["pixel_values"]
    with torch.no_grad():
        reference = vlm.model(**kwargs).loss
    assert torch.allclose(out.per_sample[0], reference, atol=1e-5)
    # kept tokens: fewer, any order of the batch, still a loss
    kept = candidates.features[0][:1, :3]
    assert torch.isfinite(head.ntp_loss(kept, [prompt], [target]).loss)
    if vlm.mrope:  # with their indices they take their original M-RoPE ids
        positions = head.position_ids([at], [at + 3 + 5], 3, torch.tensor([[0, 5, 15]]), "cpu")
        assert positions[:, 0, at:at + 3].tolist() == [[at] * 3, [at, at + 1, at + 3], [at, at + 1, at + 3]]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_the_feature_source_serves_exactly_the_candidates(folders, loaded, name):
    from tokensel.datamodules.encoders import build_encoder
    from tokensel.datamodules.samples import normalise

    vlm = fixed(vlm_of(folders, loaded, name))
    need = type(vlm).training_encoder(str(folders[name]), vlm.model.config, vlm.image_size)
    enc = build_encoder(f"hf:{folders[name]}", layer=need["layer"], norm=need["norm"], image_size=need["image_size"])
    side = enc.preprocess.size[0]
    picture = images(vlm, 1)[0].resize((side, side))
    pixels = normalise(picture, enc.preprocess)[None]
    features = enc(pixels)
    candidates = vlm.candidates(vlm.encode([picture], QUESTIONS[:1]), cls_attention=vlm.cls_attention)
    expected = candidates.features[0][:1]  # the base view for NeXT
    assert enc.grid == (vlm.fixed_grid() or enc.grid) and features.shape == expected.shape
    assert torch.allclose(features, expected, atol=1e-4)
    if vlm.cls_attention:  # data.cls_attention_layer at the feature layer: the pruned VLM's CLS row
        _, attention = enc.forward_with_cls_attention(pixels, need["layer"])
        assert torch.allclose(attention, candidates.cls_attention[0][:1], atol=1e-5)
    else:
        with pytest.raises(TokenselError, match="no CLS token") as err:
            enc.check_cls_attention(-1)
        assert "\n" not in str(err.value)


def test_bad_inputs_are_one_line(folders, loaded):
    from tokensel.common.errors import CheckpointError, VLMError

    qwen = vlm_of(folders, loaded, "qwen2_5_vl")
    tiny = Image.new("RGB", (qwen.factor - 1, 3 * qwen.factor))
    with pytest.raises(VLMError, match=f"{qwen.factor - 1}x{3 * qwen.factor}") as err:
        qwen.prune([tiny], QUESTIONS[:1])
    assert "\n" not in str(err.value)
    llava = vlm_of(folders, loaded, "llava")
    net = trained_selector(llava)  # 16 tokens of width 32
    with pytest.raises(VLMError, match="each image its own grid; set image_size=") as err:
        qwen.check_selector(net)  # variable resolution: the count is not fixed
    with pytest.raises(VLMError, match="16 candidate tokens per view; set image_size=84"):
        fixed(qwen).check_selector(build_net("vp_noise", FeatureDims(9, 32, (3, 3), 32), width=16, head_dim=8, depth=1))
    with pytest.raises(VLMError, match="32 wide"):
        llava.check_selector(build_net("vp_noise", FeatureDims(16, 8, (4, 4), 32), width=16, head_dim=8, depth=1))
    with pytest.raises(CheckpointError, match="trained on 16 tokens .* got 16 tokens of width 8") as err:
        net.select(torch.randn(2, 16, 8), 4)  # select() itself: the width
    with pytest.raises(CheckpointError, match="got 9 tokens of width 32"):
        net.select(torch.randn(2, 9, 32), 4)  # and the count
    assert "\n" not in str(err.value)
    with pytest.raises(TokenselError, match="multiple of 28"):
        type(qwen)(qwen.model, qwen.processor, image_size=30)
    with pytest.raises(TokenselError, match="positions='sideways'"):
        type(qwen)(qwen.model, qwen.processor, positions="sideways")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_the_prefill_bench_runs_on_every_family(folders, name):
    from tokensel.experiments.bench_prefill import prefill_rows

    def timer(fn, cuda):  # one untimed call: the rows, not the timings, are under test
        fn()
        return 1.0, 1

    rows = prefill_rows(str(folders[name]), [0.5], 2, timer, log=lambda *a, **k: None)
    assert [r["budget"] for r in rows] == ["all", "0.5"]
    assert rows[1]["image_tokens"] < rows[0]["image_tokens"] and rows[1]["prompt_tokens"] < rows[0]["prompt_tokens"]
    assert rows[1]["ideal"] > 1.0
