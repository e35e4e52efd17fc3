# Two commands do all the set-up: `make demo` and `make test`.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install ffmpeg demo test bench clean

install: ffmpeg $(STAMP)

# ffmpeg and ffprobe come from Debian; nothing to do when they are already on PATH.
ffmpeg:
	@command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq ffmpeg >/dev/null; }

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/stitchtime demo

test: install
	$(VENV)/bin/pytest -q

# Benchmarks write JSON under benchmarks/results/.
bench: install
	$(PYTHON) benchmarks/geometry.py
	$(PYTHON) benchmarks/generator.py
	$(PYTHON) benchmarks/method.py

clean:
	rm -rf $(VENV) stitchtime-data demo-output *.egg-info
