# Every target creates the virtual environment first when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test demo lint clean

$(BIN)/activate: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	touch $(BIN)/activate

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
