"""`kgrad plot` / pipeline.plot: pictures of output groups, and its refusals.

The outputs are written directly (no cluster): real attributes from ``workflow.prepare``, values from the
closed-form RBF sums, stored with ``OutputGroup.create`` / ``write_task`` / ``finish``.  One test
(slow) makes its output with ``run_workflow`` on a one-worker local cluster.
"""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from pipeline.output import OutputGroup  # noqa: E402
from pipeline.errors import InputError  # noqa: E402
from pipeline.plot import add_plot_command, plot_output  # noqa: E402
from pipeline.workflow import RunConfig, prepare  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LENGTHSCALE = 0.7


def rbf_sums(x: np.ndarray, lengthscale: float = LENGTHSCALE):
    """g_j = sum_i -(x_j - x_i) / l^2 k(x_j, x_i), v_j = sum_i k(x_j, x_i) (unit weights), float64."""
    d = x[:, None, :] - x[None, :, :]
    k = np.exp(-0.5 * (d ** 2).sum(-1) / lengthscale ** 2)
    return (-d / lengthscale ** 2 * k[..., None]).sum(axis=1), k.sum(axis=1)


def write_points(path, x):
    import zarr

    zarr.open_group(str(path), mode="w").create_array("points", data=x)
    return str(path)


def make_output(root, x, *, tasks_written=None):
    """A kgrad output for points ``x`` with the attributes a real run records; ``tasks_written`` < all
    leaves it incomplete."""
    points = write_points(root / "points.zarr", x)
    out = str(root / "out.zarr")
    prepared = prepare(RunConfig(points=points, out=out, lengthscale=LENGTHSCALE, workers=1,
                                 tile_rows=128, rows_per_task=128, progress=False))
    plan = prepared.plan
    OutputGroup(out).create(n_points=plan.n_points, dim=plan.dim, dtype=plan.dtype,
                        rows_per_task=plan.rows_per_task, n_tasks=plan.n_tasks, attributes=prepared.attributes)
    g, v = rbf_sums(x)
    for task in plan.tasks[:tasks_written]:
        OutputGroup(out).write_task(task.start, task.stop, task.index, g[task.start:task.stop].astype(np.float32),
                         v[task.start:task.stop].astype(np.float32))
    if tasks_written is None:
        OutputGroup(out).finish({"timings": {}})
    return out


def blobs(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0, 0.0, 0.0, 1.0], [3.0, 1.0, -1.0, 0.0], [-2.0, 2.5, 1.5, -1.0]])[:, :dim]
    return centers[rng.integers(0, 3, size=n)] + rng.normal(scale=0.6, size=(n, dim))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    made = {}
    for dim, n in ((1, 300), (2, 1500), (3, 1200), (4, 600)):
        root = tmp_path_factory.mktemp(f"out{dim}d")
        made[dim] = make_output(root, blobs(n, dim, seed=dim))
    return made


def assert_png(path, min_bytes: int = 10_000) -> tuple[int, int]:
    data = open(path, "rb").read()
    assert data[:8] == PNG_SIGNATURE, "not a PNG file"
    assert len(data) > min_bytes, f"only {len(data)} bytes: an empty picture?"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width >= 400 and height >= 300, (width, height)
    return width, height


@pytest.mark.parametrize("dim", [2, 3])
def test_png_written_and_nontrivial(outputs, tmp_path, dim):
    path = tmp_path / f"plot{dim}.png"
    assert plot_output(outputs[dim], str(path)) == str(path)
    width, height = assert_png(path)
    if dim != 2:
        assert width > height  # projection and histogram side by side


@pytest.mark.parametrize("dim", [1, 4])
def test_other_dimensions(outputs, tmp_path, dim):
    path = tmp_path / f"plot{dim}.png"
    plot_output(outputs[dim], path)
    assert_png(path)


def test_picture_has_colour(outputs, tmp_path):
    """Arrows coloured by v: many distinct colours, not a blank canvas."""
    import matplotlib.image

    path = tmp_path / "colour.png"
    plot_output(outputs[2], path, max_points=300)
    image = matplotlib.image.imread(str(path))[..., :3]
    colours = np.unique((image.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colours) > 200
    assert (image.mean(axis=2) < 0.9).mean() > 0.02  # a fair share of non-white pixels


def test_max_points_and_creates_directory(outputs, tmp_path):
    path = tmp_path / "sub" / "dir" / "few.png"
    plot_output(outputs[2], path, max_points=10)
    assert_png(path)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_max_points(outputs, tmp_path, bad):
    with pytest.raises(InputError, match="max_points"):
        plot_output(outputs[2], tmp_path / "x.png", max_points=bad)
    assert not (tmp_path / "x.png").exists()


def test_missing_output(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        plot_output(tmp_path / "nothing.zarr", tmp_path / "x.png")


def test_not_a_kgrad_output(tmp_path):
    points = write_points(tmp_path / "points.zarr", blobs(50, 2))
    with pytest.raises(InputError, match="not a kgrad output"):
        plot_output(points, tmp_path / "x.png")


def test_incomplete_output(tmp_path):
    out = make_output(tmp_path, blobs(300, 2), tasks_written=1)  # 3 tasks of 128 rows
    with pytest.raises(InputError, match=r"incomplete \(1/3 tasks written.*--resume"):
        plot_output(out, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_points_moved_then_given(tmp_path):
    out = make_output(tmp_path, blobs(120, 2))
    shutil.move(tmp_path / "points.zarr", tmp_path / "elsewhere.zarr")
    with pytest.raises(InputError, match="--points"):
        plot_output(out, tmp_path / "x.png")
    plot_output(out, tmp_path / "x.png", points=str(tmp_path / "elsewhere.zarr"))
    assert_png(tmp_path / "x.png")


def test_points_changed_since_the_run(tmp_path):
    import zarr

    out = make_output(tmp_path, blobs(120, 2))
    array = zarr.open_group(str(tmp_path / "points.zarr"), mode="r+")["points"]
    array[0] = array[0] + 1.0
    with pytest.raises(InputError, match="changed after the output was made"):
        plot_output(out, tmp_path / "x.png")


def test_points_of_another_shape(outputs, tmp_path):
    other = write_points(tmp_path / "other.zarr", blobs(1500, 3))
    with pytest.raises(InputError, match=r"shape \(1500, 3\).*D=2"):
        plot_output(outputs[2], tmp_path / "x.png", points=other)


def test_command(outputs, tmp_path, capsys):
    from pipeline.cli import _Parser

    parser = _Parser(prog="kgrad")
    add_plot_command(parser.add_subparsers(dest="command", parser_class=_Parser))
    path = tmp_path / "cli.png"
    args = parser.parse_args(["plot", outputs[3], "-o", str(path), "--max-points", "100"])
    assert args.func(args) == 0
    assert str(path) in capsys.readouterr().out
    assert_png(path)
    with pytest.raises(InputError):
        parser.parse_args(["plot", outputs[3]])  # -o is required


def test_kgrad_main_when_hooked(outputs, tmp_path, capsys):
    """Once pipeline/cli.py registers the command: exit 0 on success, 2 and one line on a bad output."""
    from pipeline import cli

    try:
        cli.build_parser().parse_args(["plot", "x.zarr", "-o", "x.png"])
    except InputError:
        pytest.skip("kgrad plot is not hooked into pipeline/cli.py yet")
    path = tmp_path / "main.png"
    assert cli.main(["plot", outputs[2], "-o", str(path)]) == 0
    assert_png(path)
    capsys.readouterr()
    assert cli.main(["plot", str(tmp_path / "nothing.zarr"), "-o", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


@pytest.mark.slow
def test_output_of_a_real_run(tmp_path):
    """End to end: run_workflow on a one-worker local cluster, then the picture."""
    from pipeline.workflow import run_workflow

    x = blobs(400, 2)
    points = write_points(tmp_path / "points.zarr", x)
    out = str(tmp_path / "run.zarr")
    run_workflow(RunConfig(points=points, out=out, lengthscale=LENGTHSCALE, workers=1, progress=False))
    path = tmp_path / "run.png"
    plot_output(out, path)
    assert_png(path)


def test_large_output_reads_only_sampled_rows(outputs, tmp_path, monkeypatch):
    """Above CHECK_FINGERPRINT_ROWS the points are not reloaded whole: only the sampled rows are read."""
    import pipeline.plot as plot

    monkeypatch.setattr(plot, "CHECK_FINGERPRINT_ROWS", 100)
    data = plot.read_plot_data(outputs[3], sample=500)
    assert data["x"].shape == (500, 3) and data["g"].shape == (500, 3) and data["v"].shape == (500,)
    every = plot.read_plot_data(outputs[3], sample=10**6)  # all rows: points and values stay aligned
    np.testing.assert_allclose(every["v"], rbf_sums(every["x"])[1], rtol=1e-4)
    path = tmp_path / "large.png"
    plot_output(outputs[3], path, max_points=50)
    assert_png(path)


def test_npy_points(tmp_path):
    x = blobs(200, 2)
    np.save(tmp_path / "points.npy", x)
    out = str(tmp_path / "out.zarr")
    prepared = prepare(RunConfig(points=str(tmp_path / "points.npy"), out=out, lengthscale=LENGTHSCALE,
                                 workers=1, progress=False))
    plan = prepared.plan
    OutputGroup(out).create(n_points=plan.n_points, dim=plan.dim, dtype=plan.dtype,
                        rows_per_task=plan.rows_per_task, n_tasks=plan.n_tasks, attributes=prepared.attributes)
    g, v = rbf_sums(x)
    OutputGroup(out).write_task(0, len(x), 0, g.astype(np.float32), v.astype(np.float32))
    OutputGroup(out).finish({})
    plot_output(out, tmp_path / "npy.png")
    assert_png(tmp_path / "npy.png")


def _legend_overlaps_bars(g: np.ndarray) -> list:
    """Draw the |g| histogram alone and return the bars whose drawn box the legend's box overlaps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pipeline.plot import _histogram

    fig = Figure(figsize=(7, 5))
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    _histogram(ax, g)
    canvas.draw()
    renderer = canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    return [bar for bar in ax.patches if bar.get_height() > 0 and bar.get_window_extent(renderer).overlaps(legend)]


@pytest.mark.parametrize("layout", ["tallest_at_the_right", "flat", "log_axis_with_outliers"])
def test_histogram_legend_covers_no_bar(layout):
    """The demo's |g| piles up at its largest values (the tallest bar at the right, where the legend used to
    sit); a flat histogram fills every corner; a log axis adds the note on outliers to the legend."""
    rng = np.random.default_rng(0)
    if layout == "tallest_at_the_right":
        norms = 0.07 * np.sqrt(rng.uniform(size=50_000)) ** 0.3
    elif layout == "flat":
        norms = rng.uniform(0.0, 1.0, size=50_000)
    else:
        norms = np.concatenate([10 ** rng.uniform(-4, 1, size=20_000), np.full(50, 1e-9)])
    g = norms[:, None] * np.array([[0.6, 0.8, 0.0]])
    assert _legend_overlaps_bars(g) == []
