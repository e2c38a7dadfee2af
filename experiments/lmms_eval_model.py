"""lmms-eval plugin: any tokensel selector inside a Hugging Face LLaVA, scored by lmms-eval's tasks.

``TokenselLlava`` is an lmms-eval model (``lmms_eval.api.model.lmms``) named ``tokensel_llava``.
It wraps :class:`~tokensel.selectors.pruned_vlm.PrunedLlava`: K image tokens, chosen by the
selector between the vision tower and the projector, then greedy decoding with the model's own
chat template. ``make setup`` installs lmms-eval in the one environment (``pip install tokensel[lmms]``
elsewhere)::

    .venv/bin/lmms-eval --model tokensel_llava \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,selector=divprune,budget=64 \\
        --tasks docvqa_val,chartqa --batch_size 4 --output_path eval_lmms/
    # the same: make eval-lmms ARGS="--model tokensel_llava --model_args ... --tasks ..."

lmms-eval 0.7.3 finds the class through the ``lmms_eval.models`` entry-point group (pyproject.toml):
``lmms_eval.models.__init__._initialize_model_registry`` calls
``ModelRegistryV2.load_entrypoint_manifests`` (``lmms_eval/models/registry_v2.py``), which loads
:func:`manifest`. The entry point is visible once tokensel is (re)installed in the environment.

``model_args``: ``pretrained`` (a LLaVA folder or hub id), ``selector`` (``full``, a training-free
baseline such as ``divprune``, or a trained checkpoint path), ``budget`` (a token count or keep
ratio; not for ``full``), ``feature_space`` (``vision`` | ``projector``), ``view_selection``
(LLaVA-NeXT: ``per_view`` | ``across``), ``batch_size`` (else
lmms-eval's ``--batch_size``), ``device`` (default: cuda if available), ``precision`` (32 | bf16 | 16),
``max_new_tokens`` (when the task sets none; default 32), ``seed`` (of the random baseline).
Decoding is always greedy; ``until`` strings and the EOS token end an answer. One image per
prompt (LLaVA-1.5 or LLaVA-NeXT) and one process (no data parallelism). lmms-eval's own hub tasks need
the hub; ``--limit N`` takes the first N documents, so do not report metrics from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from loguru import logger  # lmms-eval's logger: shown with --verbosity INFO
from tqdm import tqdm

from lmms_eval.api.model import lmms
from tokensel.selectors.pruned_vlm import PrunedLlava

MODEL_ID = "tokensel_llava"
IMAGE_TOKEN = "<image>"  # tasks that write the placeholder themselves: the chat template places the image


def manifest():
    """The entry point's payload: what ``ModelRegistryV2`` registers (imported lazily, because the
    registry loads this module while ``lmms_eval.models`` is still initialising)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.TokenselLlava")


class TokenselLlava(lmms):
    """``tokensel_llava``: lmms-eval's ``generate_until``, ``loglikelihood`` and
    ``generate_until_multi_round`` on a LLaVA that keeps ``budget`` image tokens (module docstring)."""

    is_simple = True

    def __init__(self, pretrained: str, selector: str = "full", budget=None, feature_space: str = "vision",
                 view_selection: str = "per_view",
                 batch_size=1, device: Optional[str] = None, precision="32", max_new_tokens=32, seed=0,
                 max_batch_size=None, **unknown):
        super().__init__()
        from tokensel.common.errors import ConfigError
        from tokensel.selectors.budget import parse_budgets

        if unknown:
            raise ConfigError(f"{MODEL_ID}: unknown model_args {', '.join(sorted(unknown))}")
        try:
            self.batch_size_per_gpu = int(batch_size)
        except ValueError:
            raise ConfigError(f"{MODEL_ID}: batch_size={batch_size!r} must be a number ('auto' is not supported)") from None
        self.max_new_tokens = int(max_new_tokens)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        base = PrunedLlava.from_pretrained(str(pretrained), precision=str(precision), feature_space=str(feature_space),
                                           view_selection=str(view_selection))
        self.selector_name = str(selector)
        net = self._build_selector(self.selector_name, base.model.config, int(seed))
        if net is None and budget is not None:
            raise ConfigError(f"{MODEL_ID}: selector=full keeps every image token; drop budget={budget}")
        if net is not None and budget is None:
            raise ConfigError(f"{MODEL_ID}: selector={selector} needs a budget (a token count or a keep ratio)")
        budgets = parse_budgets(str(budget), "budget") if budget is not None else [None]
        if len(budgets) != 1:
            raise ConfigError(f"{MODEL_ID}: budget={budget!r}: one budget per run")
        self.budget = budgets[0]
        self.vlm = PrunedLlava(base.model.to(self._device), base.processor, net, self.budget,
                               str(feature_space), str(view_selection))
        self.tokenizer = base.processor.tokenizer
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

    @staticmethod
    def _build_selector(name: str, config, seed: int):
        from tokensel.common.errors import ConfigError
        from tokensel.selectors.catalog import baseline_names, build_baseline, load_selector

        if name in ("full", "none", ""):
            return None
        tower = config.vision_config
        side = int(tower.image_size) // int(tower.patch_size)
        if name in baseline_names():
            return build_baseline(name, (side, side), seed)
        if not (name.endswith(".ckpt") or Path(name).is_dir()):
            raise ConfigError(f"{MODEL_ID}: selector={name!r} is neither full, a baseline "
                              f"({', '.join(baseline_names())}), a checkpoint (.ckpt) nor an exported folder")
        net = load_selector(name)
        if (net.dims.num_tokens, net.dims.dim) != (side * side, int(tower.hidden_size)):
            raise ConfigError(f"{MODEL_ID}: {name} was trained on {net.dims.num_tokens} tokens x {net.dims.dim}, "
                              f"but the LLaVA's tower gives {side * side} x {tower.hidden_size}")
        return net

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
        return context.replace(IMAGE_TOKEN, "").strip()

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
        prompt = self.vlm.prune(images, [self._text(c) for c in contexts])
        self.image_tokens += prompt.image_tokens
        self.candidate_tokens += prompt.candidate_tokens
        return prompt.inputs

    def _report(self, what: str, count: int) -> None:
        budget = "all tokens" if self.budget is None else f"budget {self.budget}"

        def mean(values: list[int]) -> str:
            m = sum(values) / max(1, len(values))
            return f"{m:g}" if float(m).is_integer() else f"{m:.1f}"

        logger.info(f"{MODEL_ID} {what}: {count} prompts, {mean(self.image_tokens)} of {mean(self.candidate_tokens)} "
                    f"image tokens per prompt "
                    f"({self.selector_name}, {budget})")

    @torch.no_grad()
    def _generate(self, images, contexts, gen_kwargs: dict) -> list[str]:
        """Greedy answers, each cut at the first ``until`` string."""
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [u for u in until if u]
        if (float(gen_kwargs.get("temperature") or 0) > 0 or gen_kwargs.get("do_sample")) and not self._warned_sampling:
            logger.warning(f"{MODEL_ID} decodes greedily; the task's sampling settings are ignored")
            self._warned_sampling = True
        tokenizer = self.tokenizer
        pad = self.vlm.pad_token_id
        out = self.vlm.model.generate(**self._prefill(images, contexts), do_sample=False, num_beams=1,
                                      max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
                                      pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                      stop_strings=until or None, tokenizer=tokenizer if until else None)
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
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc=MODEL_ID)
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
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc=MODEL_ID)
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
        prefill = self._prefill(images, contexts)
        embeds, mask = prefill["inputs_embeds"], prefill["attention_mask"]
        ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
        width, start = max(map(len, ids), default=0), embeds.shape[1]
        tokens = torch.zeros(len(ids), width, dtype=torch.long, device=embeds.device)
        real = torch.zeros_like(tokens)
        for row, seq in enumerate(ids):
            tokens[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            real[row, :len(seq)] = 1
        embeds = torch.cat([embeds, self.vlm.model.get_input_embeddings()(tokens)], 1)
        mask = torch.cat([mask, real.to(mask.dtype)], 1)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
        logits = self.vlm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
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
