"""The run options' one definition (pipeline/options.py) and what is derived from it: the flags, the
workflow file's checks, the README's table; and a command line that answers without JAX."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.options import KERNEL_NAMES, RunOptions, load_workflow, markdown_table, options_from_args

REPO = Path(__file__).resolve().parents[1]


def parse(*argv):
    from pipeline.cli import build_parser

    return options_from_args(build_parser().parse_args(["run", *argv]))


def test_readme_table_is_the_generated_one():
    readme = (REPO / "README.md").read_text()
    start = readme.index("<!-- options table: python -m pipeline.options -->\n") + len(
        "<!-- options table: python -m pipeline.options -->\n")
    end = readme.index("\n<!-- end of the options table -->")
    assert readme[start:end] == markdown_table(), "README's options table is stale: python -m pipeline.options"


def test_kernel_names_match_the_kernels():
    from pipeline.kernels import KERNELS

    assert tuple(KERNELS) == KERNEL_NAMES


def test_flags_override_the_file_and_only_flags_given(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[inputs]\npoints = "p.npy"\n[kernel]\nname = "imq"\nlengthscale = [1, 2]\n'
                    '[kernel.params]\nc = 2.0\n[run]\nout = "o.zarr"\nworkers = 3\nscheduler_timeout = 7\n')
    options = parse(str(path), "--lengthscale", "0.5", "--param", "beta=0.25", "--no-progress")
    assert options.kernel == "imq" and options.lengthscale == 0.5 and options.workers == 3
    assert options.params == {"c": 2.0, "beta": 0.25} and options.progress is False
    assert options.points == str(tmp_path / "p.npy") and options.scheduler_timeout == 7
    assert parse(str(path)).progress is True, "a flag not given must not override the file"
    assert parse("--points", "x.npy", "--lengthscale", "1", "2").lengthscale == [1.0, 2.0]
    tls = parse("--tls-ca-file", "ca.pem", "--tls-cert", "c.pem", "--tls-key", "k.pem").security
    assert tls == {"tls_ca_file": "ca.pem", "tls_client_cert": "c.pem", "tls_client_key": "k.pem"}


def test_replace_can_unset():
    options = RunOptions(points="p.npy", workers=4)
    assert options.replace(workers=None).workers is None


@pytest.mark.parametrize("text, words", [
    ("[run]\nworkers = 'two'\n", ("[run] workers", "a whole number")),
    ("[kernel.params]\nalpha = 'big'\n", ("params", "a table of numbers")),
    ("[run]\nspeed = 3\n", ("unknown key 'speed'", "scheduler_timeout")),
    ("[output]\nout = 'x'\n", ("unknown section [output]", "[inputs]")),
])
def test_workflow_file_errors_say_what_and_where(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        load_workflow(str(path))
    assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["run", "--bogus"], ["plan", "--workers", "x"]])
def test_help_and_usage_errors_do_not_import_jax(argv):
    code = ("import sys\nfrom pipeline.cli import main\ntry:\n    code = main(%r)\n"
            "except SystemExit as exc:\n    code = exc.code\n"
            "assert 'jax' not in sys.modules and 'distributed' not in sys.modules, sorted(sys.modules)\n"
            "sys.exit(code)" % (argv,))
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    print(f"{argv}: exit {result.returncode} in {seconds:.2f} s")
    assert "AssertionError" not in result.stderr, result.stderr[-2000:]
    assert result.returncode in (0, 2), result.stderr[-2000:]
