"""The LLaVA and LLaVA-NeXT families (vlms/llava.py, vlms/llava_next.py) in real (tiny, random)
Hugging Face models: batch-independent greedy answers, K image tokens in positional order, NeXT's
views, nothing of transformers patched. The contract every family meets is tests/test_vlm_families.py."""

import numpy as np
import pytest
import torch
from PIL import Image

from tokensel.selectors.catalog import build_baseline
from tokensel.vlms import open_vlm
from tokensel.vlms.llava import LlavaFamily

QUESTIONS = ["what is the total revenue in 2020?", "describe the image", "a cat", "two people riding bikes"]


def images(n: int) -> list:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (32 + 8 * i, 40, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def full(tiny_llava):
    return open_vlm(str(tiny_llava))


@pytest.mark.parametrize("baseline, budget", [(None, None), ("uniform", 4), ("divprune", 0.25), ("l2norm", 8)])
def test_greedy_answers_do_not_depend_on_the_batch(tiny_llava, full, baseline, budget):
    selector = build_baseline(baseline, (4, 4)) if baseline else None
    pictures = images(4)
    together = full.generate(pictures, QUESTIONS, selector, budget, max_new_tokens=6)
    alone = [full.generate([p], [q], selector, budget, max_new_tokens=6)[0] for p, q in zip(pictures, QUESTIONS)]
    assert together == alone
    assert any(together)  # it generated something


def test_the_prompt_holds_exactly_k_image_embeddings_in_positional_order(full):
    selector = build_baseline("l2norm", (4, 4))
    batch = full.processor(images=images(2), text=full.prompts(QUESTIONS[:2]), return_tensors="pt", padding=True)
    features = full.image_features(batch["pixel_values"])
    indices, kept = selector.select(features, 5)
    assert (indices[:, 1:] > indices[:, :-1]).all()
    inputs = full.prune(images(2), QUESTIONS[:2], selector, 5).inputs
    projected = full.model.model.multi_modal_projector(kept)
    full_inputs = full.prune(images(2), QUESTIONS[:2]).inputs
    assert inputs["inputs_embeds"].shape[1] == full_inputs["inputs_embeds"].shape[1] - (16 - 5)
    for row in range(2):  # the K projected tokens sit where the image was, in order
        emb = inputs["inputs_embeds"][row]
        found = [int(torch.isclose(emb, projected[row, j], atol=1e-6).all(-1).nonzero()[0]) for j in range(5)]
        assert found == sorted(found) and found[-1] - found[0] == 4


def test_projector_space_selection_keeps_k_projected_embeddings(full):
    vlm = LlavaFamily(full.model, full.processor, feature_space="projector")
    prompt = vlm.prune(images(2), QUESTIONS[:2], build_baseline("divprune", (4, 4)), 3)
    assert prompt.image_tokens == [3, 3] and all(len(k) == 3 for k in prompt.kept)
    candidates = vlm.candidates(vlm.encode(images(2), QUESTIONS[:2]))
    assert candidates.features[0].shape == (1, 16, full.model.config.text_config.hidden_size)


def test_bad_pruned_vlm_settings_are_one_line(tmp_path, full):
    from tokensel.common.errors import TokenselError

    for make in (lambda: open_vlm(str(tmp_path / "nowhere")),
                 lambda: full.prune(images(1), QUESTIONS[:1], build_baseline("random", (4, 4)), None),
                 lambda: LlavaFamily(full.model, full.processor, feature_space="llm"),
                 lambda: LlavaFamily(full.model, full.processor, positions="compact"),
                 lambda: LlavaFamily(full.model, full.processor, image_size=64)):
        with pytest.raises(TokenselError) as err:
            make()
        assert "\n" not in str(err.value)


# ---- LLaVA-NeXT: anyres views ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def next_full(tiny_llava_next):
    return open_vlm(str(tiny_llava_next))


def view_counts(vlm, pictures) -> list[int]:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = vlm.model.config
    return [image_size_to_num_patches((p.height, p.width), config.image_grid_pinpoints, 32) for p in pictures]


def test_next_images_of_different_shapes_get_different_view_counts(next_full):
    assert next_full.anyres and len(set(view_counts(next_full, images(4)))) > 1


@pytest.mark.parametrize("baseline, budget, view_selection",
                         [(None, None, "per_view"), ("uniform", 4, "per_view"), ("divprune", 0.25, "per_view"),
                          ("l2norm", 0.25, "across"), ("uniform", 6, "across")])
def test_next_greedy_answers_do_not_depend_on_the_batch(next_full, baseline, budget, view_selection):
    selector = build_baseline(baseline, (4, 4)) if baseline else None
    vlm = type(next_full)(next_full.model, next_full.processor, view_selection=view_selection)
    pictures = images(4)
    together = vlm.generate(pictures, QUESTIONS, selector, budget, max_new_tokens=6)
    alone = [vlm.generate([p], [q], selector, budget, max_new_tokens=6)[0] for p, q in zip(pictures, QUESTIONS)]
    assert together == alone
    assert any(together)


def test_next_full_reference_is_the_models_own_forward(next_full):
    """All tokens: the model's own layout (unpadded crops, image_newline), so its logits equal
    LlavaNextForConditionalGeneration's forward on the processor's output."""
    picture, question = images(3)[2:], QUESTIONS[:1]
    batch = next_full.processor(images=picture, text=next_full.prompts(question), return_tensors="pt")
    with torch.no_grad():
        own = next_full.model(**batch).logits[:, -1]
        ours = next_full.model(**next_full.prune(picture, question).inputs).logits[:, -1]
    assert torch.allclose(own, ours, atol=1e-5)


@pytest.mark.parametrize("view_selection", ["per_view", "across"])
def test_next_prompts_hold_the_budget_per_view_or_across_views(next_full, view_selection):
    selector = build_baseline("l2norm", (4, 4))
    vlm = type(next_full)(next_full.model, next_full.processor, view_selection=view_selection)
    pictures = images(4)
    views = view_counts(vlm, pictures)
    prompt = vlm.prune(pictures, QUESTIONS, selector, 0.25)
    assert prompt.candidate_tokens == [v * 16 for v in views]
    expected = [v * 4 for v in views] if view_selection == "per_view" else [round(0.25 * v * 16) for v in views]
    assert prompt.image_tokens == expected
    # the kept embeddings of the last image, in view-major positional order, sit in its run
    batch = vlm.processor(images=pictures[-1:], text=vlm.prompts(QUESTIONS[-1:]), return_tensors="pt")
    features = vlm.image_features(batch["pixel_values"][0, :views[-1]])  # (V, N, C)
    if view_selection == "per_view":
        kept = selector.select(features, 0.25)[1].reshape(-1, features.shape[-1])
    else:
        kept = selector.select_across(features.unsqueeze(0), 0.25)[1][0]
    projected = vlm.model.model.multi_modal_projector(kept)
    slots = prompt.inputs["inputs_embeds"][-1][prompt.inputs["attention_mask"][-1].bool()]
    found = [int(torch.isclose(slots, projected[j], atol=1e-6).all(-1).nonzero()[0]) for j in range(len(kept))]
    assert found == list(range(found[0], found[0] + len(kept)))


def test_a_model_no_family_registers_is_one_line_naming_the_registered_ones(tmp_path):
    from transformers import LlamaConfig

    from tokensel.common.errors import TokenselError
    from tokensel.vlms import FAMILIES

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(TokenselError, match="model_type 'llama'") as err:
        open_vlm(str(tmp_path))
    assert "\n" not in str(err.value) and all(name in str(err.value) for name in FAMILIES.names())
