# Two commands do all set-up: `make demo` and `make test`. Both build .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
KLAS := $(VENV)/bin/klas
STAMP := $(VENV)/.klas-installed

.PHONY: demo test bench clean-demo

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(KLAS) zoo
	$(KLAS) cache --model klas_vit_ti --model klas_vit_s --model klas_vit_b --data digits --out cache/demo-vit
	@echo "(search, train and export follow once those stages exist)"

clean-demo:
	rm -rf cache/demo-vit cache/runs/demo-vit
