# The README's two commands: `make demo` and `make test`. Both install their Debian dependencies first.
BUILD      ?= build
BUILD_ASAN ?= build-asan
BUILD_FUZZ ?= build-fuzz
JOBS       ?= $(shell nproc)
CMAKE_ARGS ?=
CTEST_LABELS ?= unit|ops|golden|tools|fuzz-replay|demo
# the sanitizer run leaves out the demo-asset checks (minutes of training at -O0)
CTEST_LABELS_ASAN ?= unit|ops|golden|tools|fuzz-replay

DEB_PACKAGES = build-essential cmake pkg-config libjansson-dev libutf8proc-dev libpcre2-dev \
               libpng-dev libjpeg62-turbo-dev libwebp-dev
DEB_FUZZ     = clang libclang-rt-14-dev

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all deps deps-fuzz build test test-asan fuzz demo demo-assets bench clean

all: build

deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; fi

deps-fuzz:
	@missing=""; for p in $(DEB_FUZZ); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; fi

build: deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_ARGS)
	cmake --build $(BUILD) -j $(JOBS)

test: build
	cd $(BUILD) && ctest -L "$(CTEST_LABELS)" --output-on-failure -j $(JOBS)

# The whole suite under AddressSanitizer + UndefinedBehaviorSanitizer.
test-asan: deps
	cmake -S . -B $(BUILD_ASAN) -DCMAKE_BUILD_TYPE=Debug -DCAPRL_SANITIZE=ON $(CMAKE_ARGS)
	cmake --build $(BUILD_ASAN) -j $(JOBS)
	cd $(BUILD_ASAN) && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  ctest -L "$(CTEST_LABELS_ASAN)" --output-on-failure -j $(JOBS)

# libFuzzer targets (clang); `make fuzz` builds them and runs each briefly.
fuzz: deps deps-fuzz
	CC=clang cmake -S . -B $(BUILD_FUZZ) -DCMAKE_BUILD_TYPE=Debug -DCAPRL_FUZZ=ON -DCAPRL_BUILD_TESTS=OFF $(CMAKE_ARGS)
	cmake --build $(BUILD_FUZZ) -j $(JOBS)
	cd $(BUILD_FUZZ) && ctest --output-on-failure -j $(JOBS)

demo: build
	./scripts/demo.sh $(BUILD)

# Rebuilds the demo's tiny models (shipped in demo/assets) from nothing with caprl itself.
demo-assets: build
	./scripts/demo_assets.sh $(BUILD)

bench: build
	./$(BUILD)/caprl bench

clean:
	rm -rf $(BUILD) $(BUILD_ASAN) $(BUILD_FUZZ)
