"""The run options, defined once: their types, defaults, workflow-file keys, command-line flags and help.

:class:`RunOptions` is the only place an option is written down.  From it come the ``kgrad run`` / ``kgrad
plan`` flags (:func:`add_arguments`, :func:`options_from_args`), the workflow file's checks
(:func:`load_workflow`) and the README's options table (``python -m pipeline.options``, checked by a test).
Adding an option is one field here (and its use where it takes effect).  No JAX, no dask: parsing the
command line stays fast.

Workflow file (TOML; every key optional except ``inputs.points``; flags override the file)::

    [inputs]
    points = "data/points.zarr"
    [kernel]
    name = "rbf"
    lengthscale = [0.5, 1.0, 2.0]
    [kernel.params]
    alpha = 1.0
    [run]
    out = "out/result.zarr"

Relative paths in a file are relative to the directory that holds it (so it works from any current
directory); paths given as flags are relative to the current directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import InputError

# The built-in kernels of pipeline.kernels (a test holds the two lists together), named here so that
# --help and usage errors need no JAX.
KERNEL_NAMES = ("rbf", "matern12", "matern32", "matern52", "rational_quadratic", "imq", "periodic", "linear",
                "polynomial")
# Compute precisions and modes (pipeline.tiles and pipeline.problem use these), named here for the same reason.
DTYPES = ("float32", "float64")
MODES = ("auto", "jacfwd", "jacrev")


def check_choice(name: str, value, allowed) -> None:
    """InputError naming ``value`` and the values ``allowed`` unless it is one of them."""
    if value not in allowed:
        raise InputError(f"{name}={value!r} is not supported; use one of {', '.join(allowed)}")


def unknown_kernel(name: str) -> InputError:
    """The error for a kernel name that is neither built in nor 'module:function', with the closest name."""
    import difflib

    close = difflib.get_close_matches(str(name), KERNEL_NAMES, n=1)
    return InputError(f"unknown kernel {name!r}; choose one of {', '.join(KERNEL_NAMES)}, or give a user kernel "
                      f"as 'module:function'" + (f" (did you mean {close[0]}?)" if close else ""))


def check_usage(options: "RunOptions", planning: bool = False) -> None:
    """The usage errors that an option shows by itself, found before JAX or dask is imported (which takes
    seconds): points and output given, --resume with --overwrite, the kernel's name, the dtype and the mode.
    (:func:`pipeline.workflow.check_options` does the rest; the data are checked once read.)"""
    if not options.points:
        raise InputError("no points given; pass --points PATH or set [inputs] points in the workflow")
    if not options.out and not planning:
        raise InputError("no output given; pass --out PATH or set [run] out in the workflow")
    if options.resume and options.overwrite:
        raise InputError("--resume and --overwrite exclude each other; choose one")
    kernel = options.kernel  # not a string: pipeline.kernels.make_spec says so
    if isinstance(kernel, str) and kernel not in KERNEL_NAMES and ":" not in kernel:
        raise unknown_kernel(kernel)
    check_choice("dtype", options.dtype, DTYPES)
    check_choice("mode", options.mode, MODES)

# ----------------------------------------------------------------------------------------- value kinds


@dataclass(frozen=True)
class Kind:
    """What values an option takes: a phrase for messages, and a test."""

    phrase: str
    accepts: Callable[[Any], bool]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


TEXT = Kind("a string", lambda v: isinstance(v, str))
NUMBER = Kind("a number", _number)
WHOLE = Kind("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool))
BOOL = Kind("true or false", lambda v: isinstance(v, bool))
TABLE = Kind("a table", lambda v: isinstance(v, dict))
NUMBERS = Kind("a number or a list of numbers",
               lambda v: _number(v) or (isinstance(v, list) and bool(v) and all(_number(x) for x in v)))
SIZE = Kind("a size such as '4GiB'", lambda v: isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)))
NUMBER_TABLE = Kind("a table of numbers", lambda v: isinstance(v, dict) and all(_number(x) for x in v.values()))


@dataclass(frozen=True)
class OptionSpec:
    """How one option appears outside Python: its workflow section and key, its flag, its help."""

    section: str | None  # "inputs", "kernel" or "run"; None: a flag only (resume, overwrite)
    kind: Kind
    help: str
    key: str | None = None  # key in the section, when it differs from the field name
    flag: str | None = ""  # "" -> derived from the name (--rows-per-task); None -> no flag
    metavar: str | None = None
    path: bool = False  # a local path: relative to the workflow file's directory
    hidden: bool = False  # a flag for experts, left out of --help
    flag_help: str | None = None  # the flag's help, where it differs (a --no-... flag)


def option(default=None, *, section, kind, help, factory=None, **opt):
    """A dataclass field carrying its :class:`OptionSpec`."""
    meta = {"option": OptionSpec(section, kind, help, **opt)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------- the options


@dataclass
class RunOptions:
    """One run's options, from a workflow file, flags, or Python (``RunOptions(points=..., out=...)``)."""

    points: str | None = option(section="inputs", kind=TEXT, path=True, metavar="PATH",
                                help="zarr array, zarr group with 'points' (+ 'weights'), .npy file, or URL")
    sources: str | None = option(section="inputs", kind=TEXT, path=True, metavar="PATH",
                                 help="the sources x_i (default: the points)")
    weights: str | None = option(section="inputs", kind=TEXT, path=True, metavar="PATH",
                                 help="one weight per source (default: the group's 'weights' array, else ones)")
    storage_options: dict = option(section="inputs", kind=TABLE, factory=dict, flag=None,
                                   help="fsspec options for URLs (s3://...), e.g. {anon = false}")
    kernel: str = option("rbf", section="kernel", key="name", kind=TEXT,
                         help="a kernel name, or a user kernel 'module:function'")
    lengthscale: float | list = option(1.0, section="kernel", kind=NUMBERS, metavar="L",
                                       help="one value, or one per dimension")
    variance: float = option(1.0, section="kernel", kind=NUMBER, help="the kernel's scale s2, a factor on k")
    params: dict = option(section="kernel", kind=NUMBER_TABLE, factory=dict, flag="--param",
                          metavar="NAME=VALUE", help="the kernel's own parameters, e.g. --param alpha=2 "
                                                     "(repeatable): alpha (rational_quadratic), c and beta (imq), "
                                                     "period (periodic), c and degree (polynomial)")
    out: str | None = option(section="run", kind=TEXT, path=True, metavar="PATH", help="the output zarr group")
    dtype: str = option("float32", section="run", kind=TEXT, help="compute precision: float32 or float64")
    mode: str = option("auto", section="run", kind=TEXT,
                       help="auto (the kernel's fast path), jacfwd or jacrev (generic vmap of that transform)")
    tolerance: float = option(0.0, section="run", kind=NUMBER, metavar="EPS",
                              help="0: every pair (exact).  EPS > 0: kernels that decay to 0 skip far sources, "
                                   "with |g^ - g| <= EPS sum|w| gmax and |v^ - v| <= EPS sum|w| kmax per query")
    method: str = option("auto", section="run", kind=TEXT, metavar="NAME",
                         help="auto (the fastest method that meets the tolerance), or one of far_field, pruned, "
                              "dense (refused, saying why, where it cannot run the problem)")
    scheduler: str = option("local", section="run", kind=TEXT, metavar="WHERE",
                            help="local (start a local cluster), a scheduler address, or a scheduler file")
    workers: int | None = option(section="run", kind=WHOLE, metavar="N",
                                 help="workers of the local cluster (default: the cores available)")
    threads_per_worker: int = option(1, section="run", kind=WHOLE, metavar="N",
                                     help="threads per local worker")
    pin_cores: bool | None = option(section="run", kind=BOOL, flag=None,
                                    help="pin each local worker to a core (default: when workers <= cores)")
    memory_limit: str | int = option("auto", section="run", kind=SIZE, metavar="SIZE",
                                     help="memory per local worker, e.g. 4GiB")
    tile_rows: int | None = option(section="run", kind=WHOLE, hidden=True, help="query rows per compiled tile")
    tile_cols: int | None = option(section="run", kind=WHOLE, hidden=True, help="sources per tile")
    rows_per_task: int | None = option(section="run", kind=WHOLE, metavar="R",
                                       help="query rows per task (= the output's chunk length)")
    progress: bool = option(True, section="run", kind=BOOL, flag="--no-progress",
                            help="show progress (tasks done, rate, time left) on stderr",
                            flag_help="do not print progress (tasks done, rate, time left) on stderr")
    performance_report: str | None = option(section="run", kind=TEXT, path=True, metavar="FILE.html",
                                            help="write dask's performance report (needs bokeh)")
    cache_dir: str | None = option(section="run", kind=TEXT, path=True, flag=None,
                                   help="JAX's persistent compilation cache (a directory only you can write)")
    security: dict = option(section="run", kind=TABLE, factory=dict, flag=None,
                            help="TLS files: tls_ca_file, tls_client_cert, tls_client_key "
                                 "(flags --tls-ca-file, --tls-cert, --tls-key)")
    scheduler_timeout: float = option(60.0, section="run", kind=NUMBER, metavar="SECONDS",
                                      help="fail (exit 1) when the dask scheduler has not answered for this long; "
                                           "at the start, exit 2 unless the address answers as a dask "
                                           "scheduler within this (at most 20 s)")
    resume: bool = option(False, section=None, kind=BOOL, help="finish an interrupted run of the same job")
    overwrite: bool = option(False, section=None, kind=BOOL,
                             help="replace an existing kgrad output (never anything else)")

    def replace(self, **changes) -> "RunOptions":
        """A copy with ``changes`` (``None`` is a value too: it unsets an option)."""
        return dataclasses.replace(self, **changes)


def option_specs() -> list[tuple[str, OptionSpec]]:
    return [(f.name, f.metadata["option"]) for f in dataclasses.fields(RunOptions)]


def _flag(name: str, opt: OptionSpec) -> str | None:
    if opt.flag is None:
        return None
    return opt.flag or "--" + name.replace("_", "-")


def _key(name: str, opt: OptionSpec) -> str:
    return opt.key or name


# ----------------------------------------------------------------------------------------- workflow file


def load_workflow(path: str) -> RunOptions:
    """Read a TOML workflow file (data only: nothing in it is executed); relative paths in it are made
    relative to its directory."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise InputError(f"workflow file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"workflow file {path!r} is not valid TOML: {exc}") from None
    by_key = {(opt.section, _key(name, opt)): (name, opt) for name, opt in option_specs() if opt.section}
    sections = sorted({opt.section for _, opt in option_specs() if opt.section})
    values: dict = {}
    for section, table in doc.items():
        if section not in sections or not isinstance(table, dict):
            raise InputError(f"workflow file {path!r}: unknown section [{section}]; "
                             f"allowed: {', '.join('[' + s + ']' for s in sections)}")
        for key, value in table.items():
            if (section, key) not in by_key:
                allowed = sorted(k for s, k in by_key if s == section)
                raise InputError(f"workflow file {path!r}: unknown key {key!r} in [{section}]; "
                                 f"allowed: {', '.join(allowed)}")
            name, opt = by_key[section, key]
            if not opt.kind.accepts(value):
                raise InputError(f"workflow file {path!r}: [{section}] {key} = {value!r} must be "
                                 f"{opt.kind.phrase}")
            values[name] = value
    return RunOptions(**_relative_to(values, os.path.dirname(os.path.abspath(path))))


def _is_local_relative(value: str) -> bool:
    """A relative local path: not a URL (``s3://``, ``file://``), not absolute, not ``~/...``."""
    return "://" not in value and not os.path.isabs(value) and not value.startswith("~")


def _relative_to(values: dict, base: str) -> dict:
    """A workflow file's values with its relative local paths resolved against ``base``, the file's own
    directory: the path options, the security files, and a scheduler file (a scheduler ending in .json or
    holding a path separator)."""
    values = dict(values)
    for name, opt in option_specs():
        if opt.path and isinstance(values.get(name), str) and _is_local_relative(values[name]):
            values[name] = os.path.join(base, values[name])
    scheduler = values.get("scheduler")
    if (isinstance(scheduler, str) and scheduler != "local" and _is_local_relative(scheduler)
            and (scheduler.endswith(".json") or os.sep in scheduler)):
        values["scheduler"] = os.path.join(base, scheduler)
    if isinstance(values.get("security"), dict):
        values["security"] = {k: os.path.join(base, v) if isinstance(v, str) and _is_local_relative(v) else v
                              for k, v in values["security"].items()}
    return values


# ----------------------------------------------------------------------------------------- flags

_TLS_FLAGS = (("--tls-ca-file", "tls_ca_file", "TLS scheduler: the cluster's CA certificate "
                                               "(see cluster/make-tls-certs.sh)"),
              ("--tls-cert", "tls_client_cert", "TLS scheduler: this client's certificate"),
              ("--tls-key", "tls_client_key", "TLS scheduler: this client's private key"))


def add_arguments(parser: argparse.ArgumentParser, kernel_names: str = "") -> None:
    """The ``kgrad run`` / ``kgrad plan`` arguments, from :class:`RunOptions`.  Every flag defaults to
    "not given" (argparse.SUPPRESS), so only the flags a user typed override the workflow file."""
    parser.add_argument("workflow", nargs="?", help="TOML workflow file (flags override it; relative paths "
                                                    "in it are relative to its directory)")
    for name, opt in option_specs():
        flag = _flag(name, opt)
        if flag is None:
            continue
        default = RunOptions.__dataclass_fields__[name].default
        text = argparse.SUPPRESS if opt.hidden else (opt.flag_help or opt.help) + (
            f" (default {default})" if default not in (None, dataclasses.MISSING, False, True) else "")
        if name == "kernel" and kernel_names:
            text = f"{kernel_names}, or a user kernel 'module:function' (default rbf)"
        common = {"dest": name, "default": argparse.SUPPRESS, "help": text}
        if opt.kind is BOOL:
            store = "store_false" if flag.startswith("--no-") else "store_true"
            parser.add_argument(flag, action=store, **common)
        elif name == "params":
            parser.add_argument(flag, action="append", metavar=opt.metavar, **common)
        elif opt.kind is NUMBERS:
            parser.add_argument(flag, nargs="+", type=float, metavar=opt.metavar, **common)
        else:
            kind = {NUMBER: float, WHOLE: int}.get(opt.kind, str)
            parser.add_argument(flag, type=kind, metavar=opt.metavar, **common)
    for flag, key, text in _TLS_FLAGS:
        parser.add_argument(flag, dest=key, metavar="PEM", default=argparse.SUPPRESS, help=text)


def _parse_params(items) -> dict:
    params = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InputError(f"--param {item!r} is not NAME=VALUE (e.g. --param alpha=2)")
        try:
            params[name] = int(value)
        except ValueError:
            try:
                params[name] = float(value)
            except ValueError:
                raise InputError(f"--param {item!r}: {value!r} is not a number") from None
    return params


def options_from_args(args: argparse.Namespace) -> RunOptions:
    """The workflow file (if any) with the flags that were given laid over it."""
    given = dict(vars(args))
    workflow = given.pop("workflow", None)
    base = load_workflow(workflow) if workflow else RunOptions()
    changes = {name: given[name] for name, _ in option_specs() if name in given}
    if "params" in changes:
        changes["params"] = {**base.params, **_parse_params(changes["params"])}
    if "lengthscale" in changes and len(changes["lengthscale"]) == 1:
        changes["lengthscale"] = changes["lengthscale"][0]
    tls = {key: given[key] for _, key, _ in _TLS_FLAGS if key in given}
    if tls:
        changes["security"] = {**base.security, **tls}
    return base.replace(**changes)


# ----------------------------------------------------------------------------------------- documentation


def markdown_table() -> str:
    """The README's options table."""
    rows = ["| workflow key | flag | default | what it is |", "|---|---|---|---|"]
    for name, opt in option_specs():
        default = RunOptions.__dataclass_fields__[name].default
        shown = "" if default in (None, dataclasses.MISSING) else f"`{json.dumps(default)}`"
        key = f"`[{opt.section}] {_key(name, opt)}`" if opt.section else ""
        flag = _flag(name, opt)
        flags = "" if flag is None or opt.hidden else f"`{flag}`"
        if name == "security":
            flags = ", ".join(f"`{f}`" for f, _, _ in _TLS_FLAGS)
        text = opt.help + (" (relative to the workflow file)" if opt.path else "")
        rows.append(f"| {key} | {flags} | {shown} | {text} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
