# Two commands a new user needs: `make run` and `make test`. Both create .venv/ on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Models are looked up here by name; ../shared/models holds the project's test exports.
export VISION_DAEMON_MODEL_DIR ?= $(if $(wildcard ../shared/models),../shared/models,models)
# Tests never touch the network; the daemon itself always disables ultralytics' auto-install.
export YOLO_AUTOINSTALL := False

.PHONY: install run test test-fast lint format clean browser triton-venv

# The Triton server (vision-triton) runs in its own virtualenv: pytriton needs numpy<2.
TRITON_VENV := .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

$(TRITON_STAMP): requirements-triton.txt
	test -x $(TRITON_VENV)/bin/python || $(PY) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q --upgrade pip
	$(TRITON_VENV)/bin/pip install -q -r requirements-triton.txt
	touch $(TRITON_STAMP)

triton-venv: $(TRITON_STAMP)

run: $(STAMP)
	$(BIN)/vision-daemon --config configs/default.toml $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The dashboard's browser tests drive the system Chromium (Debian package) with Playwright, the
# MQTT-over-TLS test runs Mosquitto, and the TLS tests make certificates with openssl; as root,
# install what is missing; otherwise those tests skip with one line saying why.
browser:
	@if [ "$$(id -u)" = 0 ] && ! { command -v chromium && command -v mosquitto \
		&& command -v openssl; } >/dev/null; then \
		apt-get update -q && apt-get install -y -q chromium mosquitto openssl; fi

# Both tiers: the fast unit tests, then the slow ones (real sockets, models, browsers, subprocesses).
test: lint browser $(TRITON_STAMP)
	YOLO_OFFLINE=1 $(BIN)/pytest $(PYTEST_ARGS)

# The fast tier only: policies with an injected clock, no sockets; seconds in all.
test-fast: $(STAMP)
	YOLO_OFFLINE=1 $(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(TRITON_VENV) .mypy_cache .ruff_cache .pytest_cache artifacts
