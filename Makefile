# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV   ?= .venv
# torch is installed first and separately; the package itself does not pin it. Override for another platform:
#   make test TORCH="torch==2.9.1 torchvision==0.24.1"
TORCH  ?= torch==2.14.1 torchvision==0.29.1
BIN    := $(VENV)/bin
export YOLO_OFFLINE := 1

.PHONY: demo test venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev,demo]'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/act compress --config configs/demo_pose_qat.yaml --exist-ok

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
