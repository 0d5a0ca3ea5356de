# Every target creates the venv if it is missing. `make test` on a fresh clone needs nothing installed by hand.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip -q --disable-pip-version-check
VIDRT  := $(VENV)/bin/vidrt
MODEL  ?=
OUT    ?=

.PHONY: venv browser test test-all run engines bench lint typecheck train-tiny default-model web-page-png clean gpu-check

# Two layers: `make run` needs only the torch-free runtime (numpy, onnxruntime, tokenizers, av, ...);
# `make test` and the export/bench targets add torch, diffusers, Ray and the dev tools on top.
$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(VENV)/.runtime: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e .
	touch $@

# torch: the CPU build, always. Plain `pip install torch` on Linux takes the multi-GB CUDA build.
# TORCH_INDEX empty: pip's own sources (these machines keep a CPU wheel of 2.13.0 on local disk);
# on a stock machine: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu  (PyTorch's CPU index)
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
$(VENV)/.installed: $(VENV)/.runtime Makefile
	$(PIP) install $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -e '.[export,dev]'
	# the official Wan code, only as a test reference (its own requirements include flash_attn)
	$(PIP) install --no-deps wan22==2.2.11
	# type stubs for the TensorRT backend (mypy); their dependency `tensorrt` is not installable from PyPI
	$(PIP) install --no-deps tensorrt-stubs==10.13.0.35.1
	touch $@

venv: $(VENV)/.installed

# tests/test_serve.py drives vidrt serve's web page in Debian's chromium (Playwright's own browser
# download is not used). As root with apt-get (CI's fresh machine) it is installed here; elsewhere
# that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "note: chromium is not installed (needs root and apt-get): the web page's browser test will skip"; }

# `make test` leaves out the tests marked slow (the five full-size export graphs, minutes each on 2 cores);
# `make test-all` runs them too.
test: venv browser
	$(VENV)/bin/pytest -q -m "not slow"

test-all: venv browser
	$(VENV)/bin/pytest -q

# A clip from the bundled tiny model, in seconds on a CPU (PROMPT="a blue square moving up" to change it;
# FAST=1: the 4-step distilled recipe, `--recipe fast`; IMAGE=docs/tiny-shapes-green-square.png: animate that
# picture, TI2V-style: the clip starts from it and moves as the prompt says).
# Installs the runtime only: no torch.
PROMPT ?= a red circle moving left
run: $(VENV)/.runtime
	$(VIDRT) run --prompt "$(PROMPT)" $(if $(IMAGE),--image "$(IMAGE)") $(if $(FAST),--recipe fast) -o clip.mp4 --overwrite

lint: venv
	$(VENV)/bin/ruff check runtime export tests benchmarks

# make engines MODEL=/path/to/Wan2.1-T2V-1.3B [OUT=engines/wan2.1-t2v-1.3b]
engines: venv
	@test -n "$(MODEL)" || { echo "usage: make engines MODEL=/path/to/checkpoint [OUT=engines/NAME]"; exit 2; }
	$(VIDRT) export --model "$(MODEL)" $(if $(OUT),--out "$(OUT)")

# Seconds per clip, per stage, peak memory, side by side with diffusers, cost growth, FLOPs (benchmarks/).
# Writes benchmarks/results/cpu-quick.{json,txt,png}; `$(PY) -m benchmarks.run` is the full suite.
# BENCH_ARGS="--workloads tiny" etc. adds options (python -m benchmarks.run --help).
bench: venv
	$(PY) -m benchmarks.run --quick $(BENCH_ARGS)

# Once, on a machine with an NVIDIA GPU and `pip install "vidrt[tensorrt]"`: build the bundled model's
# engines (with --check), run tests/gpu, print GPU seconds per stage and peak memory against the plan.
# Elsewhere it says why it skipped and exits 0 (benchmarks/gpu_check.py).
gpu-check: venv
	$(PY) -m benchmarks.gpu_check

typecheck: venv
	$(PY) tests/typing_prep.py >/dev/null
	$(PY) -m mypy -m vidrt.backends.tensorrt -m vidrt.backends.cuda -m vidrt.backends.residency -m vidrt.backends.doctor \
		-m vidrt.cli.trt -m vidrt.export.build_engines -m vidrt.export.quantize_fp8 -m vidrt.backends.refit \
		-m vidrt.backends.kernels -m vidrt.backends.device_ops

# Retrain the embedded tiny model (checkpoints/tiny-shapes/TRAINING.md): VAE, then umT5 + DiT, then the sampling
# sweep (export/train_tiny.py); the image-mode fine-tune and its scores (export/train_tiny_i2v.py); then the `fast`
# recipe's 4-step LoRA (export/distill_tiny.py, stage 7): 2592 teacher clips with one noise seed each (every
# teacher state kept; eight banks, two processes side by side), 1500 steps on the teacher's trajectory segments
# from zero. (The LoRAs of stages 3b, 5 and 6 were warm starts of one another; stage 7 starts from zero, so they
# are not rebuilt.) Seeded and step-counted; about four hours on a busy 2-core CPU. Writes checkpoints/tiny-shapes/.
# clip seeds[:image-clip seeds] of the eight banks; two processes (A, B), each making its four in turn
FAST_BANKS_A := 100000-100323: 100324-100647: 101224-101547: 101548-101799:200072-200143
FAST_BANKS_B := 100648-100971: 100972-101223:200000-200071 101800-102123: 102124-102375:200144-200215
train-tiny: venv
	nice -n 15 $(PY) -m vidrt.export.train_tiny --out checkpoints/tiny-shapes --stage all --seed 0
	rm -rf build/tiny-stage2 && mkdir -p build/tiny-stage2 \
		&& cp -r checkpoints/tiny-shapes/transformer checkpoints/tiny-shapes/text_encoder build/tiny-stage2/
	nice -n 15 $(PY) -m vidrt.export.train_tiny_i2v --out checkpoints/tiny-shapes --stage all --seed 0 \
		--blend-with build/tiny-stage2
	for q in "$(FAST_BANKS_A)" "$(FAST_BANKS_B)"; do (for b in $$q; do t=$${b%%:*}; i=$${b#*:}; \
		nice -n 15 $(PY) -m vidrt.export.distill_tiny --bank-only --teacher-seeds 0 --clip-seeds $$t \
		--image-clip-seeds $${i:-0} --bank build/fast-bank-$$t.npz --out build/fast-bank-$$t.safetensors || exit 1; \
		done) & done; wait  # a missing bank stops the next command ("--bank: missing ...")
	nice -n 15 $(PY) -m vidrt.export.distill_tiny --objective segment --teacher-steps 0,9,15,20 --batch 16 \
		--steps 1500 --lr 2e-3 $(foreach b,$(FAST_BANKS_A) $(FAST_BANKS_B),--bank build/fast-bank-$(firstword $(subst :, ,$(b))).npz) \
		--eval-seeds 7,3000,3001 --eval-every 500 --out checkpoints/tiny-shapes/fast_lora.safetensors

# Re-export the bundled default package (package data of vidrt) from its checkpoint, and its pictures
# (docs/tiny-shapes.png; the image mode: docs/tiny-shapes-i2v.png and the two start pictures docs/tiny-shapes-*-*.png).
default-model: venv
	rm -rf runtime/models/tiny-shapes
	$(VIDRT) export --model checkpoints/tiny-shapes --out runtime/models/tiny-shapes
	rm -f runtime/models/tiny-shapes/.export.lock
	$(VIDRT) cache calibrate runtime/models/tiny-shapes --threads 1  # MagCache/TeaCache tables (a re-export has none)
	$(PY) -m vidrt.export.contact_sheet --out docs/tiny-shapes.png --image-out docs/tiny-shapes-i2v.png

# docs/web-page.png: vidrt serve's web page in headless Chromium (needs the browser target's chromium).
web-page-png: venv browser
	$(PY) tests/web_page_screenshot.py docs/web-page.png

clean:
	rm -rf $(VENV) .pytest_cache
