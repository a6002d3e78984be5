"""The README's code, run as written: the snippets a user may copy are extracted from README.md (so a test
fails when the README drifts) and checked against the float64 numpy oracle (tests/reference.py) and, for the
SVGD line, against SVGD's own definition computed pair by pair."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

from reference import FLOAT32_BOUND, reference_gradients, relative_error

pytest_plugins = ["cluster_fixtures"]  # dask_cli_cluster (the xarray run)

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def code_blocks(language: str) -> list[str]:
    """The README's fenced code blocks of ``language`` (```python ... ```), in order."""
    text = README.read_text()
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def block_with(language: str, marker: str) -> str:
    """The one README block of ``language`` that contains ``marker``."""
    found = [block for block in code_blocks(language) if marker in block]
    assert len(found) == 1, f"expected one ```{language} block with {marker!r} in README.md, found {len(found)}"
    return found[0]


def svgd_repulsive_by_definition(x: np.ndarray, rows: np.ndarray, **kernel) -> np.ndarray:
    """SVGD's repulsive term (1/n) sum_j grad_{x_j} k(x_j, x_i) at particles ``x[rows]``, from its definition:
    the gradient in the FIRST argument, evaluated at every x_j with x_i as the second argument, summed over j
    (no symmetry of k is used)."""
    n = len(x)
    return np.stack([reference_gradients(x, x[i:i + 1], **kernel)[0].sum(axis=0) / n for i in rows])


def test_in_process_snippet_runs_and_matches_the_oracle():
    """The README's in-process block, executed as written: g and v match the oracle, g is float32 as its
    comment says, and phi_repulsive is SVGD's repulsive term (a sign error fails this by a factor of 2)."""
    pytest.importorskip("jax")
    code = block_with("python", "from pipeline import kernel_gradients")
    scope: dict = {}
    exec(compile(code, "README.md (in-process block)", "exec"), scope)
    x, g, v = scope["x"], scope["g"], scope["v"]
    kernel = dict(kernel="matern52", lengthscale=[0.5, 1.0, 2.0])
    assert "kernel=\"matern52\", lengthscale=[0.5, 1.0, 2.0]" in code, "the test's kernel must be the README's"
    rows = np.arange(0, len(x), len(x) // 40)
    g_ref, v_ref = reference_gradients(x[rows], x, **kernel)
    assert g.dtype == np.float32 and "float32" in code
    assert relative_error(g[rows], g_ref) < FLOAT32_BOUND
    assert relative_error(v[rows], v_ref) < FLOAT32_BOUND
    assert relative_error(scope["g64"][rows], g_ref) < 1e-10
    phi = svgd_repulsive_by_definition(x, rows, **kernel)
    assert relative_error(scope["phi_repulsive"][rows], phi) < FLOAT32_BOUND, "README's SVGD line has the wrong sign?"


@pytest.mark.slow  # a run on the dask CLI cluster (started for it alone in its test process)
def test_xarray_snippet_reads_a_run_as_the_readme_says(tmp_path, monkeypatch, dask_cli_cluster):
    """The README's xarray block, executed as written against a small ``kgrad run`` output at the path it
    names (out/demo.zarr, from the current directory): gradient, value and the score g / v match the oracle. (The
    run uses the session's dask CLI cluster: it needs no cluster of its own.)"""
    pytest.importorskip("xarray")
    import subprocess
    import sys

    rng = np.random.default_rng(3)
    points = rng.normal(size=(600, 3))
    weights = np.full(len(points), 1.0 / len(points))
    np.save(tmp_path / "p.npy", points)
    np.save(tmp_path / "w.npy", weights)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "--points", "p.npy", "--weights", "w.npy",
                           "--lengthscale", "0.5", "--out", "out/demo.zarr", "--scheduler", str(dask_cli_cluster.scheduler_file),
                           "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    monkeypatch.chdir(tmp_path)
    code = block_with("python", "xr.open_zarr")
    scope: dict = {}
    exec(compile(code, "README.md (xarray block)", "exec"), scope)
    ds, score = scope["ds"], scope["score"]
    g_ref, v_ref = reference_gradients(points, weights=weights, kernel="rbf", lengthscale=0.5)
    assert ds.gradient.dims == ("point", "dim") and ds.value.dims == ("point",)
    assert relative_error(ds.gradient.values, g_ref) < FLOAT32_BOUND
    assert relative_error(ds.value.values, v_ref) < FLOAT32_BOUND
    assert relative_error(score.values, g_ref / v_ref[:, None]) < 1e-4  # a ratio: both errors add
    assert (ds.attrs["kernel"], ds.attrs["lengthscale"], ds.attrs["complete"]) == ("rbf", [0.5, 0.5, 0.5], True)


# ----------------------------------------------------------------------------------------- the worked example

EXAMPLE_MARKER = "$ .venv/bin/kgrad plan workflows/demo.toml"
README_ROOT = "/home/you/kgrad"  # where the README's worked example says the clone is
NUMBER = r"\d+(?:\.\d+)?"


def worked_example() -> list[tuple[str, list[str]]]:
    """The README's worked example: (command, the output lines shown under it) for each '$ ' line."""
    steps: list[tuple[str, list[str]]] = []
    for line in block_with("console", EXAMPLE_MARKER).splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif line.strip():
            steps[-1][1].append(line)
    return steps


def _normalise(text: str, root: pathlib.Path) -> list[str]:
    """Real output as the README shows it: the clone's path as README_ROOT, no dashboard link (the README's
    install has no bokeh), and of the progress lines only the last (what a terminal keeps)."""
    lines = [re.sub(r"; dashboard \S+", "", line.replace(str(root), README_ROOT)) for line in text.splitlines()]
    progress = [i for i, line in enumerate(lines) if re.match(r"kgrad: \d+/\d+ tasks? \(", line)]
    return [line for i, line in enumerate(lines) if i not in progress[:-1]]


def run_worked_example(root: pathlib.Path) -> list[tuple[str, list[str]]]:
    """Run the worked example in ``root`` (a copy of workflows/demo.toml there): the demo data and command 1
    first, as the README says, then each command of the example; (command, output lines) for each."""
    import shutil
    import subprocess
    import sys

    (root / "workflows").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "workflows" / "demo.toml", root / "workflows" / "demo.toml")

    def run(command: str) -> list[str]:
        words = command.split("#")[0].split()
        argv = ([sys.executable, "-m", "pipeline", *words[1:]] if words[0] == ".venv/bin/kgrad" else
                [sys.executable, *words[1:]])
        proc = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command} exited {proc.returncode}:\n{proc.stderr}"
        return _normalise(proc.stdout + proc.stderr, root)

    run(f".venv/bin/python {ROOT / 'workflows' / 'make_demo_data.py'} demo-data/blobs.zarr")
    run(".venv/bin/kgrad run workflows/demo.toml --overwrite")
    return [(command, [] if "pip install" in command else run(command)) for command, _ in worked_example()]


def _pattern(line: str) -> str:
    """A README output line as a regex: numbers (sizes, times, rates, worker counts: machine-dependent) and
    12-digit fingerprints match any value; everything else must be as shown."""
    parts = re.split(rf"(\b[0-9a-f]{{12}}\b|{NUMBER})", line)
    return "".join(r"[0-9a-f]{12}" if re.fullmatch(r"[0-9a-f]{12}", p) and not p.isdigit() else
                   NUMBER if re.fullmatch(NUMBER, p) else re.escape(p) for p in parts)


@pytest.mark.slow  # about 15 s of runs: CI runs it (--runslow)
@pytest.mark.timeout(900)
def test_worked_example_shows_what_the_commands_print(tmp_path):
    """Every command of the README's worked example is run (kgrad plan, run, inspect, plot, on the demo data),
    and its output must be the README's, line for line, numbers and fingerprints matched loosely.  To
    regenerate the README's example: python tests/test_readme.py --regenerate."""
    pytest.importorskip("matplotlib")
    shown = worked_example()
    assert shown and shown[0][0] == EXAMPLE_MARKER[2:], shown
    for (command, expected), (_, real) in zip(shown, run_worked_example(tmp_path)):
        assert len(real) == len(expected), f"$ {command}\nREADME:\n" + "\n".join(expected) + "\nreal:\n" + "\n".join(real)
        for want, got in zip(expected, real):
            assert re.fullmatch(_pattern(want), got), f"$ {command}\nREADME: {want}\nreal:   {got}"


def regenerate_readme() -> None:
    """Rewrite the worked example's output in README.md with what its commands print now."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        steps = run_worked_example(pathlib.Path(tmp))
    block = "".join("\n".join([f"$ {command}", *lines]) + ("\n\n" if lines else "\n") for command, lines in steps)
    block = block.rstrip("\n") + "\n"
    text = README.read_text()
    old = block_with("console", EXAMPLE_MARKER)
    README.write_text(text.replace(old, block))


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--regenerate"]:
        regenerate_readme()
