"""JAX's persistent compilation cache, and kgrad's own cached files, in directories only the current user can write.

Compiled XLA programs are trusted code, and a cached kernel table decides a ``--tolerance`` run's error bounds,
so a cache directory that other users could write to is refused (the run goes on, computing as usual).
Default: ``$KGRAD_CACHE_DIR`` or ``~/.cache/kgrad/jax``.
"""

from __future__ import annotations

import contextlib
import hashlib
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


# ---------------------------------------------------------------------------------------- checked files


def load_checked(folder: str, name: str) -> bytes | None:
    """What :func:`store_checked` kept as ``name`` in ``folder``, or None: the folder is not private
    (:func:`private_dir`), the file is not a regular file of ours that only we can write, or its content is
    not what was stored (its SHA-256, stored before it, differs: a torn or altered file)."""
    try:
        if not private_dir(folder):
            return None
        handle = os.open(os.path.join(folder, name), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(handle, "rb") as f:
        info = os.fstat(f.fileno())
        if (not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid()
                or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
            return None
        stored = f.read()
    digest, data = stored[:32], stored[32:]
    return data if len(digest) == 32 and hashlib.sha256(data).digest() == digest else None


def store_checked(folder: str, name: str, data: bytes) -> None:
    """Keep ``data`` as ``name`` in ``folder`` (only if the folder is private), its SHA-256 first: written to
    a temporary file of its own, flushed to disk, then renamed into place.  Failing to store is not an
    error (the caller computes the data again next time)."""
    import tempfile

    try:
        if not private_dir(folder):
            return
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".partial")
    except OSError:
        return
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(hashlib.sha256(data).digest() + data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, os.path.join(folder, name))
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
