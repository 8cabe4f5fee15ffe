"""pyroute2 submodules, imported without running pyroute2/__init__.py.

Why: pyroute2/__init__.py imports every API the library has (NDB with sqlite3, IPDB,
conntrack, nftables, the asyncio socket stack, ssl, multiprocessing). That is 22 MB of RSS
and 0.12 s on the CI machine, over a third of the daemon's 60 MB budget (bench/README.md).
netmemtrace needs the netlink message classes and attribute codecs (pyroute2.netlink) and
the Marshal that splits and decodes replies (pyroute2.netlink.marshal): 2.4 MB on their own.
(Every socket class of pyroute2 0.9 runs on asyncio, another 9 MB, so host/netlink.py
sends the requests on a plain AF_NETLINK socket.)

How: Python runs a package's __init__ before any of its submodules. Here the package module
is created from its spec without executing it, and the import system binds the submodules to
it as usual. The first time code in this process asks the package for a name that is not a
submodule (`from pyroute2 import IPRoute`, `pyroute2.NDB`), the real __init__ runs into the
same module object, so such code keeps working. If anything here fails (say a future
pyroute2 whose submodules need their package's __init__), plain `import pyroute2` is used:
larger and slower, never wrong. tests/test_pyroute2_lean.py checks both paths in fresh
interpreters.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types

PACKAGE = "pyroute2"
_lock = threading.RLock()


class _DeferredInitPackage(types.ModuleType):
    """The pyroute2 package whose __init__ has not run yet: it runs on first need."""

    def __getattr__(self, name: str) -> object:  # only called when the name is missing
        if name.startswith("__") and name != "__all__":
            raise AttributeError(name)  # the import system probing (__path__ is set)
        if importlib.util.find_spec(f"{self.__name__}.{name}") is not None:
            # A submodule: `from pyroute2 import config` then imports it as usual.
            raise AttributeError(name)
        run_package_init(self)
        try:
            return self.__dict__[name]
        except KeyError:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}") \
                from None


def run_package_init(module: types.ModuleType) -> None:
    """Run pyroute2/__init__.py into the deferred package (once); a no-op otherwise."""
    with _lock:
        if type(module) is not _DeferredInitPackage:
            return
        module.__class__ = types.ModuleType  # from here on, a plain, complete package
        spec = module.__spec__
        assert spec is not None and spec.loader is not None
        try:
            spec.loader.exec_module(module)
        except BaseException:
            module.__class__ = _DeferredInitPackage
            raise


def import_submodule(name: str) -> types.ModuleType:
    """pyroute2's submodule `name` (e.g. "pyroute2.netlink"), without the package's
    __init__ when pyroute2 is not imported yet."""
    with _lock:
        if PACKAGE not in sys.modules:
            try:
                spec = importlib.util.find_spec(PACKAGE)
                if spec is None or spec.loader is None or not spec.submodule_search_locations:
                    raise ImportError(f"{PACKAGE} is not an importable package")
                package = importlib.util.module_from_spec(spec)
                package.__class__ = _DeferredInitPackage
                sys.modules[PACKAGE] = package
            except Exception:
                sys.modules.pop(PACKAGE, None)
                importlib.import_module(PACKAGE)  # the plain way
        try:
            return importlib.import_module(name)
        except Exception:
            # A submodule that needs the package's __init__: run it, then try again.
            package = sys.modules.get(PACKAGE)
            if package is None or type(package) is not _DeferredInitPackage:
                raise
            run_package_init(package)
            return importlib.import_module(name)
