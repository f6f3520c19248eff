# Every target creates the virtual environment first when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= dev
# mkdocs-material's banner about its successor, printed on every build
export NO_MKDOCS_2_WARNING := 1

.PHONY: install deps browser test docs demo lint clean

# One stamp per set of extras: make demo installs the project alone, make test adds the test and
# docs tools. pip's output goes to $(VENV)/pip.log and is shown (its tail) only when it fails.
define pip_install
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@echo "make: installing $(1) into $(VENV) (pip's log: $(VENV)/pip.log)"
	@{ $(BIN)/pip install --upgrade pip && $(BIN)/pip install -e "$(1)"; } >$(VENV)/pip.log 2>&1 \
	  || { tail -n 25 $(VENV)/pip.log; echo "make: pip failed; its whole log: $(VENV)/pip.log"; exit 1; }
	@touch $@
endef

$(VENV)/installed-demo: pyproject.toml
	$(call pip_install,.)

TEST_INSTALL := .[dev,docs]
$(VENV)/installed-test: pyproject.toml
	$(call pip_install,$(TEST_INSTALL))

# the demo takes the test environment where there is one (it holds the project too)
DEMO_ENV := $(if $(wildcard $(VENV)/installed-test),$(VENV)/installed-test,$(VENV)/installed-demo)

install: $(VENV)/installed-test

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

test: $(VENV)/installed-test browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mkdocs build --strict --site-dir $(VENV)/site-check
	$(BIN)/python -m pytest

# the manual (docs/) as a site in site/: open site/index.html
docs: $(VENV)/installed-test
	$(BIN)/mkdocs build --strict

demo: $(DEMO_ENV)
	@$(BIN)/python -m orchestrate.ablation

lint: $(VENV)/installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info ray_results mlflow.db mlartifacts site
