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
