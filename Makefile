# Loomis developer entry points. `make demo` and `make test` work on a fresh machine
# (Python 3.11 + pip + apt); everything else is installed into .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test lint bench up redis-server clean

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# constraints-cpu.txt pins the CPU torch wheel; GPU installs: see README "Deployment".
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[worker,dev]'
	touch $(STAMP)

install: $(STAMP)

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "redis-server missing: installing it with apt"; \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

demo: install redis-server
	$(VENV)/bin/loomis demo

up: install redis-server
	$(VENV)/bin/loomis up

test: install redis-server
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check services shared tests bench
	$(VENV)/bin/mypy services shared

bench: install redis-server
	$(PY) bench/overhead.py
	$(PY) bench/lora_swap.py
	$(PY) bench/batching.py
	$(PY) bench/pipeline_cache.py
	$(PY) bench/tagger.py
	$(PY) bench/train.py

clean:
	rm -rf .loomis out
