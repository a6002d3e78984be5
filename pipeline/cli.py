"""The ``kgrad`` command: ``run``, ``plan``, ``inspect``, ``plot``.

Exit codes: 0 done; 2 bad input or usage (one line on stderr, nothing written); 1 anything else (one
line naming the cause, the output and the next step); 130 after Ctrl-C, 143 after SIGTERM, 129 after
SIGHUP (ignored under nohup): each stops a run the same way, one line, tasks cancelled, lease given back;
141, quietly, when stdout's reader has gone (``kgrad inspect OUT | head -3``, as ``cat`` ends).  The run
options and their flags come from :mod:`pipeline.options`; nothing here imports JAX or dask before the
arguments are parsed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from .errors import InputError


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (exit 2), like every other bad input, with a "did you
    mean" for a mistyped flag or command."""

    _argv: list = []

    def parse_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)  # to tell which command a bad flag was for
        return super().parse_args(args, namespace)

    def error(self, message):
        command = _command_in(self, self._argv)
        message += _did_you_mean(message, self, command)
        where = self.prog.split()[-1] if " " in self.prog else command
        raise InputError(f"{message} (see 'kgrad {where} --help')" if where else f"{message} (see 'kgrad --help')")


def _commands(parser: argparse.ArgumentParser) -> dict:
    """The subcommands' parsers by name ({} for a parser without subcommands)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _command_in(parser: argparse.ArgumentParser, argv: list) -> str:
    """The subcommand named in ``argv`` (the first word that is one), or ''."""
    commands = _commands(parser)
    return next((word for word in argv if word in commands), "")


def _did_you_mean(message: str, parser: argparse.ArgumentParser, command: str = "") -> str:
    """'; did you mean --overwrite?' for argparse's 'unrecognized arguments: --overwite' (the flags of
    ``command``, whose unknown flags argparse reports from the top-level parser) or for an invalid command,
    from the closest known word (difflib); '' when nothing is close."""
    import difflib
    import re

    commands = _commands(parser)
    unknown = re.match(r"unrecognized arguments: (.*)", message)
    if unknown:
        known = list((commands[command] if command in commands else parser)._option_string_actions)
        words = [w.split("=")[0] for w in unknown.group(1).split() if w.startswith("-")]
    else:
        choice = re.match(r"argument (?:command|\{.*\}): invalid choice: '([^']*)'", message)
        words, known = ([choice.group(1)] if choice else []), list(commands)
    for word in words:
        close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
        if close:
            return f"; did you mean {close[0]}?"
    return ""


def _kernel_names() -> str:
    from .options import KERNEL_NAMES

    return ", ".join(KERNEL_NAMES)


def _run_arguments(p: argparse.ArgumentParser) -> None:
    from .options import add_arguments

    add_arguments(p, kernel_names=_kernel_names())


def _format_bytes(n: int) -> str:
    from dask.utils import format_bytes

    return format_bytes(n)


def _checked_options(args, planning: bool = False):
    """The run's options, with every usage error that needs neither JAX nor dask found first (importing them
    takes seconds): the options' own values (:func:`pipeline.options.check_usage`), and that each local input
    exists in a format kgrad reads (URLs are checked when read)."""
    from . import store
    from .options import check_usage, options_from_args

    config = options_from_args(args)
    check_usage(config, planning)
    for role in ("points", "sources", "weights"):
        location = getattr(config, role)
        if isinstance(location, str) and "://" not in location:
            store.resolve_input(store.absolute(location), role)
    return config


def cmd_plan(args) -> int:
    config = _checked_options(args, planning=True)
    from .plan import project
    from .workflow import prepare  # JAX: only now that there is work

    prepared = prepare(config, planning=True)
    plan = prepared.plan
    print(f"kernel        {prepared.job.spec.describe()}  [{plan.formulation}, mode={config.mode}]")
    print(f"inputs        N={plan.n_points} points x M={plan.n_sources} sources, D={plan.dim}, {plan.dtype}")
    print(f"tile          {plan.rows} rows x {plan.cols} cols, {plan.tiles_per_call} tiles per compiled call")
    print(f"tasks         {plan.n_tasks} of {plan.rows_per_task} rows (output chunks), "
          f"{plan.pairs / 1e9:.3g} G pairs in all")
    limit = "" if plan.worker_memory_bytes is None else f" (worker limit {_format_bytes(plan.worker_memory_bytes)})"
    print(f"memory        {_format_bytes(plan.task_memory_bytes)} per task{limit}")
    print(f"workers       {plan.workers}")
    method = prepared.problem.method
    details = method.describe(prepared.problem.planned)
    print(f"method        {method.name}" + (f": {details}" if details else ""))
    print(f"pruning       {_pruning_line(prepared)}")
    print(f"rough time    {project(plan)}")
    print(f"output        {prepared.config.out}: {prepared.output_note}" if prepared.config.out
          else "output        (none given)")
    return 0


def _pruning_line(prepared) -> str:
    """What a tolerance does for this run: the pairs left and the bounds, why every pair is computed, or (an
    exact run) what a tolerance of 1e-9 would do, including that it would not help and why."""
    plan, problem = prepared.plan, prepared.problem
    bound = problem.error_bounds
    if plan.method_cost is not None:  # a method that works on a grid, not on pairs
        return (f"tolerance {plan.tolerance:g}: the grid above instead of the {plan.pairs / 1e9:.3g} G pairs; per "
                f"query |g^ - g| <= {bound['gradient']:.3g}, |v^ - v| <= {bound['value']:.3g}"
                + (f" ({plan.exact_reason})" if plan.exact_reason else ""))
    if plan.estimated_pairs is not None:  # a method that computes only some of the pairs
        return (f"tolerance {plan.tolerance:g}: about {plan.pairs_to_compute / 1e9:.3g} G of the "
                f"{plan.pairs / 1e9:.3g} G pairs left ({plan.pairs_to_compute / plan.pairs:.1%}); per query "
                f"|g^ - g| <= {bound['gradient']:.3g}, |v^ - v| <= {bound['value']:.3g}"
                + (f" ({plan.exact_reason})" if plan.exact_reason else ""))
    if plan.tolerance > 0:
        return f"tolerance {plan.tolerance:g}: {plan.exact_reason}"
    return f"none (exact: every pair); {_tolerance_hint(prepared)}"


HINT_TOLERANCE = 1e-9


def _tolerance_hint(prepared) -> str:
    """For an exact run: what ``--tolerance 1e-9`` would do, planned with this run's own options (workers,
    tiles, memory) and projected by the same function as the run's own time (:func:`pipeline.plan.project`):
    the share of pairs it would leave and the projected time, or that it would not help here, and why."""
    from .plan import project
    from .workflow import plan_problem

    try:
        problem = plan_problem(prepared.config.replace(tolerance=HINT_TOLERANCE), prepared.inputs)
    except InputError as exc:
        return f"--tolerance {HINT_TOLERANCE:g} could not be planned here ({exc})"
    if problem.plan.estimated_pairs is None:
        reason = problem.plan.exact_reason.removesuffix(": the run is exact")
        return f"--tolerance {HINT_TOLERANCE:g} would not help here: {reason}"
    share = problem.plan.pairs_to_compute / problem.plan.pairs
    projection = project(problem.plan)
    return (f"--tolerance {HINT_TOLERANCE:g} would leave about {share:.1%} of the pairs "
            f"(rough time {projection.seconds:.1f} s: {projection.terms})")


def cmd_run(args) -> int:
    config = _checked_options(args)
    from .workflow import run_workflow  # JAX and dask: only now that there is work

    run_workflow(config)
    return 0


def cmd_inspect(args) -> int:
    from .inspect_output import describe_output

    info = describe_output(args.out)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        from .inspect_output import format_output

        print(format_output(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="kgrad", description="Summed kernel gradients over large point sets "
                                               "(dask + JAX + zarr).",
                     epilog=f"kernels: {_kernel_names()}, or a user kernel 'module:function'.  "
                            f"'kgrad COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"kgrad {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    run = sub.add_parser("run", help="compute and write an output group")
    _run_arguments(run)
    run.set_defaults(func=cmd_run)
    plan = sub.add_parser("plan", help="print tiles, tasks, memory, time, and what a run would do with an "
                                       "existing output; write nothing")
    _run_arguments(plan)
    plan.set_defaults(func=cmd_plan)
    inspect = sub.add_parser("inspect", help="what an output holds and how it was made")
    inspect.add_argument("out")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(func=cmd_inspect)
    from .plot import add_plot_command

    add_plot_command(sub)
    return parser


def _quiet_exit() -> None:
    """After the one-line error: keep interpreter shutdown from adding lines to stderr (zarr's pending
    asyncio tasks on a store that failed mid-read report themselves as they are collected)."""
    sys.stderr.flush()
    sys.unraisablehook = lambda unraisable: None
    sys.stderr = open(os.devnull, "w")


# The signals that stop a run like Ctrl-C: SIGTERM (timeout, SLURM's scancel, Kubernetes) and SIGHUP (the
# terminal closed) used to kill the client outright, its lease and futures left behind.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_stopped_by = signal.SIGINT  # the signal that stopped the run; the exit code is 128 + its number


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone (``kgrad inspect OUT | head -3``)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no real stdout (a test's capture): not a pipe
        return False


def _quiet_broken_pipe() -> int:
    """A reader that closed stdout early ends the command quietly, as it ends ``cat``: coreutils die of
    SIGPIPE, which a shell reports as 141 (128 + 13).  stdout is pointed at /dev/null so that the final
    flush at exit does not fail again (Python's recipe, "Note on SIGPIPE" in the signal module's docs)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 128 + signal.SIGPIPE


def _on_sigint(signum, frame):
    """First stop signal (Ctrl-C, SIGTERM, SIGHUP): stop the run (KeyboardInterrupt), which then cancels
    its tasks, gives its lease back and closes the cluster, each step bounded in time.  Further stop
    signals are ignored meanwhile, so that clean-up finishes and the run still ends in one line."""
    global _stopped_by
    _ignore_stop_signals()
    _stopped_by = signal.Signals(signum)
    raise KeyboardInterrupt


def _ignore_stop_signals() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _stopped_line(detail: str) -> str:
    """The one line for a stopped run; a signal other than Ctrl-C is named ("interrupted (SIGTERM)")."""
    if _stopped_by == signal.SIGINT:
        return f"kgrad: {detail}"
    return f"kgrad: {detail.replace('interrupted', f'interrupted ({_stopped_by.name})', 1)}"


def main(argv=None) -> int:
    # A store that fails mid-read leaves zarr's pending asyncio tasks behind; their complaints at
    # interpreter exit would bury the one-line error.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    console = argv is None and threading.current_thread() is threading.main_thread()
    if console:
        # Ctrl-C stops a run even when started from a shell that ignores SIGINT in background jobs
        # (Python keeps an inherited "ignore" and would then run to the end).
        for signum in STOP_SIGNALS:
            if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
                continue  # started under nohup: the user asked to outlive the terminal
            signal.signal(signum, _on_sigint)
    debug = bool(os.environ.get("KGRAD_DEBUG"))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            raise InputError("no command given; use one of run, plan, inspect, plot (see 'kgrad --help')")
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe fails here, inside the handlers below, not at interpreter exit
        return status
    except InputError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"kgrad: error: {exc}", file=sys.stderr)
        if argv is None:  # the console script, about to exit
            _quiet_exit()
        return 2
    except KeyboardInterrupt as exc:
        if console:
            _ignore_stop_signals()
        detail = str(exc) or "interrupted; finish the run later with 'kgrad run ... --resume'"
        print(_stopped_line(detail), file=sys.stderr)
        if argv is None:
            _quiet_exit()
        # The shell's convention for a command stopped by a signal: 128 + its number (Ctrl-C: 130,
        # SIGTERM: 143, SIGHUP: 129).
        return 128 + int(_stopped_by)
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        return _quiet_broken_pipe()
    except Exception as exc:
        if debug:
            raise
        from .errors import RunFailed

        if isinstance(exc, RunFailed):
            print(f"kgrad: failed: {exc}", file=sys.stderr)
        else:
            print(f"kgrad: failed: {type(exc).__name__}: {exc} (KGRAD_DEBUG=1 shows the traceback)",
                  file=sys.stderr)
        if argv is None:
            _quiet_exit()
        return 1


if __name__ == "__main__":
    sys.exit(main())
