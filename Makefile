# Loomis developer entry points. `make demo` and `make test` work on a fresh machine
# (Python 3.11 + pip + apt); everything else is installed into .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install lock demo test lint bench up redis-server curl-jq chromium wrk clean

# requirements/cpu.txt pins every package of the environment (see `make lock`); the venv is
# installed from it exactly, then checked: `pip check` and tests/test_lock.py catch drift.
$(STAMP): pyproject.toml requirements/cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q 'pip==26.3'
	$(PY) -m pip install -q -r requirements/cpu.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

# Re-resolve both lock files from pyproject.toml. Upgrading is a deliberate change: run this,
# then `make test`, and commit the lock files with the code that needs them.
# It needs only uv (at its locked version), not an installed project, so a pyproject change
# that the old lock cannot satisfy can still be locked.
lock:
	test -x $(PY) || python3 -m venv $(VENV)
	test -x $(VENV)/bin/uv || $(PY) -m pip install -q "uv==$$(sed -n 's/^uv==//p' requirements/cpu.txt)"
	$(VENV)/bin/uv pip compile pyproject.toml --extra worker --extra dev -c constraints-cpu.txt \
	  --find-links /opt/wheels --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --no-emit-find-links --custom-compile-command 'make lock' -o requirements/cpu.txt
	$(VENV)/bin/uv pip compile pyproject.toml --extra worker \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --custom-compile-command 'make lock' -o requirements/cuda.txt

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

# The README's curl examples (tests/test_readme_examples.py) need curl and jq.
curl-jq:
	@command -v curl >/dev/null 2>&1 && command -v jq >/dev/null 2>&1 || { \
	  echo "curl or jq missing: installing them with apt"; \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq curl jq >/dev/null; }

# The console's browser tests drive Debian's Chromium (Playwright's own download cannot work
# without internet access to its CDN).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "chromium missing: installing it with apt"; \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

# bench/gateway.py drives the gateway with wrk.
wrk:
	@command -v wrk >/dev/null 2>&1 || { \
	  echo "wrk missing: installing it with apt"; \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq wrk >/dev/null; }

test: install redis-server curl-jq chromium
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check services shared tests bench
	$(VENV)/bin/mypy services shared

bench: install redis-server wrk
	$(PY) bench/overhead.py
	$(PY) bench/gateway.py
	$(PY) bench/scenes.py
	$(PY) bench/webhooks.py
	$(PY) bench/compat.py
	$(PY) bench/subject.py
	$(PY) bench/recovery.py
	$(PY) bench/lora_swap.py
	$(PY) bench/batching.py
	$(PY) bench/pipeline_cache.py
	$(PY) bench/tagger.py
	$(PY) bench/train.py
	$(PY) bench/real_models.py

clean:
	rm -rf .loomis out
