# The two commands of the README: `make book` (the main job) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export SEMISEG_DATA ?= $(abspath ./data)

.PHONY: setup browser book train test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 || $(PY) -m pip install -q "torch>=2.4" "torchvision>=0.19"
	$(PY) -m pip install -q -e ".[dev,book]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

setup: $(VENV)/.installed

# Debian's chromium for the browser test (Playwright drives it; no browser download)
browser:
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# The site: the headline CamVid comparison (reused when its summaries are committed), the
# notebooks executed (cached until semiseg/ changes), HTML in book/_build/html.
book: setup
	$(PY) -m semiseg.compare camvid_quick --variants supervised full --seeds 0
	$(PY) book/build.py

# Supervised-only vs the full method on CamVid 1/8 split 0 (CPU profile), side by side.
train: setup
	$(PY) -m semiseg.compare camvid_quick --variants supervised full --seeds 0

test: setup browser
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs book/_build book/notebooks book/_mathjax test-artifacts
