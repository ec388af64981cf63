"""The command line: answers ``--help`` without torch, and every usage error is one ``error:`` line, exit 2."""
from __future__ import annotations

import subprocess
import sys

import pytest

from klas.cli import main


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, klas, klas.cli; print(sorted(m for m in ('torch', 'timm', 'numpy') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]", res.stdout


def run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        main(list(argv))
    out, err = capsys.readouterr()
    return done.value.code, out, err


@pytest.mark.parametrize("argv", [["--help"], [], ["export"], ["train", "--help"], ["export", "pareto", "--help"],
                                  ["tree", "--help"], ["export", "tree", "--help"]],
                         ids=["help", "bare", "export", "train-help", "export-pareto-help", "tree-help", "export-tree-help"])
def test_help_exits_0_on_stdout(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 0 and "Usage: klas" in out and err == ""


@pytest.mark.parametrize("argv, message", [
    (["search", "c", "--budget", "abc"], "Invalid value for '--budget'.*; see klas search --help"),
    (["train", "r", "--epochs", "1.5"], "Invalid value for '--epochs'.*; see klas train --help"),
    (["train", "r", "--bogus"], "No such option: --bogus.*; see klas train --help"),
    (["train"], "Missing argument.*; see klas train --help"),
    (["cache", "--amp"], "'--amp' requires an argument; see klas cache --help"),
    (["export", "pareto"], "Missing argument.*; see klas export pareto --help"),
    (["serve"], "No such command 'serve'; see klas --help"),
])
def test_usage_errors_are_one_line_exit_2(capsys, argv, message):
    import re

    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and re.search(message, err), err


def test_klas_errors_are_one_line_exit_2(capsys, tmp_path):
    code, out, err = run(capsys, "export", "pareto", str(tmp_path / "nowhere"))
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: there is no run directory"), err
