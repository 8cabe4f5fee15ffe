# netmemtrace — `make run` and `make test` do all set-up on a fresh Debian 12 machine (as root).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BTF ?= /sys/kernel/btf/vmlinux
ARCH := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
APT_PKGS := clang llvm libbpf-dev bpftool iproute2 iperf3 tmux python3-venv prometheus openssl systemd bpftrace \
	mmdebstrap podman runc
BPF_SRCS := $(wildcard bpf/*.bpf.c)
BPF_OBJS := $(patsubst bpf/%.bpf.c,netmemtrace/bpfobj/%.bpf.o,$(BPF_SRCS))
BPF_ABI := $(BPF_OBJS:.o=.json)

.PHONY: run test build deps venv lint bench clean test-kernels kernel-deps image

RUN_JSON ?= build/run-dump.json

run: build
	# The main job: netmemtrace attached first, then the demo workload (veth + XDP + TCP)
	# creates its page pool under it; a short table shows that pool's real figures, the
	# whole JSON snapshot goes to $(RUN_JSON).
	@mkdir -p $(dir $(RUN_JSON))
	$(PY) -m netmemtrace.cli dump --duration 8 --output $(RUN_JSON) & dump=$$!; \
	sleep 1; $(PY) -m netmemtrace.cli demo --duration 5 >/dev/null; demo_rc=$$?; \
	wait $$dump; rc=$$?; [ $$demo_rc -eq 0 ] && exit $$rc || exit $$demo_rc

test: build
	$(PY) -m ruff check netmemtrace tests $(wildcard bench)
	$(PY) -m pytest -v -rs

build: deps venv $(BPF_OBJS) $(BPF_ABI)

# Only what is missing is installed; apt-get update runs once when something is.
deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi
	@mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing || true

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# vmlinux.h is generated from the build machine's BTF rather than vendored: it is 5+ MB
# that would churn with every kernel, and CO-RE relocates field offsets at load time
# anyway. Build elsewhere with BTF=/path/to/vmlinux-btf.
build/vmlinux.h:
	@mkdir -p build
	bpftool btf dump file $(BTF) format c > $@.tmp && mv $@.tmp $@

netmemtrace/bpfobj/%.bpf.o: bpf/%.bpf.c bpf/netmemtrace.h bpf/common.bpf.h bpf/compat.bpf.h bpf/netmem_table.bpf.h build/vmlinux.h
	@mkdir -p netmemtrace/bpfobj
	clang -O2 -g -Wall -Werror -target bpf -D__TARGET_ARCH_$(ARCH) -Ibuild -Ibpf -c $< -o $@
	llvm-strip -g --keep-section=.BTF --keep-section=.BTF.ext $@ 2>/dev/null || true

# The ABI shared with Python: struct layouts straight from the object's BTF.
netmemtrace/bpfobj/%.bpf.json: netmemtrace/bpfobj/%.bpf.o
	bpftool btf dump file $< -j > $@

# The kernel matrix (tests/kernels/): Debian's 6.1, 6.12, 7.2 and 7.3 booted under QEMU with
# this checkout visible, the live suite inside each, one table. KERNELS="6.12 host" picks.
KERNEL_PKGS := qemu-system-x86 busybox-static cpio zstd kmod
KERNELS ?= 6.1 6.12 7.2 7.3 host
kernel-deps:
	@missing=""; for p in $(KERNEL_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi

test-kernels: build kernel-deps
	KERNELS="$(KERNELS)" $(PY) -m tests.kernels.matrix $(MATRIX_ARGS)

# The DaemonSet's image, from Debian packages of this machine's apt mirror (no registry);
# reused while its content hash is unchanged (FORCE=1 rebuilds). deploy/README.md, "Image".
image: build
	deploy/image/build.sh

lint: venv
	$(PY) -m ruff check netmemtrace tests $(wildcard bench)

bench: build
	$(PY) bench/run_all.py

clean:
	rm -rf build netmemtrace/bpfobj
