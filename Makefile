# `make demo` and `make test` work on a fresh machine with Python 3.11 and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,plot]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/jouleprobe demo

test: lint
	$(BIN)/python -m pytest -q

# Style, types (mypy --strict, [tool.mypy]) and the direction of imports ([tool.importlinter]).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# gpu_validate.py is run on a GPU node by hand (its --cpu mode is a test); generation_server.py
# is the model server it uses; common.py is what the benchmarks share.
bench: $(STAMP)
	@for b in bench/*.py; do \
	  case $$b in */gpu_validate.py|*/generation_server.py|*/common.py) continue;; esac; \
	  echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
