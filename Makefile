# Every target creates the virtual environment first when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= dev

.PHONY: install deps browser test demo lint clean

# the one install step of CI (make test): the project and its EXTRAS, editable
$(BIN)/activate: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[$(EXTRAS)]"
	touch $(BIN)/activate

install: $(BIN)/activate

# only what pyproject.toml names (build requirements, dependencies, the EXTRAS), not the project:
# docker/Dockerfile runs `make deps EXTRAS=cluster` before it copies the code, so that layer is
# rebuilt only when pyproject.toml or this file changes
deps:
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/python -c 'import sys, tomllib; \
	project = tomllib.load(open("pyproject.toml", "rb")); \
	extras = project["project"].get("optional-dependencies", {}); \
	names = [e for e in sys.argv[1].split(",") if e]; \
	unknown = sorted(set(names) - set(extras)); \
	unknown and sys.exit(f"make deps: no extra {unknown} in pyproject.toml, only {sorted(extras)}"); \
	print(*project["build-system"]["requires"], *project["project"]["dependencies"], \
	      *(d for e in names for d in extras[e]), sep="\n")' "$(EXTRAS)" > $(VENV)/deps.txt
	$(BIN)/pip install -r $(VENV)/deps.txt

# the browser tests drive Debian's chromium (Playwright's own browser download needs internet
# that CI machines lack): installed with apt-get when missing and make runs as root, else make
# stops with one line saying what to install
browser:
ifeq ($(shell command -v chromium),)
ifeq ($(shell id -u)$(if $(shell command -v apt-get),+apt),0+apt)
	@echo "make: installing chromium for the browser tests (apt-get install chromium)"
	apt-get update -qq && apt-get install -y -qq chromium >/dev/null
else
	$(error make test needs chromium for its browser tests: install it (Debian/Ubuntu: sudo apt-get install chromium) and run make test again)
endif
endif

test: $(BIN)/activate browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

demo: $(BIN)/activate
	$(BIN)/python -m orchestrate.ablation

lint: $(BIN)/activate
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info ray_results mlflow.db mlartifacts
