# The two set-up commands: `make demo` and `make test` build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Which torch the training extras get. CI and CPU-only machines pin the local CPU wheel
# (an unpinned torch pulls a multi-GB CUDA build); GPU users may pass TORCH=torch.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

# import-linter and mypy see the rlhf_tui namespace through these symlinks to the top-level folders (the editable
# install maps the folders with a finder neither tool can follow). Made fresh on each run, so a clean clone works.
LINT_ROOT := build/lint

.PHONY: demo test lint lint-root bench venv clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[train,test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rlhf-tui demo

# pytest exits 5 when no test ran; that must fail too (it does: any non-zero exit fails make).
# Then the rules the code keeps by itself (docs/architecture.md): each step runs only if the one before passed.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)
	$(MAKE) --no-print-directory lint

lint: $(STAMP) lint-root
	PYTHONPATH=$(LINT_ROOT) $(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	PYTHONPATH= $(VENV)/bin/mypy

lint-root:
	mkdir -p $(LINT_ROOT)/rlhf_tui
	for d in analysis bridge tui; do ln -sfn ../../../$$d $(LINT_ROOT)/rlhf_tui/$$d; done

# Peers for the step-time table (TensorBoard, W&B offline) go to .bench-site, appended after the venv's own
# packages, so the test environment stays as `make test` built it.
bench: $(STAMP)
	test -d .bench-site || $(PY) -m pip install -q --target .bench-site tensorboard wandb
	BENCH_EXTRA_SITE=$(CURDIR)/.bench-site $(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
