"""The lmms-eval plugin (experiments/lmms_eval_model.py): lmms-eval 0.7.3's real CLI scores a pruned
tiny random LLaVA (as tokensel_llava) and a tiny random Qwen2.5-VL (as tokensel) on local tasks
(tests/lmms_task) made from the generated corpus, offline; and the model's loglikelihood,
generation and pruning checked directly.

`make setup` installs lmms-eval (the `lmms` extra), so `make test` runs these; an environment without it skips them."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed in this environment: "
                    "pip install -e '.[lmms]' (make setup installs it)")

from conftest import REPO  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402

from tokensel.experiments.lmms_eval_model import TokenselLlava, TokenselVLM  # noqa: E402

TASK_DIR = REPO / "tests" / "lmms_task"
TASKS = ("tokensel_docvqa_local", "tokensel_docvqa_local_ll", "tokensel_docvqa_local_rounds")
SAMPLES, LIMIT, BUDGET, IMAGE_TOKENS = 6, 4, 4, 16  # the tiny LLaVA: 32 px images, 8 px patches
QUESTIONS = ["what is the total revenue in 2020?", "describe the image", "a cat"]


def task_utils():
    spec = importlib.util.spec_from_file_location("lmms_task_utils", TASK_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A working folder holding the local tasks' parquet: DocVQA/ChartQA samples of a generated corpus."""
    from tokensel.datamodules.synthetic import generate_corpus

    work = tmp_path_factory.mktemp("lmms_eval")
    generate_corpus(work / "corpus", seed=0, train={}, val={"docvqa": 3, "chartqa": 3}, workers=1)
    utils = task_utils()
    utils.write_dataset(work / "corpus", work / utils.DATA_FILE, limit=SAMPLES)
    return work


def test_the_entry_points_register_tokensel_and_tokensel_llava():
    from lmms_eval.models import get_model

    assert get_model("tokensel") is TokenselVLM
    assert get_model("tokensel_llava") is TokenselLlava and issubclass(TokenselLlava, TokenselVLM)


@pytest.mark.parametrize("model_id, fixture, extra", [("tokensel_llava", "tiny_llava", ""),
                                                      ("tokensel", "tiny_qwen2_5_vl", ",image_size=112")])
def test_lmms_eval_cli_scores_a_pruned_vlm_offline(model_id, fixture, extra, workdir, request):
    folder = request.getfixturevalue(fixture)  # 16 image tokens per prompt either way (Qwen: 112 px, 28 px tokens)
    out = workdir / f"results_{model_id}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(workdir / "hf"),
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    cli = Path(sys.executable).parent / "lmms-eval"
    command = [str(cli), "--model", model_id,
               "--model_args", f"pretrained={folder},selector=divprune,budget={BUDGET},device=cpu{extra}",
               "--tasks", ",".join(TASKS), "--include_path", str(TASK_DIR), "--limit", str(LIMIT),
               "--batch_size", "2", "--output_path", str(out), "--log_samples", "--verbosity", "INFO"]
    proc = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=900, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    # lmms-eval catches an evaluation error, prints it and still exits 0: the results file is the proof
    found = sorted(out.rglob("*_results.json"))
    assert len(found) == 1, log[-4000:]
    results = json.loads(found[0].read_text())
    scores = results["results"]
    assert 0.0 <= scores["tokensel_docvqa_local"]["anls,none"] <= 1.0
    assert scores["tokensel_docvqa_local_ll"]["perplexity,none"] > 1.0
    assert 0.0 <= scores["tokensel_docvqa_local_ll"]["acc,none"] <= 1.0
    assert scores["tokensel_docvqa_local_rounds"]["rounds,none"] == 2.0
    for task in TASKS:
        assert results["n-samples"][task] == {"original": SAMPLES, "effective": LIMIT}
        logged = sorted(out.rglob(f"*_samples_{task}.jsonl"))
        assert len(logged) == 1 and len(logged[0].read_text().splitlines()) == LIMIT
    assert "budget=4" in results["config"]["model_args"]
    # the selector really pruned: every prompt of every request type held BUDGET image tokens
    for what in ("generate_until", "loglikelihood", "generate_until_multi_round"):
        assert f"{model_id} {what}: {LIMIT} prompts, {BUDGET} of {IMAGE_TOKENS} image tokens per prompt" in log


# ---- the model directly ------------------------------------------------------------------------
def images(n: int) -> list:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (32 + 8 * i, 40, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def pruned(tiny_llava):
    model = TokenselLlava(pretrained=str(tiny_llava), selector="divprune", budget=BUDGET, device="cpu")
    model.task_dict = {"t": {"test": [{"image": img, "question": q} for img, q in zip(images(3), QUESTIONS)]}}
    return model


def visual(doc):
    return [doc["image"]]


def request(kind: str, doc_id: int, *args) -> Instance:
    context = QUESTIONS[doc_id]
    return Instance(request_type=kind, arguments=(context, *args, visual, doc_id, "t", "test"), idx=0,
                    metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def round_trips(tokenizer, ids: list[int]) -> bool:
    return tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"] == ids


class FavourText(torch.nn.Module):
    """The LM head plus a large bias on tokens that are whole text (decode -> encode gives them
    back): a random byte-level model otherwise answers in UTF-8 fragments that no text spells."""

    def __init__(self, head, tokens: list[int], size: int):
        super().__init__()
        self.head = head
        self.register_buffer("bias", torch.zeros(size).index_fill_(0, torch.tensor(tokens), 100.0))

    def forward(self, hidden):
        return self.head(hidden) + self.bias.to(hidden.dtype)


def test_loglikelihood_prefers_the_greedy_continuation(tiny_llava):
    model = TokenselLlava(pretrained=str(tiny_llava), selector="divprune", budget=BUDGET, device="cpu")
    model.task_dict = {"t": {"test": [{"image": img} for img in images(3)]}}
    tokenizer = model.tokenizer
    text_tokens = [t for t in range(len(tokenizer)) if t not in tokenizer.all_special_ids and round_trips(tokenizer, [t])
                   and tokenizer.decode([t]).strip()]
    llm = model.vlm.model
    llm.lm_head = FavourText(llm.lm_head, text_tokens, llm.config.text_config.vocab_size)
    inputs = model.vlm.prune(images(1), QUESTIONS[:1], model.selector, model.budget).inputs
    ids = llm.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)[0].tolist()
    while not round_trips(tokenizer, ids):  # adjacent text tokens may still merge; one always round-trips
        ids = ids[:-1]
    # the same prefix with another last token: greedy's log-prob is at least as high, and only it is greedy
    others = [ids[:-1] + [t] for t in text_tokens if t != ids[-1] and round_trips(tokenizer, ids[:-1] + [t])][:4]
    assert others
    texts = [tokenizer.decode(x) for x in [ids, *others]]
    (greedy, is_greedy), *rest = model.loglikelihood([request("loglikelihood", 0, t) for t in texts])
    assert is_greedy and greedy < 0
    assert all(greedy >= ll and not flag for ll, flag in rest)
    # and generate_until answers with exactly those tokens
    answer = model.generate_until([request("generate_until", 0, {"max_new_tokens": len(ids), "until": []})])[0]
    assert answer == texts[0]


def test_loglikelihood_does_not_depend_on_the_batch(pruned):
    requests = [request("loglikelihood", i, " the answer is 42") for i in range(3)]
    pruned.batch_size_per_gpu = 3
    together = pruned.loglikelihood(requests)
    pruned.batch_size_per_gpu = 1
    alone = [pruned.loglikelihood([r])[0] for r in requests]
    assert np.allclose([t[0] for t in together], [a[0] for a in alone], atol=1e-4)
    assert [t[1] for t in together] == [a[1] for a in alone]


def test_generation_stops_at_until_and_batches_like_single_requests(pruned):
    kwargs = {"max_new_tokens": 8, "until": []}
    pruned.batch_size_per_gpu = 3
    together = pruned.generate_until([request("generate_until", i, dict(kwargs)) for i in range(3)])
    pruned.batch_size_per_gpu = 1
    assert together == [pruned.generate_until([request("generate_until", i, dict(kwargs))])[0] for i in range(3)]
    text = max(together, key=len)
    assert len(text) >= 3, together
    stop = text[1:3]
    doc_id = together.index(text)
    cut = pruned.generate_until([request("generate_until", doc_id, {"max_new_tokens": 8, "until": [stop]})])[0]
    assert cut == text.split(stop, 1)[0]


def test_full_and_divprune_differ_by_the_pruned_image_tokens(tiny_llava, pruned):
    full = TokenselLlava(pretrained=str(tiny_llava), selector="full", device="cpu")
    image, question = images(1), QUESTIONS[:1]
    full_prompt = full.vlm.prune(image, question, full.selector, full.budget)
    pruned_prompt = pruned.vlm.prune(image, question, pruned.selector, pruned.budget)
    full_len = full_prompt.inputs["inputs_embeds"].shape[1]
    pruned_len = pruned_prompt.inputs["inputs_embeds"].shape[1]
    assert full_len - pruned_len == IMAGE_TOKENS - BUDGET
    assert (full_prompt.image_tokens, full_prompt.candidate_tokens, pruned_prompt.image_tokens) == (
        [IMAGE_TOKENS], [IMAGE_TOKENS], [BUDGET])


def test_bad_model_args_are_one_line(tiny_llava):
    from tokensel.common.errors import TokenselError

    for args in ({"selector": "nonsense", "budget": 4}, {"selector": "full", "budget": 4}, {"selector": "divprune"},
                 {"selector": "divprune", "budget": "0.25,64"}, {"selector": "full", "colour": "red"}):
        with pytest.raises(TokenselError) as err:
            TokenselLlava(pretrained=str(tiny_llava), device="cpu", **args)
        assert "\n" not in str(err.value)


def test_a_qwen_prompt_keeps_the_budget_at_each_images_own_grid(tiny_qwen2_5_vl):
    model = TokenselVLM(pretrained=str(tiny_qwen2_5_vl), selector="uniform", budget=0.5, device="cpu")
    pictures = [Image.fromarray(np.full((56 + 28 * i, 84, 3), 40 * i, dtype=np.uint8)) for i in range(3)]
    prompt = model.vlm.prune(pictures, QUESTIONS, model.selector, model.budget)
    assert len(set(prompt.candidate_tokens)) > 1
    assert prompt.image_tokens == [round(0.5 * n) for n in prompt.candidate_tokens]
    model.task_dict = {"t": {"test": [{"image": img} for img in pictures]}}
    (logprob, _), = model.loglikelihood([request("loglikelihood", 0, " the answer is 42")])
    assert logprob < 0
