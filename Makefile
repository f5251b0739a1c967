# Two commands do all set-up on a fresh machine:
#   make up     install, then run the home lab (cloud, gateway, 3 simulated devices, console)
#   make test   install, then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
ARGS   ?=

.PHONY: up test install system-deps bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Debian packages the tests need (Mosquitto is the interoperability broker); only when root.
system-deps:
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	  if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ] || ! command -v mosquitto_sub >/dev/null 2>&1; then \
	    echo "installing mosquitto and mosquitto-clients (Debian)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null; \
	    systemctl disable --now mosquitto >/dev/null 2>&1 || service mosquitto stop >/dev/null 2>&1 || true; \
	  fi; \
	else \
	  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || echo "warning: mosquitto not installed and not root; interoperability tests will fail"; \
	fi

up: install
	$(VENV)/bin/cwsnet up $(ARGS)

test: install system-deps
	$(PY) -m pytest -q -ra $(ARGS)

bench: install system-deps
	$(PY) bench/e2e.py $(ARGS)

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
