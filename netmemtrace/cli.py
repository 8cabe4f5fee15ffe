"""Command line: the parser and the dispatch to netmemtrace/commands/. Errors are one line
on stderr, exit 2."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType, ModuleType
from typing import NoReturn

from netmemtrace import __version__
from netmemtrace.collect.netmem import DEFAULT_SAMPLE_N
from netmemtrace.commands import Terminate, options
from netmemtrace.kernel import abi, libbpf, probes
from netmemtrace.workload import demo

EPILOG = """\
examples:
  sudo netmemtrace dump --duration 5      JSON of every page pool seen in 5 s
  sudo netmemtrace probes                 which hook attached with which mechanism, and why not
  sudo netmemtrace top                    live view; --batch --count N for logs
  sudo netmemtrace serve                  Prometheus /metrics on 127.0.0.1:9435
  sudo netmemtrace explain-zombie eth0    who holds the pages of a destroyed pool
  sudo netmemtrace demo --duration 30     veth + XDP + TCP traffic so page pools really run

Needs root (or CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN) and kernel BTF
(/sys/kernel/btf/vmlinux, or --btf-path). Schema of `dump`: README.md.
"""


def _on_sigterm(_sig: int, _frame: FrameType | None) -> None:
    raise Terminate


# One module per command (add_arguments, run), imported only when that command runs: some
# bring heavy imports (curses; prometheus_client, bcrypt, yaml, ssl), and every command
# should start fast.
COMMAND_MODULES = {"dump": "netmemtrace.commands.dump", "probes": "netmemtrace.commands.probes",
                   "top": "netmemtrace.commands.top", "serve": "netmemtrace.commands.serve",
                   "explain-zombie": "netmemtrace.commands.explain_zombie",
                   "demo": "netmemtrace.commands.demo"}


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line and exit 2, like every other error of the tool (argparse
    would print the whole usage first). Subcommand parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _command_module(name: str) -> ModuleType:
    return importlib.import_module(COMMAND_MODULES[name])


def _parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; with `only`, the lazily imported commands other than that one get
    their help line but not their options (main() parses one command per run)."""

    def add_options(command: str, sub_parser: argparse.ArgumentParser) -> None:
        if only is None or only == command:
            _command_module(command).add_arguments(sub_parser)

    p = _Parser(
        prog="netmemtrace", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="eBPF observability for Linux network memory: page_pool inflight and "
                    "recycling per NIC queue, memcg socket memory, zerocopy.",
        epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"netmemtrace {__version__}")
    p.add_argument("--keep-caps", action="store_true",
                   help="keep every capability after attach (default: drop all but "
                        "CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, CAP_NET_ADMIN)")
    p.add_argument("--btf-path", metavar="FILE",
                   help="kernel BTF for CO-RE relocation when /sys/kernel/btf/vmlinux is "
                        "absent (e.g. a BTFHub file for this kernel)")
    p.add_argument("--netmem-sample", type=options.NETMEM_SAMPLE, default=DEFAULT_SAMPLE_N,
                   metavar="N",
                   help="track the ownership state of 1 in N netmem, chosen by hash "
                        f"(default {DEFAULT_SAMPLE_N}: 1.3x an empty program per page_pool event, "
                        "16: 1.5x; "
                        "1 tracks all). Figures are scaled by N and say so")
    p.add_argument("--netmem-stack", action="store_true",
                   help="also follow netmem into the network stack (netif_receive_skb, the "
                        "one per-packet probe: ~125 ns per received skb); without it the "
                        "'stack' ownership state is reported unavailable")
    p.add_argument("--mechanisms", metavar="LIST",
                   default=os.environ.get("NETMEMTRACE_MECHANISMS") or None,
                   help="attach only with these mechanisms, comma-separated, from "
                        "tp_btf,raw_tp,tracepoint,fentry,kprobe (default: all, best first; "
                        "env NETMEMTRACE_MECHANISMS). E.g. 'tracepoint,kprobe' where fentry "
                        "misbehaves; hooks with none of them stay detached, saying why")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("dump", help="trace for a while, print one JSON snapshot",
                       description="Attach, wait --duration seconds (Ctrl-C: now), print "
                                   "one JSON document to stdout: schema_version, host, "
                                   "kernel, probes, pools (with netmem states and zombie "
                                   "holders), memcgs (with every process seen making "
                                   "zerocopy calls, exited ones marked with their exit "
                                   "age), devmem_sockets, netmem, self_stats, stats "
                                   "(every BPF counter by object; names ending _full, "
                                   "_lost, _truncated count losses), collectors (each "
                                   "one's success and time), errors (collector, message). "
                                   "Every field, its unit and meaning: README.md. A "
                                   "figure the kernel cannot give here is "
                                   '{"unavailable": reason}, never 0.')
    add_options("dump", d)

    pr = sub.add_parser("probes", help="table of hooks: mechanism chosen, attached, reason",
                   description="Load every BPF object as `dump` would and print, per hook, "
                               "the attach mechanism chosen (tp_btf, raw_tp, tracepoint, "
                               "fentry, kprobe), whether it attached, and why the others "
                               "were passed over.")
    add_options("probes", pr)

    t = sub.add_parser("top", help="live terminal view: page pools and memory cgroups",
                       description="Full-screen view refreshed every --interval seconds. "
                                   "Keys: q quit, s/S sort column/reverse, / filter, tab "
                                   "switch table, p pause. --batch prints plain-text frames "
                                   "instead (logs, scripts).")
    add_options("top", t)

    e = sub.add_parser("serve", help="Prometheus exporter daemon: /metrics and /healthz",
                       description="Attach once and serve /metrics (Prometheus text or "
                                   "OpenMetrics) and /healthz until SIGTERM/SIGINT. Metrics, "
                                   "flags and deployment: deploy/README.md.")
    add_options("serve", e)

    x = sub.add_parser("explain-zombie",
                       help="one-shot report: who holds a zombie page pool's pages",
                       description="Attach, wait for the kernel's next release retry, and "
                                   "print a plain-text report of every zombie page pool (or "
                                   "POOL: id, 0xaddress or netdev): holders, whether it heals "
                                   "by itself, what was checked. Paste it into a bug report.")
    add_options("explain-zombie", x)

    m = sub.add_parser("demo", help="run the built-in veth + XDP + TCP workload",
                       description="Create two network namespaces joined by a veth pair with "
                                   "an XDP_PASS program on the receiver (so the kernel's "
                                   "page_pool runs), push TCP through it, remove everything "
                                   "on exit (Ctrl-C included).")
    add_options("demo", m)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    command = next((w for w in words if w in COMMAND_MODULES), None)
    args = _parser(only=command).parse_args(words)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _command_module(args.command).run(args)
    except (probes.SetupError, abi.AbiError, libbpf.LibbpfError, demo.DemoError) as exc:
        print(f"netmemtrace: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminate):
        return 0


if __name__ == "__main__":
    sys.exit(main())
