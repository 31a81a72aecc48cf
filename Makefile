# The README's two commands. Each creates/updates .venv, then runs.
#   make demo   - the main job on the embedded default (SmolLM2-135M -> E8T2, 2 CPU ranks)
#   make test   - the whole test suite (what CI runs)
.PHONY: demo test setup
setup:
	bash scripts/setup_env.sh

demo: setup
	bash scripts/demo.sh

test: setup
	bash scripts/run_tests.sh
