# Two commands on a fresh machine: `make run` (the main job on digits) and `make test`.
# Each creates the virtualenv .venv when it is missing, installing the pinned versions in requirements.lock.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint bench-speed bench-scale bench-published clean-venv

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/bench run --variant simple --dataset digits

test: $(STAMP)
	$(VENV)/bin/ruff check bench variants studies reports tests benchmarks
	$(PY) -m pytest -q --durations=10

bench-speed: $(STAMP)
	$(PY) benchmarks/train_speed.py --preset tiny

bench-scale: $(STAMP)
	$(PY) benchmarks/scale.py

bench-published: $(STAMP)
	$(PY) benchmarks/published_cost.py

clean-venv:
	rm -rf $(VENV)
