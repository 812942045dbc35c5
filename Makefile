# make demo / make test create .venv when missing and install xbmd into it.
# Every install goes through constraints.txt, which pins the local CPU build of torch.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.xbmd-installed
PIP    := $(BIN)/python -m pip install --quiet -c constraints.txt

# Programs the PACS tests run for real (tests/test_pacs_*.py): Orthanc in a network namespace
# (ip), dciodvfy, headless Chromium and its driver. Installed from Debian when one is missing
# (needs root); the Orthanc package's own service is disabled, the tests start their own.
SYSTEM_PROGRAMS := Orthanc dciodvfy chromium chromedriver ip
SYSTEM_PACKAGES := orthanc dicom3tools chromium chromium-driver iproute2

.PHONY: demo test lint bench bench-service model validation install system-packages clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

system-packages:
	@missing=""; for p in $(SYSTEM_PROGRAMS); do \
		command -v $$p >/dev/null 2>&1 || test -x /usr/sbin/$$p || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages for the PACS tests (missing:$$missing)"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES) && \
		{ (invoke-rc.d orthanc stop; update-rc.d orthanc disable; systemctl disable --now orthanc) >/dev/null 2>&1 || true; }; \
	fi

# The bundled model on the sample X-rays (samples/samples.json); the PNG carries no pixel spacing.
demo: $(STAMP)
	$(BIN)/xbmd estimate samples/hip_vq0002.dcm samples/hip_vq0011.png --pixel-spacing 0.6 --age 66 --sex F \
		--out demo_out

test: $(STAMP) system-packages
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

# The Orthanc service under load and faults (run it alone on the machine: it is timed).
bench-service: $(STAMP) system-packages
	$(BIN)/python benchmarks/bench_service.py --radiographs 200 --clients 8 --faults --out bench_out/service

# The bundled default model (src/xbmd/data/models/default.pt), from scratch on 2 CPU cores: a
# 48-patient virtual cohort, 2 sessions x 2 poses each, four device families with half the
# radiographs through randomised processing graphs (seed 16000, never used for evaluation), known
# poses, configs/levers.yaml; then its offset, 95 % interval and feature score calibrated on 20
# other virtual patients (seed 16100). docs/model-card.md.
TRAIN_FAMILIES = equalised-dr,balanced-dr,phosphor-cr,crisp-dr
model: $(STAMP)
	$(BIN)/xbmd synth --out bench_out/m16_train --cases 48 --seed 16000 --sessions 2 --poses 2 \
		--device-families $(TRAIN_FAMILIES) --processing mixed --workers 2
	$(BIN)/xbmd prepare bench_out/m16_train/manifest.csv --out bench_out/m16_train_ds --known-poses --workers 2
	$(BIN)/xbmd train bench_out/m16_train_ds --out bench_out/run_m16 --config configs/levers.yaml
	$(BIN)/xbmd synth --out bench_out/m16_cal --cases 20 --seed 16100 --sessions 2 --poses 2 \
		--device-families $(TRAIN_FAMILIES) --processing mixed --workers 2
	$(BIN)/xbmd prepare bench_out/m16_cal/manifest.csv --out bench_out/m16_cal_ds --known-poses --workers 2
	$(BIN)/xbmd calibrate-model bench_out/m16_cal_ds --model bench_out/run_m16/model.pt \
		--out src/xbmd/data/models/default.pt

# The bundled model's validation report (docs/validation/): a held-out virtual cohort (seed 16200,
# never used in training or calibration), 25 patients x 2 sessions x 4 poses, the training
# families with mixed processing and implants in a fifth of the patients; evaluated end to end
# with `xbmd evaluate`. Then two device families never seen in training (seed 16300).
validation: $(STAMP)
	$(BIN)/xbmd synth --out bench_out/m16_val --cases 25 --seed 16200 --sessions 2 --poses 4 \
		--device-families $(TRAIN_FAMILIES) --processing mixed --implant-fraction 0.2 --workers 2
	$(BIN)/xbmd prepare bench_out/m16_val/manifest.csv --out bench_out/m16_val_ds --known-poses --workers 2
	$(BIN)/xbmd evaluate --dataset bench_out/m16_val_ds --out bench_out/validation
	mkdir -p docs/validation
	cp bench_out/validation/report.html bench_out/validation/metrics.json docs/validation/
	$(BIN)/xbmd synth --out bench_out/m16_heldout_fam --cases 12 --seed 16300 --sessions 1 --poses 2 \
		--device-families soft-dr,mobile-nogrid --processing fixed --workers 2
	$(BIN)/xbmd prepare bench_out/m16_heldout_fam/manifest.csv --out bench_out/m16_heldout_fam_ds --known-poses --workers 2
	$(BIN)/xbmd evaluate --dataset bench_out/m16_heldout_fam_ds --out bench_out/validation_families \
		--file-robustness none --robustness pose
	cp bench_out/validation_families/metrics.json docs/validation/metrics_heldout_families.json

clean:
	rm -rf $(VENV) demo_out demo_ct bench_out .pytest_cache
