# The README's two commands: `make demo` (the main job) and `make test` (the suite, what .ci/run runs).
# Each installs what it needs first, once: the install and native-build steps leave stamps under
# .make/ and re-run only when their inputs change, so the commands are idempotent.
#
#   make demo [DEMO_ARGS="--out out/demo --quiet"]
#   make test [PYTEST_ARGS="-q -k sdxl"]
#   make install | make native | make clean-stamps
#
# PYTHON picks the interpreter to install into and run with (default: python3 on PATH).

PYTHON ?= python3
TORCH_PIN := torch==2.13.0
DEMO_ARGS ?=
PYTEST_ARGS ?= -q -p no:cacheprovider
STAMPS := .make

.PHONY: demo test install native clean-stamps

demo: $(STAMPS)/installed
	$(PYTHON) -m samg demo $(DEMO_ARGS)

test: $(STAMPS)/installed $(STAMPS)/native $(STAMPS)/tritonserver
	$(PYTHON) -m pytest $(PYTEST_ARGS)

install: $(STAMPS)/installed
native: $(STAMPS)/native

# torch is pinned first: a loose torch pin pulls several GB of CUDA wheels.
$(STAMPS)/installed: pyproject.toml
	@mkdir -p $(STAMPS)
	$(PYTHON) -m pip install -q --disable-pip-version-check "$(TORCH_PIN)"
	$(PYTHON) -m pip install -q --disable-pip-version-check -e ".[all]"
	@touch $@

# The native parts are optional for the package but exercised by the suite (tests marked `native`).
NATIVE_SOURCES := $(shell find plugins runtime/cpp third_party -type f \( -name '*.cc' -o -name '*.cu' -o -name '*.h' -o -name '*.hpp' -o -name 'CMakeLists.txt' \) -not -path '*/build/*' 2>/dev/null)
$(STAMPS)/native: $(STAMPS)/installed scripts/build_native.sh $(NATIVE_SOURCES)
	@mkdir -p $(STAMPS)
	bash scripts/build_native.sh
	@touch $@

# NVIDIA's tritonserver for the serving tests (tests/test_serve_triton.py): `samg serve
# --install-triton` unpacks it from the nvidia-pytriton wheel into samg's cache (idempotent). Where
# it cannot (no wheel for this Python), those tests skip saying why, and the next run tries again.
$(STAMPS)/tritonserver: $(STAMPS)/installed samg/serve/install.py
	@mkdir -p $(STAMPS)
	@if $(PYTHON) -m samg serve --install-triton --quiet; then touch $@; \
	else echo "tritonserver not installed: tests/test_serve_triton.py skips its server tests (fails them under SAMG_REQUIRE_TRITON=1, as .ci/run sets)"; fi

clean-stamps:
	rm -rf $(STAMPS)
