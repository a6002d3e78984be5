"""Test hook (tests/test_stale_writer.py): with KGRAD_TEST_FREEZE_ARRAY set, the first process that writes rows of
that array leaves a marker file (KGRAD_TEST_FREEZE_MARKER) and stops itself (SIGSTOP) right before the write: a
writer frozen between its checks and its write.  Inert otherwise.

The write is caught where it happens: :func:`pipeline.fenced.write_rows`, or (kgrad before fenced writes) zarr's
``Array.__setitem__`` on the output's own array, so the same test runs against both."""

import os

if os.environ.get("KGRAD_TEST_FREEZE_ARRAY"):
    import importlib.abc
    import sys

    def _freeze_once():
        try:
            fd = os.open(os.environ["KGRAD_TEST_FREEZE_MARKER"], os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return  # only the first writer
        os.close(fd)
        os.kill(os.getpid(), 19)  # SIGSTOP

    def _wrap(module):
        if module.__name__ == "pipeline.output":  # zarr's own writes into the output's arrays
            import zarr

            original_setitem = zarr.Array.__setitem__

            def setitem(self, key, value):
                if self.path == os.environ["KGRAD_TEST_FREEZE_ARRAY"] and "Memory" not in type(self.store).__name__:
                    _freeze_once()
                return original_setitem(self, key, value)

            zarr.Array.__setitem__ = setitem
            return
        original = module.write_rows

        def write_rows(location, storage_options, array, *args, **kwargs):
            if array == os.environ["KGRAD_TEST_FREEZE_ARRAY"]:
                _freeze_once()
            return original(location, storage_options, array, *args, **kwargs)

        module.write_rows = write_rows

    class _Finder(importlib.abc.MetaPathFinder):
        done: set = set()

        def find_spec(self, name, path, target=None):
            if name not in ("pipeline.fenced", "pipeline.output") or name in self.done:
                return None
            self.done.add(name)
            sys.meta_path.remove(self)
            import importlib.util

            spec = importlib.util.find_spec(name)
            loader = spec.loader
            exec_module = loader.exec_module

            def exec_and_wrap(module):
                exec_module(module)
                _wrap(module)

            loader.exec_module = exec_and_wrap
            sys.meta_path.insert(0, self)
            return spec

    sys.meta_path.insert(0, _Finder())
