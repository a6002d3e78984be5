"""JAX, imported where it is first used rather than where kgrad's modules are imported.

The client of a run on a cluster plans, writes the output and hands tasks to the workers; it never traces
or runs a JAX function, and a far-field run's workers only interpolate with numpy.  Importing JAX costs
0.3 s of every such process's start (XLA's shared library and its dtypes; 0.85 s with ml_dtypes 0.7.0), so
the modules that compute with JAX (:mod:`pipeline.kernels`, :mod:`pipeline.tiles`, :mod:`pipeline.blocks` ...) name it
through the stand-ins below: ``jax.jit``, ``jnp.exp`` and ``lax.scan`` import JAX the first time one of
them is looked up, and from then on are JAX's own objects (the look-up is one attribute access more, at
trace time or once per call).  The workers of a run whose tasks compute with JAX start importing it in a
thread as soon as the client is connected (:func:`import_in_background`, from
:func:`pipeline.cluster.import_jax_on_workers`), while the client writes the output and submits the tasks.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading


class LazyModule:
    """A module's stand-in: the module is imported at the first attribute looked up through it."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str):
        self._name = name
        self._module = None

    def __getattr__(self, attribute: str):
        if attribute.startswith("__") or attribute in self.__slots__:  # copy, pickle, inspect: not JAX's
            raise AttributeError(attribute)
        module = self._module
        if module is None:
            imported()  # a background import of JAX under way: wait (a submodule's import would not)
            module = importlib.import_module(self._name)
            object.__setattr__(self, "_module", module)
        return getattr(module, attribute)

    def __reduce__(self):
        return LazyModule, (self._name,)

    def __repr__(self) -> str:
        return f"<{self._name}, imported on first use{'' if self._module is None else ' (imported)'}>"


jax = LazyModule("jax")
jnp = LazyModule("jax.numpy")
lax = LazyModule("jax.lax")


_BACKGROUND: threading.Thread | None = None  # a background import of JAX (import_in_background), if started


def import_in_background() -> None:
    """Start importing JAX in a daemon thread, so that a process that will compute with it (a worker of a
    dense or pruned run) finds it imported when its first task starts.  The import is the same as a first
    use's: a failure is left to that use to raise.  :func:`imported` waits for it to finish."""
    global _BACKGROUND
    if _BACKGROUND is None and "jax" not in sys.modules:
        _BACKGROUND = threading.Thread(target=_import_jax_quietly, name="kgrad-import-jax", daemon=True)
        _BACKGROUND.start()


def _import_jax_quietly() -> None:
    try:
        importlib.import_module("jax")
    except Exception:  # noqa: BLE001  (the first use imports it again and raises there)
        pass


def imported():
    """JAX's module if this process has imported it, else None; waits for a background import to finish
    first (a module still being imported is in ``sys.modules`` before its attributes are)."""
    if _BACKGROUND is not None:
        _BACKGROUND.join()
    return sys.modules.get("jax")


def set_option(name: str, value) -> None:
    """Set JAX's configuration option ``name`` for this process: now, if JAX is imported, else through its
    environment variable (the name in capitals), which JAX reads as the option's value when it is imported.
    A process that runs no JAX (a run's client) then never imports it."""
    module = imported()
    if module is not None:
        module.config.update(name, value)
    else:
        os.environ[name.upper()] = ("1" if value else "0") if isinstance(value, bool) else str(value)
