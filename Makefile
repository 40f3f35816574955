# The two entry points of the README. Both install what they need first (scripts/setup.sh).
.PHONY: setup demo test

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/mmdisagg demo

test: setup
	@scripts/test.sh
