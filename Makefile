# mkv: the operator's and developer's entry points.
# `make run` and `make test` install what is missing, so they work on a fresh Debian machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv nginx systemd-analyze run test lint bench clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lint]'
	touch $(STAMP)

# Debian's nginx-light carries the WebDAV module the volumes need.
nginx:
	@command -v nginx >/dev/null 2>&1 || command -v /usr/sbin/nginx >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq nginx-light; }

# systemd-analyze checks the units in deploy/systemd (tests/test_systemd.py); Debian's
# systemd package has it, and installing it does not make systemd the init.
systemd-analyze:
	@command -v systemd-analyze >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq systemd; }

run: venv nginx
	$(PY) -m mkv.tools.devcluster --dir var --port 3000

test: venv nginx systemd-analyze
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check mkv tests

bench: venv nginx
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench.run $(if $(FULL),--full,)

clean:
	rm -rf var .pytest_cache .hypothesis
