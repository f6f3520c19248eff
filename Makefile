# Every target creates the virtual environment first when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= dev

.PHONY: install test demo lint clean

# the one install step: CI (make test) and the Docker image (make install EXTRAS=dev,cluster)
$(BIN)/activate: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[$(EXTRAS)]"
	touch $(BIN)/activate

install: $(BIN)/activate

test: $(BIN)/activate
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

demo: $(BIN)/activate
	$(BIN)/python -m orchestrate.ablation

lint: $(BIN)/activate
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info ray_results mlflow.db mlartifacts
