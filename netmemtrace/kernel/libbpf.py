"""Thin ctypes layer over the system libbpf.so.1.

Why ctypes and not a PyPI binding: the maintained bindings either need BCC (which needs kernel
headers and an LLVM compile per start, impossible on BTF-only kernels) or are unmaintained. The
libbpf C API is small and stable (libbpf >= 1.0 keeps ABI compatibility), so the dozen calls we
need are declared here and nothing else in the package talks to libbpf.

This module knows nothing about page pools: it opens objects, selects which programs load,
attaches them, reads maps, polls ring buffers and runs BPF_PROG_TEST_RUN.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import errno
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

_c_void_p = ctypes.c_void_p


class LibbpfError(OSError):
    """A libbpf call failed; errno and the libbpf log lines that preceded it are kept."""

    def __init__(self, what: str, err: int, log: str = "") -> None:
        self.what = what
        self.log = log
        # libbpf's own codes (LIBBPF_ERRNO__*) start at 4000; strerror knows none of them.
        text = os.strerror(err) if err < 4000 else f"libbpf error {err}"
        super().__init__(err, f"{what}: {text}")

    def summary(self) -> str:
        """One line: the error and libbpf's first words about it (the root cause)."""
        lines = [ln.removeprefix("libbpf: ") for ln in self.log.splitlines() if ln.strip()]
        return self.strerror + (f" ({'; '.join(lines[:2])})" if lines else "")


def _load_library() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise LibbpfError(
            "cannot load libbpf.so.1 (install libbpf1 / libbpf-dev)", errno.ENOENT
        ) from exc


class _OpenOpts(ctypes.Structure):
    # struct bpf_object_open_opts of libbpf >= 1.0 (the layout is append-only).
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("object_name", ctypes.c_char_p),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", ctypes.c_char_p),
        ("_attach_prog_fd", ctypes.c_uint32),
        ("kconfig", ctypes.c_char_p),
        ("btf_custom_path", ctypes.c_char_p),
        ("kernel_log_buf", ctypes.c_char_p),
        ("kernel_log_size", ctypes.c_size_t),
        ("kernel_log_level", ctypes.c_uint32),
    ]


_BPF_F_TEST_RUN_ON_CPU = 1


class _TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", _c_void_p),
        ("data_out", _c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", _c_void_p),
        ("ctx_out", _c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class _ProgLoadOpts(ctypes.Structure):
    """The head of libbpf's struct bpf_prog_load_opts, up to attach_btf_id (sz says so)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("attempts", ctypes.c_int),
        ("expected_attach_type", ctypes.c_int),
        ("prog_btf_fd", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_ifindex", ctypes.c_uint32),
        ("kern_version", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
    ]


class _BatchOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64),
                ("flags", ctypes.c_uint64)]


class _ProgInfo(ctypes.Structure):
    # The head of struct bpf_prog_info up to the run-time statistics we read.
    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32), ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64), ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32), ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64), ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32), ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32), ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64), ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32), ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64), ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64), ("recursion_misses", ctypes.c_uint64),
    ]


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, _c_void_p)
_RB_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, _c_void_p, _c_void_p, ctypes.c_size_t)

_lib = _load_library()


def _declare(name: str, restype: object, *argtypes: object) -> None:
    fn = getattr(_lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


_declare("libbpf_set_print", _c_void_p, _PRINT_FN)
_declare("libbpf_get_error", ctypes.c_long, _c_void_p)
_declare("libbpf_num_possible_cpus", ctypes.c_int)
_declare("bpf_object__open_file", _c_void_p, ctypes.c_char_p, ctypes.POINTER(_OpenOpts))
_declare("bpf_object__load", ctypes.c_int, _c_void_p)
_declare("bpf_object__close", None, _c_void_p)
_declare("bpf_object__next_program", _c_void_p, _c_void_p, _c_void_p)
_declare("bpf_object__find_map_by_name", _c_void_p, _c_void_p, ctypes.c_char_p)
_declare("bpf_program__name", ctypes.c_char_p, _c_void_p)
_declare("bpf_program__section_name", ctypes.c_char_p, _c_void_p)
_declare("bpf_program__set_autoload", ctypes.c_int, _c_void_p, ctypes.c_bool)
_declare("bpf_program__fd", ctypes.c_int, _c_void_p)
_declare("bpf_program__attach", _c_void_p, _c_void_p)
_declare("bpf_link__destroy", ctypes.c_int, _c_void_p)
_declare("bpf_link__fd", ctypes.c_int, _c_void_p)
_declare("bpf_iter_create", ctypes.c_int, ctypes.c_int)
_declare("bpf_map__fd", ctypes.c_int, _c_void_p)
_declare("bpf_map__key_size", ctypes.c_uint32, _c_void_p)
_declare("bpf_map__value_size", ctypes.c_uint32, _c_void_p)
_declare("bpf_map__max_entries", ctypes.c_uint32, _c_void_p)
_declare("bpf_map__set_max_entries", ctypes.c_int, _c_void_p, ctypes.c_uint32)
_declare("bpf_map__reuse_fd", ctypes.c_int, _c_void_p, ctypes.c_int)
_declare("bpf_map__type", ctypes.c_int, _c_void_p)
_declare("bpf_map_lookup_elem", ctypes.c_int, ctypes.c_int, _c_void_p, _c_void_p)
_declare("bpf_map_update_elem", ctypes.c_int, ctypes.c_int, _c_void_p, _c_void_p,
         ctypes.c_uint64)
_declare("bpf_map_delete_elem", ctypes.c_int, ctypes.c_int, _c_void_p)
_declare("bpf_map_get_next_key", ctypes.c_int, ctypes.c_int, _c_void_p, _c_void_p)
_declare("bpf_map_lookup_batch", ctypes.c_int, ctypes.c_int, _c_void_p, _c_void_p, _c_void_p,
         _c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(_BatchOpts))
_declare("bpf_prog_test_run_opts", ctypes.c_int, ctypes.c_int, ctypes.POINTER(_TestRunOpts))
_declare("bpf_obj_get_info_by_fd", ctypes.c_int, ctypes.c_int, _c_void_p,
         ctypes.POINTER(ctypes.c_uint32))
_declare("btf__load_vmlinux_btf", _c_void_p)
_declare("btf__find_by_name_kind", ctypes.c_int, _c_void_p, ctypes.c_char_p, ctypes.c_uint32)
_declare("btf__free", None, _c_void_p)
_declare("bpf_prog_load", ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
         ctypes.c_char_p, ctypes.c_size_t, _c_void_p)
_declare("ring_buffer__new", _c_void_p, ctypes.c_int, _RB_SAMPLE_FN, _c_void_p, _c_void_p)
_declare("ring_buffer__poll", ctypes.c_int, _c_void_p, ctypes.c_int)
_declare("ring_buffer__consume", ctypes.c_int, _c_void_p)
_declare("ring_buffer__free", None, _c_void_p)
_declare("ring_buffer__epoll_fd", ctypes.c_int, _c_void_p)

# Entries read per batch lookup syscall (Map.items()).
BATCH_ENTRIES = 256
# Map types whose values are per CPU (the kernel hands back one value per possible CPU).
_PERCPU_MAP_TYPES = {5, 6, 10, 21}  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH, PERCPU_CGROUP
_LIBBPF_WARN = 0
_MESSAGE_MAX = 1 << 24   # libbpf's largest verifier log buffer (UINT32_MAX >> 8)
_MESSAGE_KEEP = 8192


class _LogCapture:
    """Routes libbpf's print callback into a buffer so errors can name the failing program.

    libbpf prints through one global callback, from the thread that called it: one buffer
    per thread lets objects load side by side (Session does)."""

    def __init__(self) -> None:
        self.verbose = False
        self._local = threading.local()
        self._cb = _PRINT_FN(self._print)
        _lib.libbpf_set_print(self._cb)

    @property
    def lines(self) -> list[str]:
        if not hasattr(self._local, "lines"):
            self._local.lines = []
        return self._local.lines

    def _print(self, level: int, fmt: bytes, args: int) -> int:
        if not (self.verbose or level == _LIBBPF_WARN):
            return 0  # formatting costs more than the rest of a load's logging
        # The message is a printf format plus a va_list; formatting it in Python is not
        # possible portably, so vsnprintf from libc does it.
        # One message can be a whole verifier log (megabytes), whose last lines say why
        # the program was rejected: a buffer as large as libbpf's own log buffer, per
        # thread, and of a long message its head and its tail are kept.
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = ctypes.create_string_buffer(_MESSAGE_MAX)
        _libc.vsnprintf(buf, len(buf), fmt, ctypes.c_void_p(args))
        text = buf.value.decode(errors="replace").rstrip("\n")
        if len(text) > 2 * _MESSAGE_KEEP:
            text = f"{text[:_MESSAGE_KEEP]}\n[...]\n{text[-_MESSAGE_KEEP:]}"
        self.lines.append(text)
        return 0

    def take(self) -> str:
        text = "\n".join(self.lines)
        self.lines.clear()
        return text


_libc = ctypes.CDLL(None, use_errno=True)
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, _c_void_p]
_log = _LogCapture()


def num_possible_cpus() -> int:
    n = _lib.libbpf_num_possible_cpus()
    if n <= 0:
        raise LibbpfError("libbpf_num_possible_cpus", -n)
    return n


def _check_ptr(ptr: int | None, what: str) -> int:
    err = _lib.libbpf_get_error(ptr) if ptr else -errno.ENOMEM
    if not ptr or err:
        raise LibbpfError(what, abs(err) or errno.EINVAL, _log.take())
    return ptr


def _check_rc(rc: int, what: str) -> None:
    if rc < 0:
        raise LibbpfError(what, -rc, _log.take())


@dataclass(frozen=True)
class ProgStats:
    """Kernel run-time statistics of one program: run time and count only with
    kernel.bpf_stats_enabled; recursion_misses always (events the kernel did not run the
    program for, as it was already running on that CPU: an interrupt inside it)."""

    name: str
    run_time_ns: int
    run_cnt: int
    recursion_misses: int


class Map:
    """One BPF map of a loaded object, with typed keys/values given as ctypes types."""

    def __init__(self, ptr: int, name: str) -> None:
        self.name = name
        self.fd = _lib.bpf_map__fd(ptr)
        self.key_size = _lib.bpf_map__key_size(ptr)
        self.value_size = _lib.bpf_map__value_size(ptr)
        self.max_entries = _lib.bpf_map__max_entries(ptr)
        self.percpu = _lib.bpf_map__type(ptr) in _PERCPU_MAP_TYPES
        self.ncpus = num_possible_cpus() if self.percpu else 1
        self._batch_ok = True

    def _value_stride(self) -> int:
        # Per-CPU values are laid out 8-byte aligned, one per possible CPU.
        return (self.value_size + 7) & ~7 if self.percpu else self.value_size

    def lookup(self, key: ctypes.Structure | ctypes._SimpleCData) -> bytes | None:
        """Raw value bytes (all CPUs concatenated for per-CPU maps) or None if absent."""
        out = ctypes.create_string_buffer(self._value_stride() * self.ncpus)
        rc = _lib.bpf_map_lookup_elem(self.fd, ctypes.byref(key), out)
        if rc < 0:
            err = ctypes.get_errno()
            if err == errno.ENOENT:
                return None
            raise LibbpfError(f"lookup in map {self.name}", err)
        return out.raw

    def lookup_per_cpu(self, key: ctypes.Structure | ctypes._SimpleCData) -> list[bytes] | None:
        """One value per CPU (a single one for shared maps), or None if absent."""
        raw = self.lookup(key)
        return None if raw is None else self._split(raw)

    def _split(self, raw: bytes) -> list[bytes]:
        stride = self._value_stride()
        return [raw[i * stride:i * stride + self.value_size] for i in range(self.ncpus)]

    def update(self, key: ctypes.Structure | ctypes._SimpleCData, value: bytes) -> None:
        buf = ctypes.create_string_buffer(value, len(value))
        rc = _lib.bpf_map_update_elem(self.fd, ctypes.byref(key), buf, 0)
        if rc < 0:
            raise LibbpfError(f"update of map {self.name}", ctypes.get_errno())

    def delete(self, key: ctypes.Structure | ctypes._SimpleCData) -> None:
        if _lib.bpf_map_delete_elem(self.fd, ctypes.byref(key)) < 0:
            err = ctypes.get_errno()
            if err != errno.ENOENT:
                raise LibbpfError(f"delete from map {self.name}", err)

    def items(self) -> list[tuple[bytes, list[bytes]]]:
        """Every (key, [value per CPU]) pair; batch lookup where the kernel supports it."""
        raw = self._items_batch() if self._batch_ok else None
        if raw is None:
            raw = self._items_iter()
        return [(k, self._split(v)) for k, v in raw]

    def _items_batch(self) -> list[tuple[bytes, bytes]] | None:
        # BATCH_ENTRIES at a time: buffers sized to max_entries (16k entries of per-CPU
        # values in some maps) cost MBs per read, which the allocator then keeps (RSS).
        vstride = self._value_stride() * self.ncpus
        count = min(max(self.max_entries, 1), BATCH_ENTRIES)
        token = max(self.key_size, 8)  # in/out_batch: a bucket index or a key
        out_batch, in_batch = ctypes.create_string_buffer(token), ctypes.create_string_buffer(token)
        opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
        out: list[tuple[bytes, bytes]] = []
        first = True
        while True:
            keys = ctypes.create_string_buffer(self.key_size * count)
            vals = ctypes.create_string_buffer(vstride * count)
            n = ctypes.c_uint32(count)
            rc = _lib.bpf_map_lookup_batch(self.fd, None if first else in_batch, out_batch,
                                           keys, vals, ctypes.byref(n), ctypes.byref(opts))
            err = ctypes.get_errno() if rc < 0 else 0
            if err == errno.ENOSPC and n.value == 0:
                count *= 2  # one hash bucket holds more entries than count: retry, larger
                continue
            if rc < 0 and err != errno.ENOENT:
                # Old kernels and some map types refuse batch ops: fall back for good.
                self._batch_ok = False
                return None
            ks = ctypes.string_at(keys, self.key_size * n.value)
            vs = ctypes.string_at(vals, vstride * n.value)
            out.extend((ks[i * self.key_size:(i + 1) * self.key_size],
                        vs[i * vstride:(i + 1) * vstride]) for i in range(n.value))
            if err == errno.ENOENT:  # the end of the map
                return out
            ctypes.memmove(in_batch, out_batch, token)
            first = False

    def mapped(self) -> mmap.mmap:
        """The values of a BPF_F_MMAPABLE array, mapped read-only: a large table is read in
        place, with no syscall and no copy (32k netmem slots: 11 ms of CPU per read by
        batch lookups, <1 ms mapped)."""
        size = self.value_size * self.max_entries
        size += -size % mmap.PAGESIZE
        try:
            return mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except OSError as exc:
            raise LibbpfError(f"mmap of map {self.name}", exc.errno or errno.EINVAL) from None

    def _items_iter(self) -> list[tuple[bytes, bytes]]:
        out = []
        key = ctypes.create_string_buffer(self.key_size)
        nxt = ctypes.create_string_buffer(self.key_size)
        prev = None
        while _lib.bpf_map_get_next_key(self.fd, prev, nxt) == 0:
            ctypes.memmove(key, nxt, self.key_size)
            prev = key
            val = ctypes.create_string_buffer(self._value_stride() * self.ncpus)
            if _lib.bpf_map_lookup_elem(self.fd, key, val) == 0:
                out.append((key.raw, val.raw))
        return out


class RingBuffer:
    """Polls one BPF ring buffer map, handing each sample's bytes to a Python callback."""

    def __init__(self, bpf_map: Map, on_sample: Callable[[bytes], None]) -> None:
        def _sample(_ctx: int, data: int, size: int) -> int:
            on_sample(ctypes.string_at(data, size))
            return 0

        self._cb = _RB_SAMPLE_FN(_sample)
        self._rb = _check_ptr(_lib.ring_buffer__new(bpf_map.fd, self._cb, None, None),
                              f"ring_buffer__new({bpf_map.name})")

    def poll(self, timeout_ms: int) -> int:
        n = _lib.ring_buffer__poll(self._rb, timeout_ms)
        if n < 0 and -n != errno.EINTR:
            raise LibbpfError("ring_buffer__poll", -n)
        return max(n, 0)

    def consume(self) -> int:
        """Hand every sample waiting now to the callback, without waiting or epoll."""
        n = _lib.ring_buffer__consume(self._rb)
        if n < 0:
            raise LibbpfError("ring_buffer__consume", -n)
        return n

    def fileno(self) -> int:
        """An epoll fd readable when samples wait: wait on it without holding locks."""
        return _lib.ring_buffer__epoll_fd(self._rb)

    def close(self) -> None:
        if self._rb:
            _lib.ring_buffer__free(self._rb)
            self._rb = 0


class Program:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr
        self.name = _lib.bpf_program__name(ptr).decode()
        self.section = _lib.bpf_program__section_name(ptr).decode()

    @property
    def fd(self) -> int:
        return _lib.bpf_program__fd(self.ptr)

    def set_autoload(self, on: bool) -> None:
        _check_rc(_lib.bpf_program__set_autoload(self.ptr, on), f"autoload {self.name}")

    def stats(self) -> ProgStats:
        info = _ProgInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        if _lib.bpf_obj_get_info_by_fd(self.fd, ctypes.byref(info), ctypes.byref(size)) < 0:
            raise LibbpfError(f"prog info of {self.name}", ctypes.get_errno())
        return ProgStats(self.name, info.run_time_ns, info.run_cnt, info.recursion_misses)

    def test_run(self, ctx: bytes, cpu: int | None = None) -> int:
        """BPF_PROG_TEST_RUN with ctx as the program's context (raw_tp: the u64 args),
        on the given CPU if any (raw_tp only), so per-CPU paths can be exercised."""
        buf = ctypes.create_string_buffer(ctx, len(ctx))
        opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), ctx_in=ctypes.addressof(buf),
                            ctx_size_in=len(ctx))
        if cpu is not None:
            opts.flags, opts.cpu = _BPF_F_TEST_RUN_ON_CPU, cpu
        rc = _lib.bpf_prog_test_run_opts(self.fd, ctypes.byref(opts))
        if rc < 0:
            raise LibbpfError(f"test run of {self.name}", ctypes.get_errno())
        return opts.retval


class Link:
    def __init__(self, ptr: int, program: Program) -> None:
        self.ptr = ptr
        self.program = program

    @property
    def fd(self) -> int:
        return _lib.bpf_link__fd(self.ptr)

    def destroy(self) -> None:
        if self.ptr:
            _lib.bpf_link__destroy(self.ptr)
            self.ptr = 0

    def read_iter(self) -> bytes:
        """Run a BPF iterator link once and return everything it printed."""
        return b"".join(self.iter_chunks(65536))

    def iter_chunks(self, size: int) -> Iterator[bytes]:
        """Run a BPF iterator link once, yielding what each read() of at most `size` bytes
        returns. The kernel stops visiting objects once `size` bytes are printed, so with
        the size of one record the caller regains control after every object that printed
        one (and may drain what the program sent elsewhere meanwhile)."""
        fd = _lib.bpf_iter_create(self.fd)
        if fd < 0:
            raise LibbpfError(f"iterator {self.program.name}", ctypes.get_errno())
        with os.fdopen(fd, "rb", buffering=0) as f:
            while chunk := f.read(size):
                yield chunk


class Object:
    """An opened BPF object file. Select programs, then load(); close() frees everything."""

    def __init__(self, path: str, btf_path: str | None = None) -> None:
        self.path = path
        opts = _OpenOpts(sz=ctypes.sizeof(_OpenOpts))
        if btf_path:
            opts.btf_custom_path = btf_path.encode()
        _log.take()
        self._obj = _check_ptr(_lib.bpf_object__open_file(path.encode(), ctypes.byref(opts)),
                               f"open {path}")
        self.programs: dict[str, Program] = {}
        prog = _lib.bpf_object__next_program(self._obj, None)
        while prog:
            p = Program(prog)
            self.programs[p.name] = p
            prog = _lib.bpf_object__next_program(self._obj, prog)
        self.links: list[Link] = []

    def recursion_misses(self) -> int:
        """Events the kernel skipped for the attached programs of this object (ProgStats)."""
        return sum(link.program.stats().recursion_misses for link in self.links)

    def map(self, name: str) -> Map:
        ptr = _lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if not ptr:
            raise LibbpfError(f"map {name} not in {self.path}", errno.ENOENT)
        return Map(ptr, name)

    def set_max_entries(self, name: str, n: int) -> None:
        ptr = _lib.bpf_object__find_map_by_name(self._obj, name.encode())
        _check_rc(_lib.bpf_map__set_max_entries(ptr, n), f"max_entries of {name}")

    def reuse_map(self, name: str, other: Map) -> None:
        """Before load: this object's map `name` is `other` (of an object loaded earlier)."""
        ptr = _lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if not ptr:
            raise LibbpfError(f"map {name} not in {self.path}", errno.ENOENT)
        _check_rc(_lib.bpf_map__reuse_fd(ptr, other.fd), f"reuse map {name}")

    def load(self) -> None:
        _log.take()
        _check_rc(_lib.bpf_object__load(self._obj), f"load {os.path.basename(self.path)}")
        _log.take()

    def attach(self, name: str) -> Link:
        prog = self.programs[name]
        _log.take()
        ptr = _lib.bpf_program__attach(prog.ptr)
        link = Link(_check_ptr(ptr, f"attach {name}"), prog)
        self.links.append(link)
        return link

    def close(self) -> None:
        # Detaching a classic tracepoint's perf event waits for an RCU grace period; the
        # syscall events (which may fault) wait for several: 60 to 80 ms each on 6.18, over a
        # second for an object's twenty. Waits of links destroyed side by side overlap (the
        # ctypes call drops the GIL), so they are.
        if len(self.links) > 1:
            try:
                with concurrent.futures.ThreadPoolExecutor(len(self.links)) as pool:
                    list(pool.map(Link.destroy, self.links))
            except RuntimeError:
                pass  # the interpreter is shutting down and starts no thread: one by one
        for link in self.links:
            link.destroy()  # what is left; a no-op for those destroyed above
        self.links.clear()
        if self._obj:
            _lib.bpf_object__close(self._obj)
            self._obj = 0

    def __enter__(self) -> Object:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_BPF_PROG_TYPE_TRACING = 26
_BPF_TRACE_FENTRY = 24
_BTF_KIND_FUNC = 12
# r0 = 0; exit
_RETURN_ZERO = bytes([0xB7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])


def fentry_load_errno(function: str) -> int:
    """Load (never attach) an empty fentry program on a kernel function: 0 if the kernel
    takes it, else the errno (ENOENT: the function is not in the kernel's BTF). One small
    program instead of a whole object that a refusal would make the loader load again."""
    btf = _lib.btf__load_vmlinux_btf()
    if not btf or _lib.libbpf_get_error(btf):
        return errno.ENOENT
    try:
        btf_id = _lib.btf__find_by_name_kind(btf, function.encode(), _BTF_KIND_FUNC)
        if btf_id < 0:
            return errno.ENOENT
        opts = _ProgLoadOpts(sz=ctypes.sizeof(_ProgLoadOpts),
                             expected_attach_type=_BPF_TRACE_FENTRY, attach_btf_id=btf_id)
        fd = _lib.bpf_prog_load(_BPF_PROG_TYPE_TRACING, b"nmt_fentry_probe", b"GPL",
                                _RETURN_ZERO, len(_RETURN_ZERO) // 8, ctypes.byref(opts))
        if fd < 0:
            return -fd
        os.close(fd)
        return 0
    finally:
        _lib.btf__free(btf)


_BPF_PROG_TYPE_SYSCALL = 31
_BPF_F_SLEEPABLE = 1 << 4
_KSYM_NAME_MAX = 64


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | src << 4, off, imm)


def _ksym_program() -> bytes:
    """A syscall program whose context is {char name[64]; u64 addr}: it copies the name to
    its stack (helpers take no context pointer) and stores bpf_kallsyms_lookup_name()'s
    address after it; the helper's return (0, -ENOENT, -EPERM) is the program's."""
    ldx, stx, st, mov, mov_imm, add_imm = 0x79, 0x7B, 0x7A, 0xBF, 0xB7, 0x07
    name_at, addr_at = -_KSYM_NAME_MAX - 8, -8  # stack offsets from r10
    code = [_insn(mov, 6, 1)]
    for off in range(0, _KSYM_NAME_MAX, 8):
        code += [_insn(ldx, 1, 6, off), _insn(stx, 10, 1, name_at + off)]
    code += [_insn(st, 10, 0, addr_at, 0),
             _insn(mov, 1, 10), _insn(add_imm, 1, imm=name_at),
             _insn(mov_imm, 2, imm=_KSYM_NAME_MAX), _insn(mov_imm, 3, imm=0),
             _insn(mov, 4, 10), _insn(add_imm, 4, imm=addr_at),
             _insn(0x85, imm=179),  # call bpf_kallsyms_lookup_name
             _insn(ldx, 1, 10, addr_at), _insn(stx, 6, 1, _KSYM_NAME_MAX),
             _insn(0x95)]
    return b"".join(code)


def kallsyms_lookup(names: Iterable[str]) -> dict[str, int | None] | None:
    """name -> address (None: not in the kernel) by the kernel's own kallsyms_lookup_name(),
    a lookup in its sorted name table, run from a syscall program (5.16+) through
    BPF_PROG_TEST_RUN: a few µs per name, where a scan of /proc/kallsyms makes the kernel
    format every one of its symbols. None if the kernel offers no such program or refuses
    the lookup (kptr_restrict: the helper says EPERM); the caller then reads the file."""
    code = _ksym_program()
    opts = _ProgLoadOpts(sz=ctypes.sizeof(_ProgLoadOpts), prog_flags=_BPF_F_SLEEPABLE)
    fd = _lib.bpf_prog_load(_BPF_PROG_TYPE_SYSCALL, b"nmt_ksym", b"GPL", code,
                            len(code) // 8, ctypes.byref(opts))
    if fd < 0:
        return None
    try:
        out: dict[str, int | None] = {}
        for name in names:
            raw = name.encode()
            if len(raw) >= _KSYM_NAME_MAX:
                return None
            ctx = ctypes.create_string_buffer(raw, _KSYM_NAME_MAX + 8)
            run = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), ctx_in=ctypes.addressof(ctx),
                               ctx_size_in=len(ctx))
            if _lib.bpf_prog_test_run_opts(fd, ctypes.byref(run)) < 0:
                return None
            rc = ctypes.c_int32(run.retval).value
            if rc not in (0, -errno.ENOENT):
                return None
            out[name] = struct.unpack_from("<Q", ctx.raw, _KSYM_NAME_MAX)[0] if rc == 0 else None
        return out
    finally:
        os.close(fd)


def failed_program(log: str, candidates: Iterator[str]) -> str | None:
    """Name of the program a libbpf load log blames ("prog 'NAME': ..."), if any."""
    for name in candidates:
        if f"prog '{name}'" in log:
            return name
    return None
