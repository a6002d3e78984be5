"""``kgrad --version``, and help that names the kernels and explains every option."""

from __future__ import annotations

import re

import pytest

import pipeline
from pipeline.cli import build_parser, main
from pipeline.kernels import KERNELS


def _output(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    return capsys.readouterr().out


def test_version(capsys):
    assert _output(capsys, ["--version"]).strip() == f"kgrad {pipeline.__version__}"


def test_help_names_every_kernel(capsys):
    text = " ".join(_output(capsys, ["--help"]).split())
    for name in KERNELS:
        assert name in text, name
    text = " ".join(_output(capsys, ["run", "--help"]).split())
    for name in KERNELS:
        assert name in text, name


@pytest.mark.parametrize("command", ["run", "plan"])
def test_every_option_has_help(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    silent = [a.option_strings or a.dest for a in sub._actions if not a.help]
    assert silent == [], f"options without help text: {silent}"
    text = sub.format_help()
    assert re.search(r"--variance VARIANCE\s+the kernel's scale", text)
    assert re.search(r"--no-progress\s+do not print progress", text)


@pytest.mark.parametrize("argv, suggestion, command", [
    (["run", "--points", "p.npy", "--overwite"], "did you mean --overwrite?", "run"),
    (["plan", "--lengthscle", "2"], "did you mean --lengthscale?", "plan"),
    (["inspect", "out.zarr", "--jsn"], "did you mean --json?", "inspect"),
    (["rnu", "--points", "p.npy"], "did you mean run?", ""),
])
def test_a_mistyped_flag_or_command_gets_a_suggestion(capsys, argv, suggestion, command):
    """One line, exit 2, the closest flag of the command that was typed (not of another command)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and suggestion in err, err
    assert f"(see 'kgrad {command} --help')" in err if command else "(see 'kgrad --help')" in err, err


def test_no_suggestion_when_nothing_is_close_or_from_another_command(capsys):
    assert main(["run", "--points", "p.npy", "--zzzzzz"]) == 2
    assert "did you mean" not in capsys.readouterr().err
    assert main(["inspect", "out.zarr", "--overwite"]) == 2  # a run flag, not one of inspect's
    assert "did you mean" not in capsys.readouterr().err
