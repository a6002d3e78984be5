"""JAX's numeric switches and device facts, with no kernel knowledge.

JAX computes in float32 unless its x64 switch is on; kgrad casts every array explicitly, so the switch
only decides whether float64 arrays are possible, never the dtype of a float32 run.  The switch is
process-wide (:func:`enable_x64`, for worker processes), scoped (:func:`x64_enabled`, for the in-process
API, which leaves the caller's configuration as it found it) or per thread (:func:`thread_x64`).  GEMMs
run at ``HIGHEST`` matrix precision: full float32 (or float64) products, never TF32 or bf16 passes.
No units: these are switches, not quantities.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .lazy_jax import imported, jax, set_option

HIGHEST = "highest"  # lax.Precision.HIGHEST: no TF32 / bf16 passes on GPUs (r2 needs full precision)


def enable_x64() -> None:
    """Turn on JAX's x64 switch for the rest of this process (worker processes: float64 runs, and float32
    runs that take some steps in float64).  Arrays are always cast explicitly, so float32 stays float32."""
    if imported() is None or not jax.config.read("jax_enable_x64"):
        set_option("jax_enable_x64", True)  # before JAX is imported: read when a task first uses it


@contextlib.contextmanager
def x64_enabled(needed: bool = True):
    """JAX's x64 switch on inside the block (if ``needed``) and restored after: the in-process API leaves
    the caller's JAX configuration as it found it.  (Switched per call, it costs JAX its fast dispatch
    path, so float32 runs that need no float64 step leave it alone.)"""
    before = jax.config.read("jax_enable_x64")
    if not needed or before:
        yield
        return
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


def thread_x64(enabled: bool):
    """A context that sets JAX's x64 switch for the current thread only (threads do not inherit it)."""
    context = getattr(jax, "enable_x64", None)
    if context is None:  # JAX before jax.enable_x64
        from jax.experimental import enable_x64 as context
    return context(enabled)


def on_cpu() -> bool:
    """JAX's default backend is the CPU (the in-process API then runs one query block per core)."""
    return jax.default_backend() == "cpu"


def x64_active() -> bool:
    """JAX's x64 switch is on for this thread (``jax.enable_x64`` contexts are per thread)."""
    return jax.dtypes.canonicalize_dtype(np.float64) == np.dtype(np.float64)
