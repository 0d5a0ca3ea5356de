# Every target creates the venv if it is missing. `make test` on a fresh clone needs nothing installed by hand.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip -q --disable-pip-version-check
VIDRT  := $(VENV)/bin/vidrt
MODEL  ?=
OUT    ?=

.PHONY: venv test run engines bench lint clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	# the pinned CPU wheel first: an unpinned torch would pull a multi-GB CUDA build
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[export,dev]'
	# the official Wan code, only as a test reference (its own requirements include flash_attn)
	$(PIP) install --no-deps wan22==2.2.11
	touch $@

venv: $(VENV)/.installed

test: venv
	$(VENV)/bin/pytest -q

lint: venv
	$(VENV)/bin/ruff check runtime export tests benchmarks

# make engines MODEL=/path/to/Wan2.1-T2V-1.3B [OUT=engines/wan2.1-t2v-1.3b]
engines: venv
	@test -n "$(MODEL)" || { echo "usage: make engines MODEL=/path/to/checkpoint [OUT=engines/NAME]"; exit 2; }
	$(VIDRT) export --model "$(MODEL)" $(if $(OUT),--out "$(OUT)")

clean:
	rm -rf $(VENV) .pytest_cache
