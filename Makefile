# Every target creates what it needs: the venv with the pinned packages, the pinned CDK CLI.
SHELL := /bin/bash
VENV := .venv
PYTHON := $(VENV)/bin/python
CDK := node_modules/.bin/cdk
# checkov pins its own boto3 and friends: it lives in a venv of its own.
CHECKOV_VENV := .venv-checkov
CHECKOV_VERSION := 3.3.30
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20

# Settings for `make deploy`/`make synth`, e.g. make deploy CONTEXT="-c num_nodes=4".
CONTEXT ?=
# Arguments for the local cluster, e.g. make local ARGS="--num-nodes 4 --devices-per-node 1".
ARGS ?=

.PHONY: venv dev cli test test-fast lint synth deploy destroy destroy-storage local rehearse bench clean gpu-check \
	status logs results runs stop resume

# torch first, the CPU build (or FABRIC_TORCH_INDEX's), from where install.sh would take it
# (local/torch_source.py): PyPI's Linux torch is the multi-GB CUDA build. The requirements then
# find their torch pin satisfied.
TORCH_PIN = $(shell grep -m1 '^torch==' userdata/requirements-node.txt)
$(VENV)/.runtime: requirements.txt userdata/requirements-node.txt trainer/requirements.txt \
		local/torch_source.py
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet $$($(PYTHON) -m local.torch_source) "$(TORCH_PIN)"
	$(PYTHON) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)
	$(PYTHON) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION):
	python3 -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet checkov==$(CHECKOV_VERSION)
	touch $@

$(CDK): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

venv: $(VENV)/.runtime
dev: $(VENV)/.dev
cli: $(CDK)

lint: dev
	$(VENV)/bin/ruff check .

# Two workers (this machine's cores), each taking one scope at a time, longest first
# (tests/conftest.py); a fast module is one scope. E.g. make test PYTEST_WORKERS=4.
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL = -n $(PYTEST_WORKERS) --dist loadgroup

test: dev cli
	$(VENV)/bin/ruff check .
	$(PYTHON) -m pytest $(PYTEST_PARALLEL)

# The edit-run loop: every test but those marked slow (training processes, the local cluster,
# real installs, network namespaces, the rehearsal; see the marker in pyproject.toml).
test-fast: dev cli
	$(VENV)/bin/ruff check .
	$(PYTHON) -m pytest $(PYTEST_PARALLEL) -m "not slow"

# Two stacks: FabricStorage (the runs' bucket and the logs, long-lived) and FabricCluster
# (disposable). Deploying the cluster deploys the storage first; destroy removes the cluster only.
synth: venv cli
	$(CDK) synth --all $(CONTEXT)

deploy: venv cli
	$(CDK) deploy FabricCluster $(CONTEXT)

destroy: venv cli
	$(CDK) destroy FabricCluster $(CONTEXT)

# The runs and logs of every cluster: says what it deletes, asks first (ARGS=--yes: does not ask).
destroy-storage: venv
	$(PYTHON) -m console destroy-storage $(ARGS)

clean:
	rm -rf cdk.out .pytest_cache .ruff_cache

# The main job: a real 2-node x 2-device training run on this machine (127.0.0.1).
local: venv
	$(PYTHON) -m local.cluster $(ARGS)

# Watching a deployed cluster from this terminal (AWS credentials of the deploy), e.g.
# make status ARGS=--watch, make logs NODE=1 FOLLOW=1, make results RUN=run-0123abcd.
NODE ?=
FOLLOW ?=
RUN ?=
status: venv
	$(PYTHON) -m console status $(ARGS)

logs: venv
	$(PYTHON) -m console logs $(if $(NODE),--node $(NODE)) $(if $(FOLLOW),--follow) $(ARGS)

results: venv
	$(PYTHON) -m console results $(if $(RUN),--run $(RUN)) $(ARGS)

runs: venv
	$(PYTHON) -m console runs $(ARGS)

# recover=true: every rank's group to zero (the nodes terminate), and back to one per rank.
stop: venv
	$(PYTHON) -m console stop $(ARGS)

resume: venv
	$(PYTHON) -m console resume $(ARGS)

# The whole deploy on this machine: the real template on moto, every node's real user data in
# its own network namespace (needs root and iproute2), then cdk destroy's path.
rehearse: dev
	$(PYTHON) -m rehearsal.run $(ARGS)

# The payload on a real GPU (fabric.device, NCCL, bf16, resume), which no CPU test can reach.
# With the GPU machine's own python3 (CUDA torch, lightning, click): no .venv, no boto3, so the
# venv's bin is taken off PATH for it. E.g. make gpu-check GPU_PYTHON=/opt/conda/bin/python.
GPU_PYTHON ?= python3
gpu-check:
	PATH="$(subst $(CURDIR)/$(VENV)/bin:,,$(PATH))" $(GPU_PYTHON) -m gpu.check

# Where the time goes (medians of 3 runs, ratios from the same run): bench/results.md.
bench: dev
	$(PYTHON) -m bench.run $(ARGS)
