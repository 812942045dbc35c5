# make demo / make test create .venv when missing and install xbmd into it.
# Every install goes through constraints.txt, which pins the local CPU build of torch.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.xbmd-installed
PIP    := $(BIN)/python -m pip install --quiet -c constraints.txt

.PHONY: demo test lint bench model validation install clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# The bundled model on the sample X-rays (samples/samples.json); the PNG carries no pixel spacing.
demo: $(STAMP)
	$(BIN)/xbmd estimate samples/hip_vq0002.dcm samples/hip_vq0011.png --pixel-spacing 0.6 \
		--out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(PIP) -e '.[dev,bench]'
	$(BIN)/python benchmarks/bench_drr.py
	$(BIN)/python benchmarks/bench_calibration.py
	$(BIN)/python benchmarks/bench_synth.py --out bench_out/synth
	$(BIN)/python benchmarks/bench_population.py --cohort bench_out/synth
	$(BIN)/xbmd synth --out bench_out/reg20 --cases 20 --seed 3000 --poses 2 --workers 2
	$(BIN)/python benchmarks/bench_registration.py --cohort bench_out/reg20 --compare 6 --default-init 4
	$(BIN)/python benchmarks/bench_prepare.py --cohort bench_out/reg20 --workers 2
	$(BIN)/xbmd synth --out bench_out/cohort_a --cases 26 --seed 1701 --poses 1 --workers 2
	$(BIN)/python benchmarks/bench_landmarks.py bench_out/cohort_a --qc bench_out/landmark_qc
	$(BIN)/python benchmarks/bench_rods.py bench_out/cohort_a --qc bench_out/rods_qc
	$(BIN)/xbmd synth --out bench_out/cohort_c --cases 16 --seed 1703 --poses 1 --workers 2 \
		--contrast-fraction 0.5 --tissue-labels
	$(BIN)/python benchmarks/bench_contrast.py bench_out/cohort_c --plain bench_out/cohort_a

# The bundled default model (src/xbmd/data/models/default.pt), from scratch on 2 CPU cores:
# a 64-patient virtual cohort with 4 radiographs each (seed 4000, never used for evaluation), known
# poses, configs/default.yaml.
model: $(STAMP)
	$(BIN)/xbmd synth --out bench_out/train64p4 --cases 64 --seed 4000 --poses 4 --workers 2
	$(BIN)/xbmd prepare bench_out/train64p4/manifest.csv --out bench_out/train64p4_ds --known-poses --workers 2
	$(BIN)/xbmd train bench_out/train64p4_ds --out bench_out/run_default --config configs/default.yaml
	cp bench_out/run_default/model.pt src/xbmd/data/models/default.pt

# The bundled model's validation report (docs/validation/): a held-out virtual cohort (seed 7000,
# never used in training), 25 patients x 4 poses, evaluated with `xbmd evaluate`.
validation: $(STAMP)
	$(BIN)/xbmd synth --out bench_out/heldout --cases 25 --seed 7000 --poses 4 --workers 2
	$(BIN)/xbmd prepare bench_out/heldout/manifest.csv --out bench_out/heldout_ds --known-poses --workers 2
	$(BIN)/xbmd evaluate --dataset bench_out/heldout_ds --out bench_out/validation
	mkdir -p docs/validation
	cp bench_out/validation/report.html bench_out/validation/metrics.json docs/validation/

clean:
	rm -rf $(VENV) demo_out bench_out .pytest_cache
