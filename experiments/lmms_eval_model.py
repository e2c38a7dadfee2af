"""lmms-eval plugin: any tokensel selector inside any VLM family of ``vlms/``, scored by lmms-eval's tasks.

``TokenselVLM`` is an lmms-eval model (``lmms_eval.api.model.lmms``) named ``tokensel`` for every
family (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL; the folder's ``model_type`` picks it), with
``tokensel_llava`` kept as another name. It prunes each prompt with the family
(``VLMFamily.prune``: K image tokens chosen by the selector among the family's candidates), then
decodes greedily with the model's own chat template and ``generate``. ``make setup`` installs
lmms-eval in the one environment (``pip install tokensel[lmms]`` elsewhere)::

    .venv/bin/lmms-eval --model tokensel \\
        --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,selector=divprune,budget=0.25 \\
        --tasks docvqa_val,chartqa --batch_size 4 --output_path eval_lmms/
    # the same: make eval-lmms ARGS="--model tokensel --model_args ... --tasks ..."

lmms-eval 0.7.3 finds the class through the ``lmms_eval.models`` entry-point group (pyproject.toml):
``lmms_eval.models.__init__._initialize_model_registry`` calls
``ModelRegistryV2.load_entrypoint_manifests`` (``lmms_eval/models/registry_v2.py``), which loads
:func:`manifest`. The entry point is visible once tokensel is (re)installed in the environment.

``model_args``: ``pretrained`` (a VLM folder or hub id), ``selector`` (``full``, a training-free
baseline such as ``divprune``, or a trained selector's checkpoint), ``budget`` (a token count or
keep ratio; not for ``full``), ``feature_space`` (LLaVA: ``vision`` | ``projector``),
``view_selection`` (LLaVA-NeXT: ``per_view`` | ``across``), ``positions`` (Qwen-VL: ``original``
| ``compact``), ``image_size`` (Qwen-VL: one fixed side), ``batch_size`` (else
lmms-eval's ``--batch_size``), ``device`` (default: cuda if available), ``precision`` (32 | bf16 | 16),
``max_new_tokens`` (when the task sets none; default 32), ``seed`` (of the random baseline).
Decoding is always greedy; ``until`` strings and the EOS token end an answer. One image per
prompt and one process (no data parallelism). lmms-eval's own hub tasks need
the hub; ``--limit N`` takes the first N documents, so do not report metrics from it.
"""

from __future__ import annotations

import json
from typing import Optional

import torch
from loguru import logger  # lmms-eval's logger: shown with --verbosity INFO
from tqdm import tqdm

from lmms_eval.api.model import lmms
from tokensel.common.errors import ConfigError
from tokensel.selectors.budget import parse_budgets
from tokensel.selectors.catalog import FULL, selector_for
from tokensel.vlms import check_vlm, open_vlm

MODEL_ID = "tokensel"
IMAGE_TOKENS = ("<image>", "<|image_pad|>")  # tasks that write a placeholder themselves: the chat template places the image


def manifest(model_id: str = MODEL_ID, cls: str = "TokenselVLM"):
    """The entry point's payload: what ``ModelRegistryV2`` registers (imported lazily, because the
    registry loads this module while ``lmms_eval.models`` is still initialising)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=model_id, simple_class_path=f"{__name__}.{cls}")


def llava_manifest():
    """``tokensel_llava``: the same model under the name it had when it took LLaVAs only."""
    return manifest("tokensel_llava", "TokenselLlava")


class TokenselVLM(lmms):
    """``tokensel``: lmms-eval's ``generate_until``, ``loglikelihood`` and
    ``generate_until_multi_round`` on a VLM that keeps ``budget`` image tokens (module docstring)."""

    is_simple = True
    model_id = MODEL_ID

    def __init__(self, pretrained: str, selector: str = FULL, budget=None, feature_space: Optional[str] = None,
                 view_selection: str = "per_view", positions: str = "original", image_size=None,
                 batch_size=1, device: Optional[str] = None, precision="32", max_new_tokens=32, seed=0,
                 max_batch_size=None, **unknown):
        super().__init__()
        name = self.model_id
        if unknown:
            raise ConfigError(f"{name}: unknown model_args {', '.join(sorted(unknown))}")
        try:
            self.batch_size_per_gpu = int(batch_size)
        except ValueError:
            raise ConfigError(f"{name}: batch_size={batch_size!r} must be a number ('auto' is not supported)") from None
        self.max_new_tokens = int(max_new_tokens)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.selector_name = FULL if str(selector) in ("none", "") else str(selector)
        if self.selector_name == FULL and budget is not None:
            raise ConfigError(f"{name}: selector=full keeps every image token; drop budget={budget}")
        if self.selector_name != FULL and budget is None:
            raise ConfigError(f"{name}: selector={selector} needs a budget (a token count or a keep ratio)")
        budgets = parse_budgets(str(budget), "budget") if budget is not None else [None]
        if len(budgets) != 1:
            raise ConfigError(f"{name}: budget={budget!r}: one budget per run")
        self.budget = budgets[0]
        options = {"feature_space": feature_space, "view_selection": str(view_selection), "positions": str(positions),
                   "image_size": int(image_size) if image_size not in (None, "") else None}
        check_vlm(str(pretrained), f"{name}: pretrained", **options)  # before the model is loaded
        self.vlm = open_vlm(str(pretrained), precision=str(precision), label=f"{name}: pretrained", **options)
        _, self.selector = selector_for(self.selector_name, self.vlm.selection_grid, int(seed), f"{name}: selector")
        self.vlm.check_selector(self.selector, f"{name}: {self.selector_name}")
        self.vlm.model.to(self._device)
        self.tokenizer = self.vlm.processor.tokenizer
        self.image_tokens: list[int] = []  # image tokens in each prompt prefilled so far
        self.candidate_tokens: list[int] = []  # and the tokens of its views they were chosen from
        self._warned_sampling = False

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        """As lmms's, except that a key given in ``model_args`` wins over the CLI's (lmms-eval
        always passes ``--batch_size``, default 1, which would otherwise clash with ``batch_size=``)."""
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    # ---- helpers -------------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    @staticmethod
    def _image(visuals):
        visuals = list(visuals or [])
        if len(visuals) != 1 or not hasattr(visuals[0], "convert"):
            raise ValueError(f"{MODEL_ID}: one image per prompt is supported, got {len(visuals)} visuals")
        return visuals[0].convert("RGB")

    @staticmethod
    def _text(context: str) -> str:
        for token in IMAGE_TOKENS:
            context = context.replace(token, "")
        return context.strip()

    def _batches(self, requests, key):
        """Index batches of at most ``batch_size``, same ``key`` within a batch, longest context first."""
        order = sorted(range(len(requests)), key=lambda i: (key(requests[i].args), -len(requests[i].args[0])))
        batch: list[int] = []
        for i in order:
            if batch and (len(batch) == self.batch_size or key(requests[batch[0]].args) != key(requests[i].args)):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def _prefill(self, images, contexts) -> dict:
        prompt = self.vlm.prune(images, [self._text(c) for c in contexts], self.selector, self.budget)
        self.image_tokens += prompt.image_tokens
        self.candidate_tokens += prompt.candidate_tokens
        return prompt

    def _report(self, what: str, count: int) -> None:
        budget = "all tokens" if self.budget is None else f"budget {self.budget}"

        def mean(values: list[int]) -> str:
            m = sum(values) / max(1, len(values))
            return f"{m:g}" if float(m).is_integer() else f"{m:.1f}"

        logger.info(f"{self.model_id} {what}: {count} prompts, {mean(self.image_tokens)} of {mean(self.candidate_tokens)} "
                    f"image tokens per prompt "
                    f"({self.selector_name}, {budget})")

    @torch.no_grad()
    def _generate(self, images, contexts, gen_kwargs: dict) -> list[str]:
        """Greedy answers, each cut at the first ``until`` string."""
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [u for u in until if u]
        if (float(gen_kwargs.get("temperature") or 0) > 0 or gen_kwargs.get("do_sample")) and not self._warned_sampling:
            logger.warning(f"{self.model_id} decodes greedily; the task's sampling settings are ignored")
            self._warned_sampling = True
        tokenizer = self.tokenizer
        out = self.vlm.generate_ids(self._prefill(images, contexts), do_sample=False, num_beams=1,
                                    max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
                                    eos_token_id=tokenizer.eos_token_id, stop_strings=until or None,
                                    tokenizer=tokenizer if until else None)
        answers = []
        for text in tokenizer.batch_decode(out, skip_special_tokens=True):
            for stop in until:
                text = text.split(stop, 1)[0]
            answers.append(text)
        return answers

    # ---- the lmms interface --------------------------------------------------------------------
    def generate_until(self, requests) -> list[str]:
        """Args per request (0.7.3): ``(context, generation_kwargs, doc_to_visual, doc_id, task, split)``."""
        answers: list[Optional[str]] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc=self.model_id)
        for batch in self._batches(requests, lambda a: json.dumps(a[1], sort_keys=True, default=str)):
            args = [requests[i].args for i in batch]
            images = [self._image(a[2](self._doc(a[4], a[5], a[3]))) for a in args]
            for i, a, answer in zip(batch, args, self._generate(images, [a[0] for a in args], dict(args[0][1]))):
                answers[i] = answer
                self.cache_hook.add_partial("generate_until", (a[0], a[1]), answer)
            bar.update(len(batch))
        bar.close()
        self._report("generate_until", len(requests))
        return answers

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Args per request: ``(context, target, doc_to_visual, doc_id, task, split)``; ``target`` is
        the continuation or a function of the doc. Returns ``(sum of the continuation's token
        log-probs, whether greedy decoding would produce exactly those tokens)``, both computed
        on the pruned prefill."""
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc=self.model_id)
        for batch in self._batches(requests, lambda a: ""):
            args = [requests[i].args for i in batch]
            docs = [self._doc(a[4], a[5], a[3]) for a in args]
            images = [self._image(a[2](doc)) for a, doc in zip(args, docs)]
            targets = [a[1] if isinstance(a[1], str) else str(a[1](doc)) for a, doc in zip(args, docs)]
            for i, result in zip(batch, self.continuation_logprobs(images, [a[0] for a in args], targets)):
                results[i] = result
            bar.update(len(batch))
        bar.close()
        self._report("loglikelihood", len(requests))
        return results

    @torch.no_grad()
    def continuation_logprobs(self, images, contexts, continuations) -> list[tuple[float, bool]]:
        """``(log p(continuation | image, context), is_greedy)`` per row, in one batched forward:
        the pruned prompt (left-padded) followed by the continuation's tokens (right-padded)."""
        prompt = self._prefill(images, contexts)
        mask = prompt.inputs["attention_mask"]
        ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
        width, start = max(map(len, ids), default=0), mask.shape[1]
        tokens = torch.zeros(len(ids), width, dtype=torch.long, device=mask.device)
        real = torch.zeros_like(tokens)
        for row, seq in enumerate(ids):
            tokens[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            real[row, :len(seq)] = 1
        logits = self.vlm.model(**self.vlm.continuation_inputs(prompt, tokens, real)).logits
        logprobs = logits[:, start - 1:start - 1 + width].float().log_softmax(-1)  # position t predicts t + 1
        out = []
        for row, seq in enumerate(ids):
            n, target = len(seq), tokens[row, :len(seq)]
            picked = logprobs[row, :n].gather(-1, target[:, None]).sum()
            out.append((float(picked), bool((logprobs[row, :n].argmax(-1) == target).all())))
        return out

    def generate_until_multi_round(self, requests) -> list[list[str]]:
        """Args per request: ``(context, generation_kwargs, doc_to_visual, doc_to_text, doc_id, task,
        split)``. Rounds as lmms-eval 0.7.3's multi-round tasks define them: round 0 answers
        ``context`` on ``doc_to_visual(doc)``; after round r the task's
        ``doc_to_text(doc, previous_output=answers, round_idx=r + 1, previous_round_info=info)``
        returns ``(visuals, context, done, round_results, info)``: the next round's image (None
        keeps the current one) and text, whether to stop, and the task's record of the rounds so
        far (it replaces the answers when not None). Each round is one fresh single-turn prompt,
        so any history is the task's to put in the context. The response is the list of rounds."""
        results: list = [None] * len(requests)
        for batch in self._batches(requests, lambda a: json.dumps(a[1], sort_keys=True, default=str)):
            states = []
            for i in batch:
                context, _, doc_to_visual, doc_to_text, doc_id, task, split = requests[i].args
                doc = self._doc(task, split, doc_id)
                states.append({"index": i, "doc": doc, "next": doc_to_text, "image": self._image(doc_to_visual(doc)),
                               "context": context, "answers": [], "info": None})
            gen_kwargs, active, round_idx = requests[batch[0]].args[1], states, 0
            while active:
                answers = self._generate([s["image"] for s in active], [s["context"] for s in active], dict(gen_kwargs))
                round_idx += 1
                remaining = []
                for state, answer in zip(active, answers):
                    state["answers"].append(answer)
                    visuals, context, done, record, state["info"] = state["next"](
                        state["doc"], previous_output=list(state["answers"]), round_idx=round_idx,
                        previous_round_info=state["info"])
                    if record is not None:
                        state["answers"] = list(record)
                    if not done:
                        state["image"] = self._image(visuals) if visuals else state["image"]
                        state["context"] = context
                        remaining.append(state)
                active = remaining
            for state in states:
                results[state["index"]] = state["answers"]
        self._report("generate_until_multi_round", len(requests))
        return results


class TokenselLlava(TokenselVLM):
    """``tokensel_llava``: :class:`TokenselVLM` under its older name (it takes any family)."""

    model_id = "tokensel_llava"
