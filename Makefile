# Relay's two entry points on a fresh machine: `make demo` (the main job) and `make test`.
# Both create the virtual environment at .venv from the project's own files first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_PROMPT ?= a red robot walking through a neon city at night, cinematic
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml requirements/cpu.txt requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned in this same pip call so the CPU wheel is used (see requirements/cpu.txt).
	$(PY) -m pip install --quiet -r requirements/dev.txt -e ".[engine]"
	# The web page test drives a real headless Chromium: the distribution's package, where apt
	# is available to root (elsewhere that test is skipped and says why).
	@if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium and chromium-driver (apt) for the web page test"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
		(apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1) || \
		echo "could not install chromium: the web page test will be skipped"; \
	fi
	touch $(STAMP)

install: $(STAMP)

# The main job: relay serve on the embedded tiny model, relay submit with streamed progress
# and previews, the video written to out/demo.mp4, the server drained.
demo: $(STAMP)
	$(VENV)/bin/relay demo --prompt "$(DEMO_PROMPT)" --output out/demo.mp4

# pytest exits 5 when it collected nothing; that is not a failure of the suite.
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

bench: $(STAMP)
	$(VENV)/bin/relay bench engine

clean:
	rm -rf $(VENV) out .pytest_cache
