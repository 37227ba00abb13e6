# cdm: cascaded diffusion on diffusers. `make demo` runs the main job, `make test` the tests.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.cdm-installed

DEMO := cdm/demo_cascade
DEMO_RUNS := runs/demo

.PHONY: install browser test test-slow lint bench demo demo-train demo-eval photo-train photo-eval experiments clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[demo,fid,app,test]"
	touch $(STAMP)

# headless Chromium and its driver, for the browser test of cdm-app (Debian packages)
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

test: install browser
	$(BIN)/python -m pytest -q -n 2 -m "not slow" --durations=10

test-slow: install
	$(BIN)/python -m pytest -q -m slow || [ $$? -eq 5 ]

lint: install
	$(BIN)/ruff check cdm pipelines tests benchmarks
	$(BIN)/ruff format --check cdm pipelines tests benchmarks

bench: install
	$(BIN)/python benchmarks/run.py

# Sample the committed demo cascade: three digit classes, every stage saved, plus a grid; then
# upscale two held-out photos with the shipped photo stage, beside bicubic and the originals.
demo: install
	$(BIN)/cdm-generate --class 0 --class 3 --class seven --num-images 1 --seed 0 \
		--out samples --save-intermediates --overwrite
	$(BIN)/cdm-upscale --compare samples/upscale.png --held-out 2 --overwrite

# Re-train the demo cascade from scratch on the offline digits (about 1.75 hours on 2 CPU cores),
# then assemble it into $(DEMO) with fp16 weights and its model card.
demo-train: install
	$(BIN)/cdm-train experiment=demo_base64
	$(BIN)/cdm-train experiment=demo_sr64to256
	$(BIN)/cdm-train experiment=demo_sr256to1024
	$(MAKE) demo-eval DEMO_SOURCES="$(DEMO_RUNS)/base64 $(DEMO_RUNS)/sr64to256 $(DEMO_RUNS)/sr256to1024"

DEMO_SOURCES ?= $(DEMO)/base64 $(DEMO)/sr64to256 $(DEMO)/sr256to1024
# Sampling defaults, and how each was chosen: docs/demo_cascade_notes.md (it goes into the card).
DEMO_SET := --set base64.scheduler=DDPMScheduler --set base64.steps=50 --set base64.guidance_scale=2.0 \
	--set sr64to256.noise_level=50 --set sr256to1024.noise_level=200 \
	--set sr64to256.scheduler=DDPMScheduler --set sr64to256.steps=5 \
	--set sr256to1024.scheduler=DDPMScheduler --set sr256to1024.steps=5
EVAL := runs/demo-eval

# Measure the demo cascade and write its card: class agreement and FID/KID of base samples, SR metrics vs bicubic.
demo-eval: install
	$(BIN)/cdm-export $(DEMO_SOURCES) --out $(EVAL)/cascade --overwrite $(DEMO_SET)
	$(BIN)/cdm-eval gen --model $(EVAL)/cascade --stages 1 --num-per-class 20 --data digits --fid --out $(EVAL)/gen --overwrite
	$(BIN)/cdm-eval sr --model $(EVAL)/cascade --stage sr64to256 --data digits --num-images 20 --out $(EVAL)/sr64to256 --overwrite
	$(BIN)/cdm-eval sr --model $(EVAL)/cascade --stage sr256to1024 --data digits --num-images 4 --out $(EVAL)/sr256to1024 --overwrite
	$(BIN)/cdm-generate --model $(EVAL)/cascade --class 0 --class 1 --class 2 --class 3 --class 4 --class 5 \
		--class 6 --class 7 --class 8 --class 9 --out $(EVAL)/grid --overwrite --quiet
	$(BIN)/cdm-export $(addprefix $(EVAL)/cascade/,base64 sr64to256 sr256to1024) --out $(DEMO) --half --overwrite \
		--license apache-2.0 $(DEMO_SET) --notes docs/demo_cascade_notes.md \
		--eval $(EVAL)/gen/results.json --eval $(EVAL)/sr64to256/results.json \
		--eval $(EVAL)/sr256to1024/results.json --samples $(EVAL)/grid/grid.png

PHOTO := cdm/photo_sr4x
PHOTO_SOURCE ?= $(PHOTO)
PHOTO_EVAL := runs/photo-eval

# Train the 4x photo SR stage on CPU in four runs (81 + 57 + 23 + 27 min on 2 cores): constant
# learning rate, then a cosine decay to zero from those weights, then a short one on crops at the
# photos' own scale, then one on twice the photographs (Debian's, fetched with apt-get download);
# and its small guide for autoguidance (3 min).
# Then measure it and ship it in $(PHOTO), with the guide attached.
photo-train: install
	$(BIN)/cdm-train experiment=photo_sr4x
	$(BIN)/cdm-train experiment=photo_sr4x_anneal
	$(BIN)/cdm-train experiment=photo_sr4x_native
	$(BIN)/cdm-train experiment=photo_sr4x_more
	$(BIN)/cdm-train experiment=photo_sr4x_guide
	$(MAKE) photo-eval PHOTO_SOURCE=runs/photo_sr4x-more/export PHOTO_GUIDE=runs/photo_sr4x-guide

# The shipped default, the fidelity end: 0 steps, one UNet evaluation from the initial noise's mean,
# which returns the stage's estimate of E[x | low-res] (docs/photo_sr.md says how it was chosen).
# The scheduler is the one `--steps N` samples with.
PHOTO_SCHEDULER := DDPMScheduler
PHOTO_STEPS := 0
# The sharp end: 20 DPM-Solver++ steps with autoguidance, detail only where the input has some.
PHOTO_SHARP := --scheduler DPMSolverMultistepScheduler --steps 20 --autoguidance 1.5 \
	--detail-threshold 0.04
PHOTO_GUIDE ?=

# Measure the photo stage on the held-out photos, whole images, at both ends of the trade-off
# (the shipped sampler: the high-PSNR end; PHOTO_SHARP: the sharp end), then write $(PHOTO) with
# fp16 weights, those sampling defaults and its card. The stage is measured from a copy (with
# PHOTO_GUIDE attached, when given), so that PHOTO_SOURCE may be $(PHOTO) itself.
photo-eval: install
	rm -rf $(PHOTO_EVAL)/photo_sr4x && mkdir -p $(PHOTO_EVAL)
	$(BIN)/cdm-export $(PHOTO_SOURCE) $(if $(PHOTO_GUIDE),--guide $(PHOTO_GUIDE)) --out $(PHOTO_EVAL)/photo_sr4x
	$(BIN)/cdm-eval sr --model $(PHOTO_EVAL)/photo_sr4x --data photos --crop 0 \
		--scheduler $(PHOTO_SCHEDULER) --steps $(PHOTO_STEPS) --out $(PHOTO_EVAL)/fidelity --overwrite
	$(BIN)/cdm-eval sr --model $(PHOTO_EVAL)/photo_sr4x --data photos --crop 0 $(PHOTO_SHARP) \
		--out $(PHOTO_EVAL)/sharp --overwrite
	$(BIN)/cdm-export $(PHOTO_EVAL)/photo_sr4x --out $(PHOTO) --half --overwrite --license apache-2.0 \
		--set photo_sr4x.scheduler=$(PHOTO_SCHEDULER) --set photo_sr4x.steps=$(PHOTO_STEPS) \
		--eval $(PHOTO_EVAL)/fidelity/results.json --eval $(PHOTO_EVAL)/sharp/results.json

clean:
	rm -rf $(VENV) .pytest_cache runs samples

# CDM's claims in miniature (docs/experiments.md): resumable; each experiment stores its points in
# docs/experiments/points/ (committed) and rewrites its section and plot.
# `make experiments EXPERIMENTS=guidance` runs one.
experiments: install
	$(BIN)/python -m cdm.cli.experiments $(EXPERIMENTS)
