# Two commands do all set-up on a fresh machine:
#   make up     install, then run the home lab (cloud, gateway, 3 simulated devices, console)
#   make test   install, then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
ARGS   ?=

.PHONY: up test install system-deps bench bench-outage lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The MicroPython WebAssembly port (npm, pinned in package-lock.json) for tests/test_firmware_core.py
NODE_FW = tests/firmware/node
$(NODE_FW)/node_modules/.installed: $(NODE_FW)/package-lock.json
	cd $(NODE_FW) && npm ci --no-audit --no-fund --silent
	touch $@

install: $(VENV)/.installed $(NODE_FW)/node_modules/.installed

# Debian packages the tests need, only when root: Mosquitto (the interoperability broker and
# its clients) and Chromium (the console's browser test). TLS certificates come from cwsnet.pki.
# systemd (systemd-analyze) and shellcheck check the Raspberry Pi unit and installer (deploy/pi).
DEBS = mosquitto mosquitto-clients chromium systemd shellcheck
system-deps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  systemctl disable --now mosquitto >/dev/null 2>&1 || service mosquitto stop >/dev/null 2>&1 || true; \
	else \
	  echo "warning: missing Debian packages:$$missing (run as root, or apt-get install them); tests needing them will fail"; \
	fi

up: install
	$(VENV)/bin/cwsnet up $(ARGS)

test: install system-deps
	$(PY) -m pytest -q -ra $(ARGS)

bench: install system-deps
	$(PY) bench/e2e.py $(ARGS)

bench-outage: install
	$(PY) bench/outage.py $(ARGS)

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
