# Two entry points: `make demo` (set up + correct the sample scan) and `make test` (set up + run the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medinpaint-installed

.PHONY: setup demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# CPU build of torch first: a bare `torch` requirement would pull several GB of CUDA packages.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	mkdir -p demo_output
	$(VENV)/bin/medinpaint info sample_data/ct_abdomen_3mm_damaged.nii.gz
	$(VENV)/bin/medinpaint correct sample_data/ct_abdomen_3mm_damaged.nii.gz demo_output/ct_abdomen_3mm_corrected.nii.gz --overwrite
	$(VENV)/bin/medinpaint evaluate sample_data/ct_abdomen_3mm.nii.gz demo_output/ct_abdomen_3mm_corrected.nii.gz \
		--mask sample_data/ct_abdomen_3mm_damaged_desc-damage_mask.nii.gz

test: $(STAMP)
	@# headless Chromium for tests/test_report.py's browser checks (they skip without it): installed when root and missing
	@[ "$$(id -u)" != 0 ] || command -v chromium >/dev/null || ! command -v apt-get >/dev/null || \
		( (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
		|| echo "could not install chromium: the browser tests will skip" )
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) demo_output
