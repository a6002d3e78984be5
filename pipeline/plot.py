"""``kgrad plot``: a picture of an output group (matplotlib, Agg; the optional extra ``plot``).

* D = 2: the gradient field g as arrows at (a sample of) the points, coloured by the kernel sum v,
  over all sampled points, with a colorbar; the title names the kernel.
* D >= 3: left, the points projected on their first two principal components, coloured by v, with the
  gradients projected the same way as arrows; right, a histogram of the gradient magnitudes |g| (all D
  components; a log axis when they span more than three decades).
* D = 1: left, v and g against x; right, the histogram of |g|.

Large outputs are sampled: at most ``SCATTER_POINTS`` rows are read for the dots, the projection and the
histogram, and ``max_points`` of them get arrows.

The points are reloaded from where the output says they came from (attribute ``inputs.points``); pass
``points=`` (``--points``) if they have moved since.  matplotlib is imported only when a picture is drawn.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import InputError
from .text import count

DEFAULT_MAX_POINTS = 2000  # arrows drawn (a random sample of the points)
SCATTER_POINTS = 50_000  # points drawn as dots / used for the histogram and the projection
CHECK_FINGERPRINT_ROWS = 2_000_000  # reload (and fingerprint-check) the whole input up to this size



# ----------------------------------------------------------------------------------------- reading


def _open_complete_output(location: str, storage_options: tuple):
    from .output import OutputGroup

    location = os.fspath(location)
    output = OutputGroup(location, storage_options)
    if not output.exists():
        raise InputError(f"output {location!r} does not exist; give the --out of a finished kgrad run")
    group = output.open()
    attrs = dict(group.attrs)
    arrays = set(group.array_keys())
    missing = sorted({"gradient", "value"} - arrays)
    if missing or "run_fingerprint" not in attrs:
        raise InputError(f"{location!r} is not a kgrad output: it lacks "
                         f"{', '.join(missing) or 'the run attributes'} (it holds arrays: "
                         f"{', '.join(sorted(arrays)) or 'none'}); give the --out of a kgrad run")
    if not attrs.get("complete"):
        done = "some tasks"
        if "task_done" in arrays:
            flags = np.asarray(group["task_done"][:]).astype(bool)
            done = f"{int(flags.sum())}/{count(flags.size, 'task')}"
        raise InputError(f"output {location!r} is incomplete ({done} written, complete=false); "
                         f"finish it with 'kgrad run ... --resume' before plotting")
    return group, attrs


def _points_ref(attrs: dict, points: str | None, storage_options: tuple):
    """The InputRef of the run's points: ``points`` if given, else the location the output recorded."""
    from . import store

    if points is not None:
        return store.resolve_input(os.fspath(points), "points", storage_options), False
    meta = (attrs.get("inputs") or {}).get("points") or {}
    described = meta.get("location")
    if not described:
        raise InputError("the output does not record where its points came from (attribute "
                         "inputs.points.location); pass the points with --points PATH")
    location, array = described, meta.get("array")
    if not store.exists(location, storage_options):
        raise InputError(f"the output's points {described!r} are not there any more (relative paths are "
                         f"relative to where 'kgrad run' ran); pass them with --points PATH")
    ref = store.resolve_input(location, "points", storage_options)
    if array is not None and ref.array != array:
        ref = store.InputRef(location, array, storage_options)
    return ref, True


def _sample(n: int, size: int, rng) -> np.ndarray:
    return np.arange(n) if n <= size else np.sort(rng.choice(n, size=size, replace=False))


def _check_shape(ref, shape, n: int, dim: int) -> None:
    if tuple(shape) != (n, dim):
        raise InputError(f"the points at {ref.describe()} have shape {tuple(shape)} but the output has "
                         f"N={n}, D={dim}; pass the run's points with --points PATH")


def read_plot_data(location: str, storage_options: tuple = (), *, points: str | None = None,
                   sample: int = SCATTER_POINTS, seed: int = 0) -> dict:
    """The sampled points, gradients and values of a complete output, and its attributes.

    Rows whose gradient or value are not finite are dropped (a complete output has none).
    """
    from . import store

    storage_options = tuple(storage_options)
    group, attrs = _open_complete_output(location, storage_options)
    gradient_array, value_array = group["gradient"], group["value"]
    n, dim = gradient_array.shape
    ref, recorded = _points_ref(attrs, points, storage_options)
    rows = _sample(n, sample, np.random.default_rng(seed))
    if n <= CHECK_FINGERPRINT_ROWS:
        data, fingerprint = store.load_input(ref, "points")
        _check_shape(ref, data.shape, n, dim)
        expected = ((attrs.get("inputs") or {}).get("points") or {}).get("fingerprint")
        if recorded and expected and fingerprint != expected:
            raise InputError(f"the points at {ref.describe()} changed after the output was made "
                             f"(fingerprint {fingerprint[:12]}, the output has {expected[:12]}); pass the "
                             f"original points with --points PATH")
        x = data[rows]
    else:  # too large to reload whole: read only the sampled rows, unchecked
        array = store.open_array(ref)
        shape = tuple(array.shape) if len(array.shape) == 2 else (array.shape[0], 1)
        _check_shape(ref, shape, n, dim)
        if hasattr(array, "get_orthogonal_selection"):
            x = np.asarray(array.get_orthogonal_selection((rows,) + (slice(None),) * (len(array.shape) - 1)))
        else:
            x = np.asarray(array[rows])
        x = x[:, None] if x.ndim == 1 else x
    g = np.asarray(gradient_array.get_orthogonal_selection((rows, slice(None))), dtype=np.float64)
    v = np.asarray(value_array.get_orthogonal_selection(rows), dtype=np.float64)
    ok = np.isfinite(g).all(axis=1) & np.isfinite(v)
    return {"x": np.asarray(x[ok], dtype=np.float64), "g": g[ok], "v": v[ok], "n": n, "dim": dim,
            "attrs": attrs, "points": ref.describe()}


# ----------------------------------------------------------------------------------------- drawing


def _arrow_scale(lengths: np.ndarray, span: float) -> float:
    """quiver ``scale`` (data units) so that the 95th-percentile arrow is 3% of the plotted span."""
    typical = float(np.percentile(lengths, 95)) if lengths.size else 0.0
    if not np.isfinite(typical) or typical <= 0 or span <= 0:
        return 1.0
    return typical / (0.03 * span)


def _span(xy: np.ndarray) -> float:
    return float(np.max(np.ptp(xy, axis=0))) if len(xy) else 1.0


def _field(ax, fig, xy, gxy, v, arrows, title_extra=""):
    """Dots at every sampled point and arrows at ``arrows`` (indices), both coloured by v."""
    from matplotlib.colors import Normalize

    norm = Normalize(vmin=float(v.min()), vmax=float(v.max()) if v.max() > v.min() else float(v.min()) + 1)
    dot = max(0.5, min(8.0, 4000.0 / max(len(xy), 1)))
    ax.scatter(xy[:, 0], xy[:, 1], c=v, cmap="viridis", norm=norm, s=dot, alpha=0.35, linewidths=0)
    lengths = np.linalg.norm(gxy[arrows], axis=1)
    quiver = ax.quiver(xy[arrows, 0], xy[arrows, 1], gxy[arrows, 0], gxy[arrows, 1], v[arrows],
                       cmap="viridis", norm=norm, angles="xy", scale_units="xy",
                       scale=_arrow_scale(lengths, _span(xy)), width=0.0025, headwidth=3.5, headlength=4)
    fig.colorbar(quiver, ax=ax, label="kernel sum v = sum_i w_i k(q, x_i)")
    if title_extra:
        ax.set_xlabel(ax.get_xlabel() + title_extra)


HISTOGRAM_HEADROOM = 1.3  # y axis top / tallest bar: the legend sits in the band above the bars


def _histogram(ax, g: np.ndarray):
    """Histogram of |g|; on a log axis when it spans more than 3 decades (outliers below 0.5% are noted).

    The legend (the median, and the note on outliers) sits at the top right in a band of empty room above
    the tallest bar (:data:`HISTOGRAM_HEADROOM`), so it never covers a bar, wherever the tall bars are."""
    norms = np.linalg.norm(g, axis=1)
    positive = norms[norms > 0]
    low = float(np.percentile(positive, 0.5)) if positive.size else 0.0
    note = None
    if positive.size and positive.max() / low > 1e3:
        heights, _, _ = ax.hist(positive[positive >= low], bins=np.geomspace(low, positive.max(), 60),
                                color="tab:blue")
        ax.set_xscale("log")
        hidden = int(norms.size - np.count_nonzero(norms >= low))
        if hidden:
            note = f"{count(hidden, 'point')} with |g| < {low:.2g} not shown"
    else:
        heights, _, _ = ax.hist(norms, bins=60, color="tab:blue")
    ax.set_ylim(0, max(float(np.max(heights)), 1.0) * HISTOGRAM_HEADROOM)
    ax.axvline(float(np.median(norms)), color="tab:red", lw=1, label=f"median {np.median(norms):.3g}")
    ax.set_xlabel("|g| (all D components)")
    ax.set_ylabel("points")
    ax.set_title("gradient magnitudes")
    legend = ax.legend(loc="upper right", title=note, fontsize="small", title_fontsize="small")
    legend.set_alignment("right")


def _principal_axes(x: np.ndarray):
    """Mean, the first two principal directions (D, 2) and their share of the variance."""
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    share = s ** 2 / max(float(np.sum(s ** 2)), 1e-300)
    return mean, vt[:2].T, share[:2]


def draw(data: dict, path: str, *, max_points: int = DEFAULT_MAX_POINTS, seed: int = 0) -> str:
    """Draw ``data`` (from :func:`read_plot_data`) to ``path``; return the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x, g, v, dim, attrs = data["x"], data["g"], data["v"], data["dim"], data["attrs"]
    if len(x) == 0:
        raise InputError(f"output has no finite rows to plot (N={data['n']})")
    arrows = _sample(len(x), max_points, np.random.default_rng(seed + 1))
    kernel = attrs.get("kernel_description") or attrs.get("kernel", "?")
    shown = f"{len(arrows)} of {data['n']} points as arrows" if len(arrows) < data["n"] else \
        f"all {data['n']} points"
    weights = "unit weights" if not (attrs.get("inputs") or {}).get("weights") else "weighted"
    sources = (attrs.get("inputs") or {}).get("sources")
    about = f"N={data['n']}, M={attrs.get('M', '?')}, D={dim}, {weights}" + \
        ("" if not sources else ", separate sources")
    if dim == 2:
        fig = Figure(figsize=(8.5, 7.2), dpi=110)
        ax = fig.add_subplot()
        _field(ax, fig, x, g, v, arrows)
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xlabel("x[0]")
        ax.set_ylabel("x[1]")
        ax.set_title(f"gradient field g = sum_i w_i grad_q k(q, x_i)\n{kernel}\n{about}; {shown}", fontsize=10)
    else:
        fig = Figure(figsize=(14, 6.0), dpi=110)
        left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        if dim == 1:
            order = np.argsort(x[:, 0])
            left.scatter(x[order, 0], v[order], s=6, color="tab:blue", label="kernel sum v")
            left.set_xlabel("x")
            left.set_ylabel("kernel sum v = sum_i w_i k(q, x_i)", color="tab:blue")
            twin = left.twinx()
            twin.scatter(x[order, 0], g[order, 0], s=6, color="tab:red", label="gradient g = dv/dq")
            twin.axhline(0.0, color="tab:red", lw=0.5, alpha=0.5)
            twin.set_ylabel("gradient g = dv/dq", color="tab:red")
            left.set_title(f"kernel sum v and its gradient g\n{len(x)} of {data['n']} points", fontsize=10)
        else:
            mean, axes, share = _principal_axes(x)
            xy, gxy = (x - mean) @ axes, g @ axes
            _field(left, fig, xy, gxy, v, arrows)
            left.set_xlabel(f"principal component 1 ({100 * share[0]:.0f}% of variance)")
            left.set_ylabel(f"principal component 2 ({100 * share[1]:.0f}% of variance)")
            left.set_title(f"points and gradients projected on 2 principal components\n{shown}", fontsize=10)
        _histogram(right, g)
        fig.suptitle(f"kgrad output: {kernel}; {about}", fontsize=11)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path)
    return path


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("plotting needs matplotlib, which is not installed; install it with "
                         "pip install 'kgrad[plot]' (or pip install matplotlib)") from None


def plot_output(location, path, storage_options=(), *, max_points: int = DEFAULT_MAX_POINTS,
                points: str | None = None, seed: int = 0) -> str:
    """Draw a picture of the complete output group at ``location`` to ``path`` (PNG); return ``path``.

    ``max_points``: arrows drawn at most (a random sample, reproducible from ``seed``).  ``points``: where
    the run's points are now, if not where the output recorded them.  Raises :class:`InputError` for a
    missing, foreign or incomplete output, or points that are gone or changed.
    """
    if not isinstance(max_points, (int, np.integer)) or isinstance(max_points, bool) or max_points < 1:
        raise InputError(f"max_points={max_points!r} must be a whole number >= 1 (default "
                         f"{DEFAULT_MAX_POINTS})")
    _require_matplotlib()
    data = read_plot_data(os.fspath(location), tuple(storage_options), points=points, seed=seed)
    return draw(data, os.fspath(path), max_points=int(max_points), seed=seed)


# ----------------------------------------------------------------------------------------- command


def cmd_plot(args) -> int:
    written = plot_output(args.out, args.output, max_points=args.max_points, points=args.points)
    print(f"kgrad: wrote {written}")
    return 0


def add_plot_command(subparsers) -> None:
    """Add ``kgrad plot OUT -o FILE.png [--max-points N] [--points P]`` to the ``kgrad`` subcommands."""
    plot = subparsers.add_parser("plot", help="draw an output: gradient arrows coloured by the kernel sum",
                                 description="Draw a complete output group to a PNG. D = 2: the gradient "
                                             "field as arrows coloured by the kernel sum. Other D: a "
                                             "principal-component projection and a histogram of |g|.")
    plot.add_argument("out", help="the output zarr group (the --out of 'kgrad run')")
    plot.add_argument("-o", "--output", required=True, metavar="FILE.png", help="the picture to write")
    plot.add_argument("--max-points", dest="max_points", type=int, default=DEFAULT_MAX_POINTS, metavar="N",
                      help=f"arrows drawn at most, a random sample (default {DEFAULT_MAX_POINTS})")
    plot.add_argument("--points", help="where the run's points are now, if they have moved")
    plot.set_defaults(func=cmd_plot)
