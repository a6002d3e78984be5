"""JAX's persistent compilation cache, in a directory only the current user can write.

Compiled XLA programs are trusted code, so a cache directory that other users could write to is refused
(the run goes on, compiling as usual).  Default: ``$KGRAD_CACHE_DIR`` or ``~/.cache/kgrad/jax``.
"""

from __future__ import annotations

import os
import stat
import warnings

_ENABLED: str | None = None


def default_cache_dir() -> str:
    return os.environ.get("KGRAD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kgrad", "jax")


def private_dir(path: str) -> bool:
    """Create ``path`` (mode 0700) if needed; True if it is owned by us and writable by nobody else."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.stat(path)
    return info.st_uid == os.getuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Point JAX at the cache directory (once per process); return it, or None if refused/disabled."""
    global _ENABLED
    if os.environ.get("KGRAD_NO_CACHE"):
        return None
    path = os.path.abspath(os.path.expanduser(path or default_cache_dir()))
    if _ENABLED == path:
        return path
    try:
        ok = private_dir(path)
    except OSError as exc:
        warnings.warn(f"kgrad: compilation cache {path!r} unavailable ({exc}); compiling without it")
        return None
    if not ok:
        warnings.warn(f"kgrad: compilation cache {path!r} is writable by other users or not ours; "
                      f"not using it (chmod 700 it, or set KGRAD_CACHE_DIR)")
        return None
    from .lazy_jax import set_option

    set_option("jax_compilation_cache_dir", path)
    set_option("jax_persistent_cache_min_compile_time_secs", 0.0)
    set_option("jax_persistent_cache_min_entry_size_bytes", 0)
    _ENABLED = path
    return path
