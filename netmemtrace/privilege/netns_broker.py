"""File descriptors created inside other network namespaces, after the capability drop.

Two things are bound at creation to the netns of the thread that creates them: a BPF socket
iterator (iter/tcp, iter/udp walk the netns current at BPF_ITER_CREATE) and a netlink socket.
Reading either later needs no capability, but entering the netns to create them (setns) needs
CAP_SYS_ADMIN, which the daemon gives up once attached (caps.drop_after_attach).

So before the drop open_session starts a broker: a process that keeps CAP_SYS_ADMIN only
(effective, permitted and bounding set; nothing inheritable or ambient; no_new_privs; not
dumpable) and does one thing, on request over a SOCK_SEQPACKET socketpair: take a netns fd
(SCM_RIGHTS; validated: an nsfs inode of type CLONE_NEWNET), enter it, create
  BPF_ITER  an iterator fd from a BPF link fd passed alongside, or
  NETLINK   an AF_NETLINK socket of a whitelisted protocol (NETLINK_ROUTE, NETLINK_GENERIC),
return to its own netns and send the new fd back (SCM_RIGHTS), or an errno. The daemon
opens the netns files itself (it keeps CAP_SYS_PTRACE for /proc/PID/ns/net of other users'
processes): while serving, the broker opens no path and runs no code of the daemon's choosing.

The broker is this module run by a fresh interpreter (python -I -S: only this module, caps.py
and builtin/standard modules imported), not a bare fork of the daemon: a forked child shares
the daemon's heap copy-on-write, and the daemon's reference counting and garbage collection
re-dirty those pages, so the child ends up owning a private copy of the daemon's pre-fork
heap (measured 8.7 MB private within seconds of start, of ~18 MB), besides inheriting its
locks and BPF descriptors. The exec'd broker costs ~5 MB private and ~50 ms at start. It gets
nothing but the socket (close_fds; /dev/null on stdin and stdout, the daemon's stderr for a
traceback), runs in its own session (terminal signals go to the daemon, which then ends it),
exits at EOF on the socket (the daemon closed its end or died), is killed by
PR_SET_PDEATHSIG when the thread that started it exits, and is reaped by Broker.close
(Session.close).

fd_in_netns() is the one way collectors get such a descriptor: through the broker when one
runs, else by setns in the calling thread (--keep-caps, not root, or Session used directly).
A netns that is our own needs neither.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import socket
import stat
import struct
import sys
import threading
from collections.abc import Iterator

from netmemtrace.privilege import caps

TYPE_CHECKING = False  # typing (and the re it imports) would cost the broker ~0.5 MB
if TYPE_CHECKING:
    import subprocess

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), linux/nsfs.h
BPF_ITER, NETLINK = 1, 2
NETLINK_ROUTE, NETLINK_GENERIC = 0, 16  # linux/netlink.h (socket has no NETLINK_GENERIC)
NETLINK_PROTOCOLS = frozenset((NETLINK_ROUTE, NETLINK_GENERIC))
BROKER_CAPS = (caps.CAP_SYS_ADMIN,)
BROKER_COMM = b"netmemtrace-ns"  # 15 bytes at most
START_TIMEOUT_S = REQUEST_TIMEOUT_S = 10.0
_REQUEST = struct.Struct("<II")  # kind, netlink protocol (0 for BPF_ITER)
_REPLY = struct.Struct("<i")  # 0 (one fd attached) or an errno
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_NAME = 1, 4, 15
# bpf(2) has no libc wrapper; its number per architecture (asm/unistd*.h).
_NR_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "loongarch64": 280,
           "ppc64le": 361, "ppc64": 361, "s390x": 351, "i686": 357, "i386": 357,
           "armv7l": 386, "armv6l": 386}
_BPF_ITER_CREATE = 33
# Run by the broker's interpreter: our package directory, then the entry point.
_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
         "from netmemtrace.privilege.netns_broker import broker_main; "
         "sys.exit(broker_main(sys.argv[2:]))")

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_libc = ctypes.CDLL(None, use_errno=True)
_broker: Broker | None = None
_broker_lock = threading.Lock()


class _IterCreateAttr(ctypes.Structure):  # union bpf_attr, BPF_ITER_CREATE
    _fields_ = [("link_fd", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


# ---- creating the descriptor (the daemon's direct path and the broker alike) ----

def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def _entered(target: int, own: int) -> Iterator[None]:
    """The block runs with this thread in the netns of fd `target`, then back in `own`."""
    _setns(target)
    try:
        yield
    finally:
        try:
            _setns(own)
        except OSError as exc:
            # Not an OSError: callers skipping namespaces that vanish must not go on
            # running in the wrong one.
            raise RuntimeError(f"could not return to our network namespace: {exc}") from exc


@contextlib.contextmanager
def entered_netns(path: str) -> Iterator[None]:
    """Run the block with this thread in the network namespace at path, then return
    (needs CAP_SYS_ADMIN)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with _entered(target, own):
                yield
        finally:
            os.close(target)
    finally:
        os.close(own)


def _bpf_iter_create(link_fd: int) -> int:
    nr = _NR_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf(2) number unknown on {os.uname().machine}")
    attr = _IterCreateAttr(link_fd, 0)
    fd = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(_BPF_ITER_CREATE), ctypes.byref(attr),
                       ctypes.c_uint(ctypes.sizeof(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_ITER_CREATE: {os.strerror(err)}")
    return fd  # O_CLOEXEC (bpf_iter_new_fd)


def _create(kind: int, arg: int) -> int:
    """The new descriptor, in the calling thread's netns (close-on-exec)."""
    if kind == BPF_ITER:
        return _bpf_iter_create(arg)
    if kind == NETLINK:
        if arg not in NETLINK_PROTOCOLS:
            raise OSError(errno.EPROTONOSUPPORT, f"netlink protocol {arg} not allowed")
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             arg).detach()
    raise OSError(errno.EINVAL, f"unknown descriptor kind {kind}")


def _is_netns(fd: int, nsfs_dev: int) -> bool:
    """fd is a namespace file (nsfs: the device of our own) of a network namespace."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_dev != nsfs_dev:
        return False
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False


def fd_in_netns(path: str, kind: int, arg: int) -> int:
    """A new descriptor created inside the network namespace at path (/run/netns/NAME,
    /proc/PID/ns/net): kind BPF_ITER, arg a BPF iterator link fd -> an iterator over that
    netns; kind NETLINK, arg NETLINK_ROUTE or NETLINK_GENERIC -> a netlink socket of that
    netns. The caller owns (closes) it. Through the broker when one runs (capabilities
    dropped), else by setns in this thread; our own netns needs neither. OSError (ENOENT:
    the netns is gone) on failure."""
    ns = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            here, there = os.fstat(own), os.fstat(ns)
            if (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino):
                return _create(kind, arg)
            broker = _broker
            if broker is not None:
                return broker.request(ns, kind, arg)
            with _entered(ns, own):
                return _create(kind, arg)
        finally:
            os.close(own)
    finally:
        os.close(ns)


# ---- the daemon's side ----

class Broker:
    """The daemon's handle on a running broker process."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._sock: socket.socket | None = sock
        self._lock = threading.Lock()

    def request(self, netns_fd: int, kind: int, arg: int) -> int:
        """One descriptor made by the broker in the netns of netns_fd (see fd_in_netns)."""
        fds = [netns_fd, arg] if kind == BPF_ITER else [netns_fd]
        payload = _REQUEST.pack(kind, 0 if kind == BPF_ITER else arg)
        with self._lock:
            if self._sock is None:
                raise OSError(errno.EPIPE, "netns broker: not running")
            try:
                socket.send_fds(self._sock, [payload], fds)
                msg, got, flags, _ = socket.recv_fds(self._sock, 64, 1,
                                                     socket.MSG_CMSG_CLOEXEC)
            except OSError as exc:
                self._stop(0.0)
                raise OSError(exc.errno or errno.EIO, f"netns broker: {exc}") from exc
            if len(msg) != _REPLY.size or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                for fd in got:
                    os.close(fd)
                self._stop(0.0)  # exited (EOF), or out of step: not to be trusted again
                raise OSError(errno.EPIPE, "netns broker: exited" if not msg
                              else "netns broker: malformed reply")
        (err,) = _REPLY.unpack(msg)
        if err or len(got) != 1:
            for fd in got:
                os.close(fd)
            err = err or errno.EIO
            raise OSError(err, f"netns broker: {os.strerror(err)}")
        return got[0]

    def _stop(self, grace_s: float) -> None:
        """Close our end (the broker exits at EOF) and reap it; SIGKILL after grace_s."""
        import subprocess

        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Stop and reap the broker (idempotent); fd_in_netns goes back to setns."""
        global _broker
        with _broker_lock:
            if _broker is self:
                _broker = None
        with self._lock:
            self._stop(1.0)


def active() -> Broker | None:
    """The running broker, if any."""
    return _broker


def start() -> Broker:
    """Start the broker (needs CAP_SYS_ADMIN and CAP_SETPCAP) and route fd_in_netns through
    it. Call before capabilities are dropped, from the thread that outlives the session
    (the broker's PR_SET_PDEATHSIG follows that thread)."""
    import subprocess

    global _broker
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _BOOT, _PACKAGE_PARENT, str(theirs.fileno()),
             str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
            cwd="/", start_new_session=True)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    broker = Broker(proc, ours)
    try:
        ours.settimeout(START_TIMEOUT_S)
        ready = ours.recv(64)
        err = _REPLY.unpack(ready)[0] if len(ready) == _REPLY.size else errno.EIO
        if err:
            raise OSError(err, f"netns broker did not start: {os.strerror(err)}")
        ours.settimeout(REQUEST_TIMEOUT_S)
    except BaseException:
        broker.close()
        raise
    with _broker_lock:
        previous, _broker = _broker, broker
    if previous is not None:
        previous.close()
    return broker


# ---- the broker's side (its own interpreter; see the module's docstring) ----

def broker_main(argv: list[str]) -> int:
    """The broker process: argv is (socket fd, pid of the daemon)."""
    sock_fd, daemon = int(argv[0]), int(argv[1])
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != daemon:  # the daemon died before the line above
        return 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon's exit (EOF) ends the broker
    _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(BROKER_COMM), 0, 0, 0)
    sock = socket.socket(fileno=sock_fd)
    own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    nsfs_dev = os.fstat(own).st_dev
    try:
        caps.set_caps(BROKER_CAPS)
        if _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_SET_DUMPABLE")
        if not caps.has_effective(caps.CAP_SYS_ADMIN):
            raise OSError(errno.EPERM, "no CAP_SYS_ADMIN")
    except OSError as exc:
        sock.send(_REPLY.pack(exc.errno or errno.EPERM))
        return 1
    sock.send(_REPLY.pack(0))
    while True:
        msg, fds, flags, _ = socket.recv_fds(sock, 64, 2, socket.MSG_CMSG_CLOEXEC)
        if not msg and not fds:
            return 0  # the daemon closed its end, or exited
        new, err = -1, 0
        try:
            new = _serve_one(msg, fds, flags, own, nsfs_dev)
        except OSError as exc:
            err = exc.errno or errno.EIO
        except RuntimeError:
            return 1  # not back in our own netns: serve nothing more
        except Exception:
            err = errno.EINVAL
        finally:
            for fd in fds:
                os.close(fd)
        try:
            if new >= 0:
                socket.send_fds(sock, [_REPLY.pack(0)], [new])
            else:
                sock.send(_REPLY.pack(err))
        finally:
            if new >= 0:
                os.close(new)


def _serve_one(msg: bytes, fds: list[int], flags: int, own: int, nsfs_dev: int) -> int:
    if len(msg) != _REQUEST.size or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        raise OSError(errno.EINVAL, "malformed request")
    kind, protocol = _REQUEST.unpack(msg)
    if kind == BPF_ITER and len(fds) == 2 and protocol == 0:
        arg = fds[1]
    elif kind == NETLINK and len(fds) == 1 and protocol in NETLINK_PROTOCOLS:
        arg = protocol
    else:
        raise OSError(errno.EINVAL, "request not allowed")
    if not _is_netns(fds[0], nsfs_dev):
        raise OSError(errno.EINVAL, "not a network namespace")
    with _entered(fds[0], own):
        return _create(kind, arg)
