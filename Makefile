# The two README commands. Each does all the set-up (idempotent; a no-op when already set up).
PY := .venv/bin/python
STAMP := .venv/.installed
export HF_HUB_OFFLINE := 1

.PHONY: setup test compare results exercises lab wheel
setup: $(STAMP)

$(STAMP): pyproject.toml assets.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps -r assets.txt
	touch $(STAMP)

# two pytest-xdist workers, one file each (a notebook's cells stay on one kernel); OpenMP threads that wait
# sleep instead of spinning, so two workers' kernels (2 threads each) share the 2 cores without stalling
test: setup
	MINIPEFT_FAST=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -n 2 --dist loadfile --nbval-lax notebooks solutions tests

compare: setup      # every method, seed 0, on `topic`, into runs/ (minutes: see the README)
	$(PY) -m minipeft compare

# what results/ holds: 2 tasks x 3 seeds x (the 11 compared methods + lesson 06's 3 ablations; fusion on topic), the lessons'
# sentiment baselines (full, head x 3 seeds), lesson 07's transfer study (results/fusion, ~45 min), lesson 09's
# headline comparison (zero-shot, LoRA, prefix, MAM x 3 seeds, ~60 min), then the costs
# and the table: about 6 hours on 2 cores
results: setup
	$(PY) -m minipeft compare --tasks question topic --seeds 0 1 2 --out results --quiet
	$(PY) -m minipeft compare --tasks question topic --methods adapter_lora sequential_ffn parallel_attn --seeds 0 1 2 --out results --add --quiet
	$(PY) -m minipeft compare --tasks sentiment --methods full head --seeds 0 1 2 --out results --quiet
	$(PY) -m minipeft transfer --sizes 100 300 --seeds 0 1 2 --out results/fusion --quiet
	$(PY) -m minipeft compare --tasks topic --methods fusion --seeds 0 1 2 --out results --add --quiet
	$(PY) -m minipeft compare --tasks headline --seeds 0 1 2 --out results --quiet
	cd bench && ../$(PY) costs.py --out ../results/costs.json
	$(PY) -m minipeft report --results results

exercises: setup
	$(PY) -m minipeft.course.exercises build

# JupyterLab on the whole repository (notebooks/, exercises/, solutions/), offline (no news, update or
# extension-index requests; lab/overrides.json says never ask, and saves widget state), lesson 00 opened. On a remote
# machine: make lab LAB_ARGS='--no-browser --port 8888', then open the printed URL (it is lesson 00's) through an
# SSH tunnel. docs/check_lab.py checks the same flags in headless Chromium.
LESSON00 := notebooks/00_setup_and_baselines.ipynb
LAB_FLAGS := --ServerApp.root_dir=$(CURDIR) --LabApp.default_url=/lab/tree/$(LESSON00) \
	--LabApp.app_settings_dir=$(CURDIR)/lab --LabApp.news_url=None \
	--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate --LabApp.extension_manager=readonly \
	$(if $(filter 0,$(shell id -u)),--allow-root)
lab: setup
	$(PY) -m jupyter lab $(LAB_FLAGS) $(LAB_ARGS)

wheel: setup        # dist/minipeft-<version>-py3-none-any.whl (+ the sdist); .ci/check_wheel.py checks its contents
	$(PY) -m build --outdir dist
