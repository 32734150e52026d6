# Two commands do all the set-up: `make demo` and `make test` create .venv and install into it when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Small-op workloads: one intra-op thread is faster on 2 cores (see DESIGN.md section 3).
export OMP_NUM_THREADS ?= 1
export WANDB_MODE ?= disabled

.PHONY: demo test test-slow test-integrations test-mutations reproduce reproduce-check promote bench clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and exactly pinned: a loose requirement would pull a multi-GB CUDA build.
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The shipped learned optimizer, untuned, beside AdamW (default and tuned) on a small transformer LM and a digits CNN:
# results/demo/{demo.png, table.md, summary.json} (experiments/demo.py; about 125 CPU-seconds in two processes).
demo: $(STAMP)
	$(PY) experiments/demo.py

# pytest exits 5 when it collected no test: that is a failure of ours, never a pass.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The learned optimizer in the HF Trainer, accelerate, Lightning, timm and DDP (tests/integrations, examples/): the
# `integrations` extra at the exact versions of constraints-integrations.txt, torch kept at constraints.txt's CPU build.
# timm requires torchvision, and the registry's torchvision for torch 2.13.0 (0.28.0) is a CUDA build whose ops library
# cannot load beside the CPU torch (it needs libtorch_cuda.so). Installed, it breaks `import torchvision` (and with it
# transformers' optional image code): it is removed from the environment and a copy goes to
# .venv/torchvision-python, which only the timm test puts on its path, in its own process, after declaring the two op
# schemas torchvision's Python code needs (tests/integrations/timm_runner.py).
INTEGRATIONS_STAMP := $(VENV)/.integrations
$(INTEGRATIONS_STAMP): $(STAMP) constraints-integrations.txt
	$(PIP) install -q -c constraints.txt -c constraints-integrations.txt -e '.[integrations]'
	$(PIP) uninstall -q -y torchvision
	rm -rf $(VENV)/torchvision-python
	$(PIP) install -q --no-deps --target $(VENV)/torchvision-python -c constraints-integrations.txt torchvision
	touch $(INTEGRATIONS_STAMP)

test-integrations: $(INTEGRATIONS_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m integrations tests/integrations; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-integrations: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# Each recorded protocol bug (tests/mutations/) applied to a copy of HEAD: the guard named beside it must fail.
test-mutations: $(STAMP)
	$(PY) tests/mutations/run.py

# Every number and figure in README.md and results/, on the final-test split (see README for the time it takes on
# 2 CPUs). Each script pins portable numerics and runs its independent jobs in two processes. It writes only under
# results/ and never into learned_opt/pretrained/ (shipping weights is `make promote`); each final run reads its
# test split once (results/*/test_reads.json): a second reproduce of the same weights stops until forced. The
# horizon part runs before estimators.py, which copies its target keys from the horizon summary.
# the weights general_offsuite.py compares on the demo's LM and ViT (validation splits): v1 and the five v2b seeds
# (then the shipped v2d alone); general.py's final run and general_usage.py read the shipped recipe's seeds, v2d's
V2B = results/general/train_v2b
OFFSUITE_WEIGHTS = v1=results/general/train/seed1/lopt.pt,v2b_s0=$(V2B)/seed0/lopt.pt,$\
	v2b_s1=$(V2B)/seed1/lopt.pt,v2b_s2=$(V2B)/seed2/lopt.pt,v2b_s3=$(V2B)/seed3/lopt.pt,v2b_s4=$(V2B)/seed4/lopt.pt
reproduce: $(STAMP)
	$(PY) experiments/quadratic.py --final true --workers 2
	$(PY) experiments/digits.py --final true --workers 2
	$(PY) experiments/metanet.py --final true --workers 2
	$(PY) experiments/control.py --final true --workers 2
	$(PY) experiments/digits_ablation.py --workers 2
	$(PY) experiments/estimators_horizon.py --final true --workers 2
	$(PY) experiments/estimators.py
	$(PY) experiments/general_train.py --workers 3
	$(PY) experiments/general_train.py --preset v2d --workers 2
	$(PY) experiments/general.py --final true --workers 2 --horizon 200 --train_dir results/general/train_v2d
	$(PY) experiments/general_usage.py --train_dir results/general/train_v2d
	$(PY) experiments/demo.py --workers 2
	$(PY) experiments/demo.py --models text,vit --out_dir results/general/offsuite --workers 2
	$(PY) experiments/general_offsuite.py --weights $(OFFSUITE_WEIGHTS)
	$(PY) experiments/general_offsuite.py --weights v2d_s3=general --lrs 1,0.3,0.1 --workers 1 \
		--out_dir results/general/offsuite_val_v2d
	$(PY) benchmarks/bench.py

# Ship new general weights as learned_opt/pretrained/general.pt (+ manifest), the only recipe that writes there, and
# only if their recipe beats the shipped one's on validation tasks (experiments/general_promote.py: the rule, and the
# general.py --final false evaluations it reads, run here first: about 5.5 CPU-hours from scratch, resumable).
# Statistical reproducibility (issue 23): where meta-training departs between the CPU kernel paths this machine can
# select (tools/numerics_trace.py, a few minutes), then one meta-training seed of each experiment re-run under this
# CPU's own kernels, each headline checked against the committed seeds' prediction interval
# (experiments/reproduce_check.py; one seed of each experiment: about a fifth of `make reproduce`). Writes
# results/reproducibility/ only; the re-runs go to runs/reproduce_check/.
reproduce-check: $(STAMP)
	$(PY) tools/numerics_trace.py
	$(PY) experiments/reproduce_check.py

GENERAL_DEV = --final false --horizon 200 --cache_dir results/general/tuning_cache --jobs_dir results/general/dev/jobs \
	--workers 2
# (each evaluation is a file target: made once per set of weights, kept when only the code moved on)
# the shipped recipe's evaluation, the incumbent: v2d since 2026-12-08 (v1's is results/general/dev/v1)
INCUMBENT ?= v2d
results/general/dev/$(INCUMBENT)/summary.json: $(wildcard results/general/train_$(INCUMBENT)/seed*/lopt.pt) | $(STAMP)
	$(PY) experiments/general.py $(GENERAL_DEV) --train_dir results/general/train_$(INCUMBENT) \
		--out_dir results/general/dev/$(INCUMBENT)
# the candidate recipe: general_train.py --preset $(CANDIDATE) writes results/general/train_$(CANDIDATE) (v2b was
# evaluated and not promoted: results/general/dev/v2b/promotion.json; v2d was promoted: dev/v2d/promotion.json)
CANDIDATE ?= v3a
ifneq ($(CANDIDATE),$(INCUMBENT))
results/general/dev/$(CANDIDATE)/summary.json: $(wildcard results/general/train_$(CANDIDATE)/seed*/lopt.pt) | $(STAMP)
	$(PY) experiments/general.py $(GENERAL_DEV) --train_dir results/general/train_$(CANDIDATE) \
		--out_dir results/general/dev/$(CANDIDATE)
endif
promote: results/general/dev/$(INCUMBENT)/summary.json results/general/dev/$(CANDIDATE)/summary.json
	$(PY) experiments/general_promote.py --candidate_train results/general/train_$(CANDIDATE) \
		--candidate_eval results/general/dev/$(CANDIDATE) --incumbent_eval results/general/dev/$(INCUMBENT)

# Speed and memory benchmarks: results/benchmarks/{summary.json, table.md} (about 5 minutes).
bench: $(STAMP)
	$(PY) benchmarks/bench.py

clean:
	rm -rf $(VENV) build *.egg-info
