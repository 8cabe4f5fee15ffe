"""host/pyroute2_lean.py: the collectors import only the pyroute2 submodules they use (the
package's __init__ costs 22 MB of RSS), and pyroute2 stays whole for any other code of the
process. Each check runs in a fresh interpreter: what is imported is the outcome."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

# Brought in by pyroute2/__init__.py and not needed by netmemtrace's collectors.
HEAVY = ("pyroute2.ndb", "pyroute2.ipdb", "pyroute2.iproute", "pyroute2.netns",
         "pyroute2.config", "pyroute2.netlink.nlsocket", "asyncio", "sqlite3",
         "multiprocessing", "ssl", "unittest")


def run_python(code: str, path: Path | None = None) -> dict:
    """Run code in a fresh interpreter (with `path` first on sys.path); it prints one JSON
    document as its last line."""
    env_path = f"import sys; sys.path.insert(0, {str(path)!r})\n" if path else ""
    out = subprocess.run([sys.executable, "-c", env_path + textwrap.dedent(code)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_collectors_skip_the_package_init() -> None:
    got = run_python("""
        import json, sys
        def rss_kib():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        before = rss_kib()
        from netmemtrace.host import netlink, resolve
        after = rss_kib()
        print(json.dumps({"modules": sorted(sys.modules), "rss_kib": after - before,
                          "init_ran": "IPRoute" in vars(sys.modules["pyroute2"])}))
    """)
    assert not got["init_ran"]
    assert [m for m in HEAVY if m in got["modules"]] == []
    assert "pyroute2.netlink" in got["modules"]
    # The whole package measured 22 MB; what the collectors use about 3.
    assert got["rss_kib"] < 10 * 1024, got["rss_kib"]


def test_the_session_imports_no_asyncio_sqlite_or_ssl() -> None:
    got = run_python("""
        import json, sys
        import netmemtrace.session
        print(json.dumps(sorted(sys.modules)))
    """)
    assert [m for m in HEAVY if m in got] == []


def test_pyroute2_whole_for_other_code_in_the_process() -> None:
    """After the lean import, `from pyroute2 import IPRoute` (and every other public name)
    runs the real __init__ into the same package: one pyroute2, complete."""
    got = run_python("""
        import json, sys
        from netmemtrace.host import netlink
        lean = netlink.link_names()
        import pyroute2
        from pyroute2 import IPRoute, config
        with IPRoute() as ipr:
            full = {l["index"]: l.get_attr("IFLA_IFNAME") for l in ipr.get_links()}
        print(json.dumps({
            "same_netlink": pyroute2.netlink is sys.modules["pyroute2.netlink"],
            "same_package": sys.modules["pyroute2"] is pyroute2,
            "ndb": hasattr(pyroute2, "NDB"), "config": config is pyroute2.config,
            "names_agree": lean == full, "all": "IPRoute" in dir(pyroute2),
        }))
    """)
    assert got == dict.fromkeys(got, True)


def test_pyroute2_imported_first_is_used_as_is() -> None:
    got = run_python("""
        import json, sys
        import pyroute2
        package = sys.modules["pyroute2"]
        from netmemtrace.host import netlink
        print(json.dumps([sys.modules["pyroute2"] is package, type(package).__name__,
                          bool(netlink.link_names())]))
    """)
    assert got == [True, "module", True]


def test_falls_back_to_the_plain_import() -> None:
    """If the package cannot be created without its __init__, plain `import pyroute2`."""
    got = run_python("""
        import importlib.util, json, sys
        def refuse(spec):
            raise RuntimeError("no module objects today")
        importlib.util.module_from_spec = refuse
        from netmemtrace.host import netlink
        print(json.dumps(["pyroute2.ndb" in sys.modules, bool(netlink.link_names())]))
    """)
    assert got == [True, True]


def test_submodule_needing_the_package_init(tmp_path: Path) -> None:
    """A (future) pyroute2 submodule that only works after its package's __init__ ran: the
    init runs, then the import is retried."""
    pkg = tmp_path / "pyroute2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("READY = True\n")
    (pkg / "fussy.py").write_text(textwrap.dedent("""
        import sys
        if "READY" not in vars(sys.modules["pyroute2"]):
            raise ImportError("needs the package's __init__")
        VALUE = 42
    """))
    (pkg / "easy.py").write_text("VALUE = 7\n")
    got = run_python("""
        import json, sys
        from netmemtrace.host.pyroute2_lean import import_submodule
        easy = import_submodule("pyroute2.easy").VALUE
        init_after_easy = "READY" in vars(sys.modules["pyroute2"])
        fussy = import_submodule("pyroute2.fussy").VALUE
        print(json.dumps([easy, init_after_easy, fussy, sys.modules["pyroute2"].READY]))
    """, path=tmp_path)
    assert got == [7, False, 42, True]
