"""Generation-time pruning in a real (tiny, random) Hugging Face LLaVA: batch-independent greedy
answers, K image tokens in positional order, nothing of transformers patched."""

import numpy as np
import pytest
import torch
from PIL import Image

from tokensel.selectors.catalog import build_baseline
from tokensel.selectors.pruned_vlm import PrunedLlava

QUESTIONS = ["what is the total revenue in 2020?", "describe the image", "a cat", "two people riding bikes"]


def images(n: int) -> list:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (32 + 8 * i, 40, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def full(tiny_llava):
    return PrunedLlava.from_pretrained(str(tiny_llava))


@pytest.mark.parametrize("baseline, budget", [(None, None), ("uniform", 4), ("divprune", 0.25), ("l2norm", 8)])
def test_greedy_answers_do_not_depend_on_the_batch(tiny_llava, full, baseline, budget):
    selector = build_baseline(baseline, (4, 4)) if baseline else None
    vlm = PrunedLlava(full.model, full.processor, selector, budget)
    pictures = images(4)
    together = vlm.generate(pictures, QUESTIONS, max_new_tokens=6)
    alone = [vlm.generate([p], [q], max_new_tokens=6)[0] for p, q in zip(pictures, QUESTIONS)]
    assert together == alone
    assert any(together)  # it generated something


def test_the_prompt_holds_exactly_k_image_embeddings_in_positional_order(full):
    selector = build_baseline("l2norm", (4, 4))
    vlm = PrunedLlava(full.model, full.processor, selector, 5)
    batch = vlm.processor(images=images(2), text=vlm.prompts(QUESTIONS[:2]), return_tensors="pt", padding=True)
    features = vlm.image_features(batch["pixel_values"])
    indices, kept = selector.select(features, 5)
    assert (indices[:, 1:] > indices[:, :-1]).all()
    inputs = vlm.prefill_inputs(images(2), QUESTIONS[:2])
    projected = full.model.model.multi_modal_projector(kept)
    full_inputs = PrunedLlava(full.model, full.processor).prefill_inputs(images(2), QUESTIONS[:2])
    assert inputs["inputs_embeds"].shape[1] == full_inputs["inputs_embeds"].shape[1] - (16 - 5)
    for row in range(2):  # the K projected tokens sit where the image was, in order
        emb = inputs["inputs_embeds"][row]
        found = [int(torch.isclose(emb, projected[row, j], atol=1e-6).all(-1).nonzero()[0]) for j in range(5)]
        assert found == sorted(found) and found[-1] - found[0] == 4


def test_projector_space_selection_keeps_k_projected_embeddings(full):
    vlm = PrunedLlava(full.model, full.processor, build_baseline("divprune", (4, 4)), 3, feature_space="projector")
    assert vlm.image_embeddings(torch.randn(2, 3, 32, 32)).shape == (2, 3, full.model.config.text_config.hidden_size)


def test_bad_pruned_vlm_settings_are_one_line(tmp_path, full):
    from tokensel.common.errors import TokenselError

    for make in (lambda: PrunedLlava.from_pretrained(str(tmp_path / "nowhere")),
                 lambda: PrunedLlava(full.model, full.processor, build_baseline("random", (4, 4)), None),
                 lambda: PrunedLlava(full.model, full.processor, build_baseline("cls_attention", (4, 4)), 4),
                 lambda: PrunedLlava(full.model, full.processor, None, None, feature_space="llm")):
        with pytest.raises(TokenselError) as err:
            make()
        assert "\n" not in str(err.value)
