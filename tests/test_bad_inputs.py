"""A catalogue of bad inputs, through the real ``kgrad`` command and through ``pipeline.kernel_gradients``.

The contract (README, "The kgrad command"): a bad input or usage exits with code 2 and prints exactly one line on
stderr that says what is wrong (the value, and what is allowed), with no traceback; nothing is written,
and an existing output is left byte for byte as it was.  The Python API raises ``pipeline.InputError``
with the same kind of message.

Every CLI case runs ``kgrad run ...`` (or ``plan``, ``inspect``) in its own empty directory, with inputs
from a shared data directory; every file of both directories is hashed before and after.  One case of each
kind (SUBPROCESS_CASES: the data, a kernel parameter, argparse, each way a store breaks, a workflow file, each
command, an existing output) runs the real command line, ``python -m pipeline ...``, as a subprocess (about a
second of imports each; ``KGRAD_TEST_JOBS``, default 2, at a time); the others call the same code,
``pipeline.cli.main(ARGS)``, in the test process (one after another, from their directory), where a Python
warning counts as a line on stderr as it would in the subprocess.  ``KGRAD_TEST_ALL_SUBPROCESS=1`` runs every
case as a subprocess.  The cases that need an existing output copy one made once per module by a real
``kgrad run --workers 1``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import zarr

import pipeline
from pipeline import InputError
from fileutil import tree_digest

N, M, D = 50, 40, 3
_rng = np.random.default_rng(20240611)
POINTS = _rng.normal(size=(N, D))
SOURCES = _rng.normal(size=(M, D))
WEIGHTS = _rng.uniform(0.5, 1.5, size=N)  # one per point (the default sources are the points)


def _with(array, index, value):
    out = np.array(array, dtype=float)
    out[index] = value
    return out


# In-memory versions of the bad arrays: the CLI cases read them from .npy/zarr files, the API cases
# pass them directly.
ARRAYS = {
    "points": POINTS,
    "other_points": POINTS + 0.25,
    "sources": SOURCES,
    "weights": WEIGHTS,
    # NaN at rows 7 and 30: the message must name the first one.
    "points_nan": _with(_with(POINTS, (7, 1), np.nan), (30, 0), np.nan),
    "sources_inf": _with(SOURCES, (5, 0), np.inf),
    "weights_inf": _with(WEIGHTS, 3, -np.inf),
    "sources_2d": SOURCES[:, :2].copy(),
    "points_3d": _rng.normal(size=(5, 4, 3)),
    "points_empty": np.zeros((0, D)),
    "weights_49": np.ones(N - 1),
    "points_str": np.array([["a", "b", "c"]] * N),
    "points_bool": np.ones((N, D), dtype=bool),
}
KERNEL_NAMES = tuple(pipeline.KERNELS)
# CLI cases run this many at a time (a subprocess is ~1 s of imports, nearly all CPU).
JOBS = int(os.environ.get("KGRAD_TEST_JOBS", "2"))


# ----------------------------------------------------------------------------------------- helpers


def kgrad(args, cwd, timeout=240):
    """Run the real command line in a subprocess."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(proc, words=(), patterns=()):
    """Exit 2, exactly one line on stderr naming the problem, no traceback."""
    err = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}, stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.strip(), "the error line is empty"
    for word in words:
        assert word in line, f"{word!r} not in the error line: {line}"
    for pattern in patterns:
        assert re.search(pattern, line), f"/{pattern}/ does not match the error line: {line}"
    return line


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The inputs, good and bad, as .npy files and zarr stores (never written by the tests)."""
    root = tmp_path_factory.mktemp("bad_inputs_data")
    for name, array in ARRAYS.items():
        np.save(root / f"{name}.npy", array)
    # a directory whose zarr.json is garbage
    (root / "corrupt.zarr").mkdir()
    (root / "corrupt.zarr" / "zarr.json").write_text("{this is not json")
    # a .npy file cut in half
    raw = (root / "points.npy").read_bytes()
    (root / "points_trunc.npy").write_bytes(raw[: len(raw) // 2])
    # a zarr array chunked (7, 3) with NaN at rows 23 and 40
    nan_store = zarr.create_array(str(root / "points_nan.zarr"), shape=(N, D), chunks=(7, 3), dtype="f8")
    nan_store[:] = _with(_with(POINTS, (23, 2), np.nan), (40, 0), np.nan)
    # a zarr array with one chunk overwritten with garbage
    bad_chunk = zarr.create_array(str(root / "bad_chunk.zarr"), shape=(N, D), chunks=(1, D), dtype="f8")
    bad_chunk[:] = POINTS
    with open(root / "bad_chunk.zarr" / "c" / "0" / "0", "wb") as f:
        f.write(b"garbage, not a compressed chunk")
    # a zarr group without an array called 'points'
    group = zarr.open_group(str(root / "no_points.zarr"), mode="w")
    group.create_array("coords", data=POINTS)
    # a zarr group with points and weights (an input that a careless --out could destroy)
    group = zarr.open_group(str(root / "group.zarr"), mode="w")
    group.create_array("points", data=POINTS)
    group.create_array("weights", data=WEIGHTS)
    return root


@pytest.fixture(scope="module")
def existing_output(data_dir, tmp_path_factory):
    """One complete output made by a real run (the only cluster this module starts)."""
    root = tmp_path_factory.mktemp("bad_inputs_existing")
    proc = kgrad(["run", "--points", str(data_dir / "points.npy"), "--lengthscale", "1.5",
                  "--out", "done.zarr", "--workers", "1", "--no-progress"], cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root / "done.zarr"


# ----------------------------------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Case:
    id: str
    cli: tuple | None = None  # arguments after the command ('{d}' is the data directory)
    command: str | None = "run"  # run, plan, inspect, or None for none at all
    api: Callable[[], dict] | None = None  # kwargs for kernel_gradients
    words: tuple = ()  # substrings the one error line must hold (CLI and API)
    patterns: tuple = ()  # regular expressions it must match
    toml: str | None = None  # a workflow file written to cwd/wf.toml ('{d}' as above)
    existing: bool = False  # start from a copy of a complete output at out.zarr
    copy_group: bool = False  # copy data_dir/group.zarr to cwd/group.zarr first
    add_out: bool = True  # append --out out.zarr --workers 1
    cli_xfail: str | None = None
    cli_xfail_strict: bool = True
    api_xfail: str | None = None
    extra_api_words: tuple = field(default=())


P = ("--points", "{d}/points.npy")
A = ARRAYS

CASES = [
    # --- the data
    Case("nan-in-points", cli=("--points", "{d}/points_nan.npy"), api=lambda: dict(points=A["points_nan"]),
         words=("points", "nan"), patterns=(r"\brow 7\b",)),
    Case("nan-in-chunked-zarr-points", cli=("--points", "{d}/points_nan.zarr"),
         words=("points", "points_nan.zarr", "nan"), patterns=(r"\brow 23\b",)),
    Case("inf-in-sources", cli=P + ("--sources", "{d}/sources_inf.npy"),
         api=lambda: dict(points=A["points"], sources=A["sources_inf"]),
         words=("sources", "inf"), patterns=(r"\brow 5\b",)),
    Case("inf-in-weights", cli=P + ("--weights", "{d}/weights_inf.npy"),
         api=lambda: dict(points=A["points"], weights=A["weights_inf"]),
         words=("weights", "-inf"), patterns=(r"\brow 3\b",)),
    Case("dimension-mismatch", cli=P + ("--sources", "{d}/sources_2d.npy"),
         api=lambda: dict(points=A["points"], sources=A["sources_2d"]), words=("D=3", "D=2")),
    Case("3d-array", cli=("--points", "{d}/points_3d.npy"), api=lambda: dict(points=A["points_3d"]),
         words=("points", "(5, 4, 3)")),
    Case("empty-array", cli=("--points", "{d}/points_empty.npy"), api=lambda: dict(points=A["points_empty"]),
         words=("points", "empty", "(0, 3)")),
    Case("weights-wrong-length", cli=P + ("--weights", "{d}/weights_49.npy"),
         api=lambda: dict(points=A["points"], weights=A["weights_49"]), words=("weights", "49", "50")),
    Case("strings-dtype", cli=("--points", "{d}/points_str.npy"), api=lambda: dict(points=A["points_str"]),
         words=("points", "dtype", "<U1")),
    Case("bool-dtype", cli=("--points", "{d}/points_bool.npy"), api=lambda: dict(points=A["points_bool"]),
         words=("points", "dtype", "bool")),
    # --- the kernel and its parameters
    Case("lengthscale-count", cli=P + ("--lengthscale", "1", "2"),
         api=lambda: dict(points=A["points"], lengthscale=[1.0, 2.0]), words=("lengthscale", "2 values", "D=3")),
    Case("lengthscale-negative", cli=P + ("--lengthscale", "-1"),
         api=lambda: dict(points=A["points"], lengthscale=-1.0), words=("lengthscale=-1", "> 0")),
    Case("lengthscale-zero", cli=P + ("--lengthscale", "0"),
         api=lambda: dict(points=A["points"], lengthscale=0.0), words=("lengthscale=0", "> 0")),
    Case("lengthscale-not-a-number",
         api=lambda: dict(points=A["points"], lengthscale="abc"), words=("lengthscale", "abc")),
    Case("variance-negative",
         api=lambda: dict(points=A["points"], variance=-1.0), words=("variance=-1", "> 0")),
    Case("rq-alpha-zero", cli=P + ("--kernel", "rational_quadratic", "--param", "alpha=0"),
         api=lambda: dict(points=A["points"], kernel="rational_quadratic", alpha=0), words=("alpha=0", "> 0")),
    Case("imq-c-negative", cli=P + ("--kernel", "imq", "--param", "c=-1"),
         api=lambda: dict(points=A["points"], kernel="imq", c=-1), words=("imq", "c=-1", "> 0")),
    Case("polynomial-degree-zero", cli=P + ("--kernel", "polynomial", "--param", "degree=0"),
         api=lambda: dict(points=A["points"], kernel="polynomial", degree=0), words=("degree=0", "integer", ">= 1")),
    Case("polynomial-degree-fraction", cli=P + ("--kernel", "polynomial", "--param", "degree=1.5"),
         api=lambda: dict(points=A["points"], kernel="polynomial", degree=1.5), words=("degree=1.5", "integer")),
    Case("periodic-period-negative", cli=P + ("--kernel", "periodic", "--param", "period=-1"),
         api=lambda: dict(points=A["points"], kernel="periodic", period=-1), words=("period=-1", "> 0")),
    Case("unknown-parameter", cli=P + ("--kernel", "matern32", "--param", "foo=1"),
         api=lambda: dict(points=A["points"], kernel="matern32", foo=1), words=("matern32", "foo")),
    Case("unknown-kernel", cli=P + ("--kernel", "nope"), api=lambda: dict(points=A["points"], kernel="nope"),
         words=("nope",) + KERNEL_NAMES),
    Case("dtype-float16", cli=P + ("--dtype", "float16"), api=lambda: dict(points=A["points"], dtype="float16"),
         words=("float16", "float32", "float64")),
    Case("unknown-mode", cli=P + ("--mode", "hessian"), api=lambda: dict(points=A["points"], mode="hessian"),
         words=("hessian", "auto", "jacfwd", "jacrev")),
    # --- the command line itself
    Case("param-without-equals", cli=P + ("--param", "alpha"), words=("--param", "'alpha'", "NAME=VALUE")),
    Case("param-not-a-number", cli=P + ("--kernel", "rational_quadratic", "--param", "alpha=x"),
         words=("alpha=x", "not a number")),
    Case("unknown-flag", cli=P + ("--bogus",), words=("--bogus",)),
    Case("workers-zero", cli=P + ("--workers", "0", "--out", "out.zarr"), words=("workers=0", ">= 1"),
         add_out=False),
    Case("no-out", cli=P, words=("--out",), add_out=False),
    # --- stores
    Case("missing-store", cli=("--points", "{d}/missing.zarr"), words=("points", "missing.zarr", "does not exist")),
    Case("corrupt-zarr-json", cli=("--points", "{d}/corrupt.zarr"), words=("points", "corrupt.zarr"),
         patterns=(r"could not be read|corrupt",)),
    Case("truncated-npy", cli=("--points", "{d}/points_trunc.npy"), words=("points", "points_trunc.npy"),
         patterns=(r"could not be read|truncated|corrupt",)),
    Case("group-without-points", cli=("--points", "{d}/no_points.zarr"),
         words=("points", "no_points.zarr", "coords")),
    Case("corrupt-chunk", cli=("--points", "{d}/bad_chunk.zarr"), words=("points", "bad_chunk.zarr"),
         patterns=(r"could not be read|corrupt",)),
    # --- workflow files
    Case("workflow-unknown-key", cli=(), toml='[inputs]\npoints = "{d}/points.npy"\nbogus = 1\n',
         words=("wf.toml", "bogus", "[inputs]")),
    Case("workflow-unknown-section", cli=(), toml='[inputs]\npoints = "{d}/points.npy"\n[extra]\na = 1\n',
         words=("wf.toml", "[extra]", "[inputs]", "[kernel]", "[run]")),
    Case("workflow-invalid-toml", cli=(), toml='[inputs\npoints = "{d}/points.npy"\n', words=("wf.toml", "TOML")),
    Case("workflow-missing-file", cli=("nothere.toml",), words=("nothere.toml", "does not exist")),
    Case("workflow-params-not-a-table", cli=(), toml='[inputs]\npoints = "{d}/points.npy"\n[kernel]\nparams = 3\n',
         words=("params",)),
    Case("workflow-points-not-a-string", cli=(), toml="[inputs]\npoints = 5\n", words=("points", "5")),
    Case("workflow-tile-rows-not-a-number", cli=(),
         toml='[inputs]\npoints = "{d}/points.npy"\n[run]\ntile_rows = "a"\n', words=("tile", "'a'")),
    # --- the other commands
    Case("no-command", cli=(), command=None, add_out=False, words=("run", "plan", "inspect")),
    Case("inspect-missing", cli=("nothere.zarr",), command="inspect", add_out=False,
         words=("nothere.zarr", "does not exist")),
    Case("inspect-not-an-output", cli=("{d}/points.npy",), command="inspect", add_out=False,
         words=("points.npy", "not a kgrad output")),
    Case("plan-nan-in-points", cli=("--points", "{d}/points_nan.npy", "--out", "out.zarr"), command="plan",
         add_out=False, words=("points", "nan"), patterns=(r"\brow 7\b",)),
    # --- an existing output
    Case("existing-output", cli=P + ("--lengthscale", "1.5"), existing=True,
         words=("out.zarr", "already exists", "--overwrite", "--resume")),
    Case("resume-other-lengthscale", cli=P + ("--lengthscale", "2", "--resume"), existing=True,
         words=("cannot resume", "out.zarr", "lengthscale")),
    Case("resume-other-points", cli=("--points", "{d}/other_points.npy", "--lengthscale", "1.5", "--resume"),
         existing=True, words=("cannot resume", "points")),
    Case("resume-and-overwrite", cli=P + ("--lengthscale", "1.5", "--resume", "--overwrite"), existing=True,
         words=("--resume", "--overwrite")),
    Case("overwrite-with-bad-input", cli=("--points", "{d}/points_nan.npy", "--overwrite"), existing=True,
         words=("points", "nan"), patterns=(r"\brow 7\b",)),
    Case("out-is-the-input-group", cli=("--points", "group.zarr", "--out", "group.zarr", "--overwrite"),
         copy_group=True, add_out=False, words=("group.zarr",)),
]

CLI_CASES = [c for c in CASES if c.cli is not None]
API_CASES = [c for c in CASES if c.api is not None]


def _param(case, xfail, strict=True):
    marks = [pytest.mark.xfail(reason=xfail, strict=strict)] if xfail else []
    return pytest.param(case, id=case.id, marks=marks)


def _fill(text: str, data_dir) -> str:
    return text.replace("{d}", str(data_dir))


# One case of each kind runs as a real subprocess (the console script's exit path: exit status, nothing more on
# stderr at interpreter exit); the rest in process (see the module's docstring).
SUBPROCESS_CASES = {
    "nan-in-points", "lengthscale-negative", "unknown-flag", "truncated-npy", "corrupt-chunk",
    "workflow-invalid-toml", "no-command", "inspect-not-an-output", "plan-nan-in-points", "existing-output",
    "resume-other-points",
}
ALL_SUBPROCESS = bool(os.environ.get("KGRAD_TEST_ALL_SUBPROCESS"))


def kgrad_in_process(args, cwd) -> subprocess.CompletedProcess:
    """``pipeline.cli.main(ARGS)`` run from ``cwd`` in this process: its exit status, stdout and stderr (Python
    warnings raised meanwhile are appended to stderr, one line each, as an interpreter would print them)."""
    import contextlib
    import io
    import warnings

    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    os.chdir(cwd)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            warnings.simplefilter("always")
            code = main(list(args))
    finally:
        os.chdir(before)
    stderr = err.getvalue() + "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n"
                                      for w in caught)
    return subprocess.CompletedProcess(["kgrad", *args], code, out.getvalue(), stderr)


@dataclass
class CliResult:
    proc: subprocess.CompletedProcess
    cwd_before: dict
    cwd_after: dict
    data_changed: bool


def _run_case(case: Case, data_dir, cwd, existing, in_process=False) -> CliResult:
    args = [case.command] if case.command else []
    if case.toml is not None:
        (cwd / "wf.toml").write_text(_fill(case.toml, data_dir))
        args.append("wf.toml")
    args += [_fill(a, data_dir) for a in case.cli]
    if case.add_out:
        args += ["--out", "out.zarr", "--workers", "1"]
    if case.existing:
        shutil.copytree(existing, cwd / "out.zarr")
    if case.copy_group:
        shutil.copytree(data_dir / "group.zarr", cwd / "group.zarr")
    before_cwd, before_data = tree_digest(cwd), tree_digest(data_dir)
    proc = kgrad_in_process(args, cwd) if in_process else kgrad(args, cwd=cwd)
    return CliResult(proc, before_cwd, tree_digest(cwd), tree_digest(data_dir) != before_data)


@pytest.fixture(scope="module")
def cli_results(request, data_dir, tmp_path_factory) -> dict:
    """Run every selected CLI case, JOBS at a time (each costs ~1 s of imports), each in its own directory."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if getattr(item, "originalname", None) == "test_cli_rejects" and hasattr(item, "callspec")
                and item.get_closest_marker("skip") is None}  # not sampled out
    cases = [c for c in CLI_CASES if c.id in selected]
    existing = request.getfixturevalue("existing_output") if any(c.existing for c in cases) else None
    dirs = {c.id: tmp_path_factory.mktemp(c.id) for c in cases}
    separate = [c for c in cases if ALL_SUBPROCESS or c.id in SUBPROCESS_CASES]
    with ThreadPoolExecutor(max_workers=JOBS) as pool:
        futures = {c.id: pool.submit(_run_case, c, data_dir, dirs[c.id], existing) for c in separate}
        results = {c.id: _run_case(c, data_dir, dirs[c.id], existing, in_process=True)  # meanwhile, here
                   for c in cases if c not in separate}
        results.update({name: future.result() for name, future in futures.items()})
    return results


@pytest.mark.sampled(2, cover=())  # half the catalogue by default (each is a process); --runslow: all
@pytest.mark.parametrize("case", [_param(c, c.cli_xfail, c.cli_xfail_strict) for c in CLI_CASES])
def test_cli_rejects(case, cli_results):
    result = cli_results[case.id]
    proc = result.proc
    assert not result.data_changed, f"an input was changed; exit {proc.returncode}, stderr: {proc.stderr[-2000:]}"
    changed = sorted(set(result.cwd_after.items()) ^ set(result.cwd_before.items()))
    assert not changed, (f"files were written or changed: {changed[:10]}; exit {proc.returncode}, "
                         f"stderr: {proc.stderr[-2000:]}")
    assert_one_line_error(proc, case.words, case.patterns)


# ----------------------------------------------------------------------------------------- the Python API


@pytest.mark.parametrize("case", [_param(c, c.api_xfail) for c in API_CASES])
def test_api_rejects(case):
    kwargs = case.api()
    points = kwargs.pop("points")
    with pytest.raises(InputError) as info:
        pipeline.kernel_gradients(points, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    for word in case.words + case.extra_api_words:
        assert word in message, f"{word!r} not in: {message}"
    for pattern in case.patterns:
        assert re.search(pattern, message), f"/{pattern}/ does not match: {message}"


@pytest.mark.parametrize("kwargs, words", [
    (dict(weights=np.ones((N, 2))), ("weights", "(50, 2)")),
    (dict(weights=np.array([True] * N)), ("weights", "bool")),
    (dict(variance=float("nan")), ("variance",)),
    (dict(kernel="polynomial", c=-0.1), ("c=-0.1", ">= 0")),
    (dict(kernel="imq", beta=0), ("beta=0", "> 0")),
    (dict(kernel="rbf", lengthscale=[1.0, float("inf"), 1.0]), ("lengthscale=inf",)),
    (dict(kernel="no_such_module_xyz:k"), ("no_such_module_xyz:k",)),
], ids=["weights-2-columns", "weights-bool", "variance-nan", "polynomial-c-negative", "imq-beta-zero",
        "lengthscale-inf", "user-kernel-not-importable"])
def test_api_rejects_more(kwargs, words):
    with pytest.raises(InputError) as info:
        pipeline.kernel_gradients(POINTS, **kwargs)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_api_ragged_list():
    with pytest.raises(InputError, match="points"):
        pipeline.kernel_gradients([[0.0, 1.0], [2.0]])


def test_api_float32_overflow_is_rejected_or_finite():
    """Finite input must never come out as NaN: either refuse it (naming the row) or compute it."""
    points = POINTS.copy()
    points[0] = 1e39  # finite in float64, inf in float32
    try:
        g, v = pipeline.kernel_gradients(points, dtype="float32", return_value=True)
    except InputError as exc:
        assert "row 0" in str(exc) and "float32" in str(exc), str(exc)
    else:
        assert np.isfinite(g).all() and np.isfinite(v).all(), g[:3]
