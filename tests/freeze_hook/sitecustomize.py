"""Test hook (tests/test_stale_writer.py): with KGRAD_TEST_FREEZE_ARRAY set, the first process that writes rows of
that array through :func:`pipeline.fenced.write_rows` leaves a marker file (KGRAD_TEST_FREEZE_MARKER) and stops
itself (SIGSTOP) right before the write: a writer frozen between its checks and its write.  Inert otherwise."""

import os

if os.environ.get("KGRAD_TEST_FREEZE_ARRAY"):
    import importlib.abc
    import sys

    def _wrap(module):
        original = module.write_rows

        def write_rows(location, storage_options, array, *args, **kwargs):
            marker = os.environ["KGRAD_TEST_FREEZE_MARKER"]
            if array == os.environ["KGRAD_TEST_FREEZE_ARRAY"]:
                try:
                    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)  # only the first writer
                except FileExistsError:
                    pass
                else:
                    os.close(fd)
                    os.kill(os.getpid(), 19)  # SIGSTOP
            return original(location, storage_options, array, *args, **kwargs)

        module.write_rows = write_rows

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "pipeline.fenced":
                return None
            sys.meta_path.remove(self)
            import importlib.util

            spec = importlib.util.find_spec(name)
            loader = spec.loader
            exec_module = loader.exec_module

            def exec_and_wrap(module):
                exec_module(module)
                _wrap(module)

            loader.exec_module = exec_and_wrap
            return spec

    sys.meta_path.insert(0, _Finder())
