"""The probe catalogue: for every hook, the attach mechanisms it can use, the one chosen on
this kernel, and why the others were not.

Hooks are not listed by hand: each BPF program is named HOOK__MECH (see bpf/*.bpf.c), so the
catalogue is read from the object itself. For each hook the first mechanism that loads and
attaches wins, in the order of MECHANISMS. Static checks (the tracepoint or function exists)
rule candidates out before loading; a candidate the verifier rejects or that fails to attach is
recorded with its reason and the object is reloaded with the next one.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from netmemtrace.kernel import kallsyms, libbpf

# Preference order: typed BTF tracepoints are cheapest, classic tracepoints need tracefs,
# fentry beats kprobe (no int3/trampoline-free entry, typed args).
MECHANISMS = ("tp_btf", "raw_tp", "tracepoint", "fentry", "kprobe")
TRACEFS = Path("/sys/kernel/tracing")
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
KPROBE_PMU = Path("/sys/bus/event_source/devices/kprobe")
LOCKDOWN = Path("/sys/kernel/security/lockdown")


class SetupError(RuntimeError):
    """A precondition is missing; the message says what and how to fix it (exit code 2)."""


@dataclass
class Candidate:
    mechanism: str
    program: str
    target: str  # "category/name" for tracepoints, the function name for function probes
    failure: str | None = None


@dataclass
class Hook:
    name: str
    candidates: list[Candidate] = field(default_factory=list)
    chosen: Candidate | None = None
    attached: bool = False
    off: str | None = None  # why it is switched off: by choice, or replaced (off_kind)
    off_kind: str | None = None  # OFF_CHOICE / OFF_REPLACED while off is set

    @property
    def reason(self) -> str:
        """Why the hook is off, or which better mechanisms were passed over and why."""
        if self.off:
            return self.off
        return "; ".join(f"{c.mechanism}: {c.failure}" for c in self.candidates if c.failure)

    def next_candidate(self) -> Candidate | None:
        return next((c for c in self.candidates if c.failure is None), None)


@dataclass(frozen=True)
class ProbeStatus:
    """One row of the `probes` table, as the snapshot carries it."""

    object: str
    hook: str
    mechanism: str | None
    attached: bool
    reason: str
    # Not attached on purpose, so not a failure: OFF_CHOICE (a default or option; the reason
    # says how to turn it on) or OFF_REPLACED (another hook family does its work).
    off: str | None = None

    @property
    def absent(self) -> bool:
        """The kernel has no such function or tracepoint at all (it predates the feature or
        renamed it): moot rather than failed; the reason says so for every mechanism."""
        return not self.attached and not self.off and NOT_IN_KERNEL in self.reason

    @property
    def refused(self) -> bool:
        """Every mechanism that could serve the hook is one this kernel's configuration
        refuses for any program (fentry under lockdown, kprobes compiled out): it cannot
        attach here whatever the tool does, until the configuration changes."""
        return (not self.attached and not self.off and not self.absent and bool(self.reason)
                and all(any(r in part for r in REFUSED_MECHANISM)
                        for part in self.reason.split("; ")))


OFF_CHOICE = "choice"
OFF_REPLACED = "replaced"
NOT_IN_KERNEL = "not in this kernel"
# Failures that refuse a mechanism for every program of this kernel (Kernel.static_check,
# and failure_reason): a configuration, not a fault of one program.
REFUSED_MECHANISM = ("fentry denied", "fentry needs /sys/kernel/btf/vmlinux",
                     "kprobes not supported by this kernel")


def _section_target(section: str) -> tuple[str, str]:
    mech, _, target = section.partition("/")
    return mech, target


def catalogue(obj: libbpf.Object) -> dict[str, Hook]:
    hooks: dict[str, Hook] = {}
    for prog in obj.programs.values():
        hook_name, sep, mech = prog.name.rpartition("__")
        if not sep or mech not in MECHANISMS:
            continue  # helper programs (iterators, XDP) are not hooks
        _, target = _section_target(prog.section)
        hooks.setdefault(hook_name, Hook(hook_name)).candidates.append(
            Candidate(mech, prog.name, target))
    for hook in hooks.values():
        hook.candidates.sort(key=lambda c: MECHANISMS.index(c.mechanism))
    return hooks


def read_catalogue(path: str, btf_path: str | None = None) -> dict[str, Hook]:
    with libbpf.Object(path, btf_path) as obj:
        return catalogue(obj)


def function_targets(hooks: dict[str, Hook]) -> set[str]:
    """Kernel functions the hooks' fentry/kprobe programs attach to."""
    return {c.target for h in hooks.values() for c in h.candidates
            if c.mechanism in ("fentry", "kprobe")}


@functools.cache
def _btf_names() -> tuple[frozenset[str], frozenset[str]]:
    """Tracepoints the kernel's BTF knows (its btf_trace_NAME typedefs) and its BPF iterator
    targets (a bpf_iter_TARGET function each).

    BTF's string section holds every name NUL-terminated; one scan for both prefixes finds
    them without parsing 6 MB of BTF, and only the names are kept, not the file.
    """
    try:
        data = VMLINUX_BTF.read_bytes()
    except OSError:
        return frozenset(), frozenset()
    found = re.findall(rb"\0(btf_trace|bpf_iter)_(\w+)(?=\0)", data)
    return (frozenset(n.decode() for kind, n in found if kind == b"btf_trace"),
            frozenset(n.decode() for kind, n in found if kind == b"bpf_iter"))


def missing_iterator(section: str) -> str | None:
    """Why an iter/TARGET program cannot load here (its target is newer than the kernel,
    e.g. iter/kmem_cache is 6.13+), or None. Other programs: None."""
    kind, _, target = section.partition("/")
    if kind != "iter" or not VMLINUX_BTF.exists() or target in _btf_names()[1]:
        return None
    return f"iterator {target} {NOT_IN_KERNEL}"


def _lockdown_mode() -> str | None:
    try:
        text = LOCKDOWN.read_text()
    except OSError:
        return None
    mode = text[text.find("[") + 1:text.find("]")] if "[" in text else ""
    return mode if mode and mode != "none" else None


class Kernel:
    """What one session knows about this kernel's attach mechanisms: which it may use
    (--mechanisms), and which the kernel refused outright (fentry under lockdown), learnt
    once so that later objects skip them instead of paying a failed load each."""

    def __init__(self, btf_path: str | None = None,
                 mechanisms: tuple[str, ...] | None = None) -> None:
        self.btf_path = btf_path
        self.allowed = mechanisms or MECHANISMS
        self.refused: dict[str, str] = {}
        self._fentry_probed = False
        self._lock = threading.Lock()  # objects load on two threads (Session)

    def refuse(self, mechanism: str, why: str) -> None:
        with self._lock:
            self.refused.setdefault(mechanism, why)

    def _fentry_refused(self, target: str) -> str | None:
        """Whether the kernel refuses fentry programs, found once by loading an empty one
        on the first fentry target: a refusal found by loading an object costs a reload."""
        with self._lock:
            if not self._fentry_probed:
                err = libbpf.fentry_load_errno(target)
                if err == errno.EPERM:
                    self.refused["fentry"] = failure_reason(
                        Candidate("fentry", "", target), err, "load")
                self._fentry_probed = err != errno.ENOENT  # that target only: try the next
            return self.refused.get("fentry")

    def static_check(self, cand: Candidate) -> str | None:
        """Why the candidate cannot work on this kernel, decided without loading anything."""
        mech, target = cand.mechanism, cand.target
        if mech not in self.allowed:
            return f"not allowed (--mechanisms {','.join(self.allowed)})"
        if mech in self.refused:
            return self.refused[mech]
        if mech in ("tp_btf", "raw_tp"):
            name = target.rpartition("/")[2]
            if VMLINUX_BTF.exists() and name not in _btf_names()[0]:
                return f"tracepoint {name} {NOT_IN_KERNEL}"
            if mech == "tp_btf" and not VMLINUX_BTF.exists():
                return "needs /sys/kernel/btf/vmlinux (--btf-path only serves CO-RE)"
        elif mech == "tracepoint":
            if not (TRACEFS / "events").is_dir():
                return f"tracefs not mounted at {TRACEFS} (mount -t tracefs nodev {TRACEFS})"
            if not (TRACEFS / "events" / target / "id").exists():
                return f"tracepoint {target} {NOT_IN_KERNEL}"
        elif mech in ("fentry", "kprobe"):
            # The checks that need no /proc/kallsyms scan first (Session scans meanwhile).
            if mech == "fentry" and not VMLINUX_BTF.exists():
                return "fentry needs /sys/kernel/btf/vmlinux"
            if mech == "fentry" and (refused := self._fentry_refused(target)):
                return refused
            if mech == "kprobe" and not KPROBE_PMU.exists():
                return "kprobes not supported by this kernel (no kprobe PMU: CONFIG_KPROBES off)"
            if not kallsyms.lookup([target]):
                return f"function {target} {NOT_IN_KERNEL} (not in /proc/kallsyms)"
        return None


def parse_mechanisms(text: str) -> tuple[str, ...]:
    """--mechanisms / NETMEMTRACE_MECHANISMS: a comma-separated subset of MECHANISMS."""
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in MECHANISMS]
    if bad or not names:
        raise SetupError(f"--mechanisms {text!r}: choose from {','.join(MECHANISMS)}")
    return names


def failure_reason(cand: Candidate, err: int, stage: str) -> str:
    """A sentence for a load/attach error: what the errno means for this mechanism."""
    name = errno.errorcode.get(err, str(err))
    if cand.mechanism == "fentry" and err == errno.EPERM:
        mode = _lockdown_mode()
        why = f"lockdown={mode}" if mode else "kernel lockdown or LSM policy"
        return f"fentry denied: EPERM ({why})"
    if cand.mechanism == "kprobe" and stage == "attach" and not KPROBE_PMU.exists():
        return "kprobes not supported by this kernel (CONFIG_KPROBES off)"
    if stage == "load" and err in (errno.EINVAL, errno.EACCES):
        return f"rejected by the verifier: {name}"
    return f"{stage} failed: {name} ({os.strerror(err)})"


class LoadedObject:
    """A BPF object loaded with one mechanism per hook and every possible hook attached."""

    def __init__(self, name: str, obj: libbpf.Object, hooks: dict[str, Hook],
                 absent: dict[str, str] | None = None) -> None:
        self.name = name
        self.obj = obj
        self.hooks = hooks
        # Helper programs (iterators) left out because the kernel lacks their target:
        # program name -> why. The object's reader works without them, saying so.
        self.absent = absent or {}

    def status(self) -> list[ProbeStatus]:
        return [
            ProbeStatus(self.name, h.name, h.chosen.mechanism if h.chosen else None, h.attached,
                        h.reason, h.off_kind)
            for h in self.hooks.values()
        ] + [ProbeStatus(self.name, prog, None, False, why) for prog, why in self.absent.items()]

    def close(self) -> None:
        self.obj.close()


def plan(hooks: dict[str, Hook]) -> dict[str, Candidate | None]:
    """One mechanism per hook: the best candidate not yet ruled out (pure)."""
    return {h.name: h.next_candidate() for h in hooks.values()}


def test_only(section: str) -> bool:
    """A program for BPF_PROG_TEST_RUN only (a raw_tp with no tracepoint, e.g.
    netmem_replay): nothing attached ever runs it, so only tests (load_object's force) load
    it, and a session does not pay its verification (start-up: bench/README.md)."""
    return section == "raw_tp"


def load_attempt(path: str, chosen: dict[str, Candidate | None], kernel: Kernel,
                 max_entries: dict[str, int] | None = None,
                 reuse: dict[str, libbpf.Map] | None = None, test_programs: bool = False
                 ) -> tuple[libbpf.Object | None, dict[str, str], Candidate | None, int]:
    """Load the object with the planned programs (and every helper program whose target
    the kernel has; test-only ones with test_programs). Returns (object, absent helpers,
    None, 0), or (None, {}, the one candidate the verifier blamed, errno); a failure no
    planned program explains raises."""
    obj = libbpf.Object(path, kernel.btf_path)
    try:
        for tbl, n in (max_entries or {}).items():
            try:
                obj.set_max_entries(tbl, n)
            except libbpf.LibbpfError as exc:
                raise SetupError(f"cannot size map {Path(path).name}.{tbl} to {n}: {exc}") \
                    from None
        for tbl, shared in (reuse or {}).items():
            obj.reuse_map(tbl, shared)
        selected = {c.program: c for c in chosen.values() if c}
        absent = {}
        for prog in obj.programs.values():
            is_hook = prog.name.rpartition("__")[2] in MECHANISMS
            if not is_hook and (why := missing_iterator(prog.section)):
                absent[prog.name] = why
            prog.set_autoload(prog.name in selected or (
                not is_hook and not why and (test_programs or not test_only(prog.section))))
        obj.load()
        return obj, absent, None, 0
    except libbpf.LibbpfError as exc:
        obj.close()
        bad = libbpf.failed_program(exc.log, iter(selected))
        if bad is None:
            raise SetupError(f"cannot load {Path(path).name}: {exc.summary()}") from exc
        return None, {}, selected[bad], exc.errno or errno.EINVAL
    except BaseException:
        obj.close()
        raise


def attach_attempt(obj: libbpf.Object, hooks: dict[str, Hook],
                   chosen: dict[str, Candidate | None]) -> bool:
    """Attach every planned program; True if one failed and its hook has another
    candidate (the object must be loaded again without it)."""
    retry = False
    for hook in hooks.values():
        hook.chosen, hook.attached = chosen[hook.name], False
        if hook.chosen is None:
            continue
        try:
            obj.attach(hook.chosen.program)
            hook.attached = True
        except libbpf.LibbpfError as exc:
            hook.chosen.failure = failure_reason(hook.chosen, exc.errno or 0, "attach")
            retry = retry or hook.next_candidate() is not None
    return retry


def load_object(name: str, path: str, *, kernel: Kernel | None = None,
                btf_path: str | None = None, force: str | None = None, attach: bool = True,
                max_entries: dict[str, int] | None = None,
                disabled: dict[str, str] | None = None,
                replaced: dict[str, str] | None = None,
                reuse: dict[str, libbpf.Map] | None = None) -> LoadedObject:
    """Open, load and attach an object, falling back per hook to the next mechanism:
    plan, load (a rejection blames one program), attach (a failure rules one out), again.

    kernel: the session's knowledge of this kernel (a fresh one if None).
    force: load only the programs of that mechanism (tests: "raw_tp" for BPF_PROG_TEST_RUN,
    "kprobe" to verifier-check function probes that cannot attach here), and the test-only
    programs (test_only).
    disabled: hook -> why it stays off by choice, ending in "turn on with ..."; not loaded.
    replaced: hook -> which other hooks do its work instead; not loaded either.
    reuse: map name -> a map of an object loaded before, which this object shares.
    """
    kernel = kernel or Kernel(btf_path)
    hooks = read_catalogue(path, kernel.btf_path)
    for kind, off in ((OFF_CHOICE, disabled), (OFF_REPLACED, replaced)):
        for hook_name, why in (off or {}).items():
            if hook_name in hooks:
                hooks[hook_name].off, hooks[hook_name].off_kind = why, kind
                for cand in hooks[hook_name].candidates:
                    cand.failure = why
    for cand in (c for h in hooks.values() for c in h.candidates if not c.failure):
        cand.failure = (f"not selected (forced {force})" if force and cand.mechanism != force
                        else None if force else kernel.static_check(cand))

    # Each round rules out at least one candidate, so this ends.
    for _ in range(sum(len(h.candidates) for h in hooks.values()) + 1):
        chosen = plan(hooks)
        obj, absent, blamed, err = load_attempt(path, chosen, kernel, max_entries, reuse,
                                                test_programs=force is not None)
        if obj is None:
            assert blamed is not None
            blamed.failure = failure_reason(blamed, err, "load")
            if blamed.mechanism == "fentry" and err == errno.EPERM:
                # Not this program's fault: no fentry program loads on this kernel.
                kernel.refuse("fentry", blamed.failure)
                for other in (c for h in hooks.values() for c in h.candidates):
                    if other.mechanism == "fentry" and other.failure is None:
                        other.failure = blamed.failure
            continue
        if not attach:
            for hook in hooks.values():
                hook.chosen, hook.attached = chosen[hook.name], False
            return LoadedObject(name, obj, hooks, absent)
        if attach_attempt(obj, hooks, chosen):
            obj.close()
            continue
        return LoadedObject(name, obj, hooks, absent)
    raise SetupError(f"cannot load {name}: no mechanism combination loads")


def check_privileges(btf_path: str | None = None) -> None:
    """Raise SetupError naming what is missing to load and attach BPF programs."""
    if btf_path and not os.path.exists(btf_path):
        raise SetupError(f"--btf-path {btf_path}: no such file")
    if not btf_path and not VMLINUX_BTF.exists():
        raise SetupError(
            "kernel BTF not found at /sys/kernel/btf/vmlinux: use a kernel built with "
            "CONFIG_DEBUG_INFO_BTF=y, or pass --btf-path FILE (e.g. from BTFHub)")
    caps = _effective_caps()
    need = {"CAP_BPF": 39, "CAP_PERFMON": 38}
    missing = [n for n, bit in need.items() if not caps >> bit & 1]
    if missing and not caps >> 21 & 1:  # CAP_SYS_ADMIN covers both on older kernels
        raise SetupError(
            f"missing {' and '.join(missing)}: run as root (sudo netmemtrace ...) or grant "
            "CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN")


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0
