# Every target creates .venv on demand, so any of them works as the first command on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
# torch is installed first, on its own: TORCH_SPEC from pip's configured index, or from TORCH_INDEX_URL if set
# (e.g. https://download.pytorch.org/whl/cpu for a CPU-only build, .../whl/cu128 for a CUDA 12.8 build)
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_DIR ?= data
# Extra Hydra overrides for `make train`, e.g. make train ARGS="trainer.max_steps=100"
ARGS ?=
# make test: parallel test processes (see test:)
TEST_WORKERS ?= 2

.PHONY: install train test test-slow lint bench render data clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install --quiet -e ".[dev,sweep]"
	touch $(STAMP)

data: $(STAMP)
	$(BIN)/gqn-data synth --family rooms --out $(DATA_DIR)/synthetic_rooms --image-size 32 --train-scenes 5000 --test-scenes 200 --skip-existing

train: data
	$(BIN)/gqn-train $(ARGS)
	$(BIN)/gqn-eval ckpt_path=outputs/latest/checkpoints/last.ckpt
	$(BIN)/gqn-render ckpt_path=outputs/latest/checkpoints/last.ckpt

render: $(STAMP)
	$(BIN)/gqn-render ckpt_path=outputs/latest/checkpoints/last.ckpt

# pytest-xdist: TEST_WORKERS processes share the CPU's cores (tests/conftest.py gives each its share of torch threads);
# the tests marked serial time themselves against a cap and run alone afterwards. TEST_WORKERS=0: all in one process.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow and not serial"
	$(BIN)/python -m pytest -q -m "serial and not slow" || [ $$? -eq 5 ]  # 5: none selected

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/gqn-bench

clean:
	rm -rf outputs multirun bench .pytest_cache
