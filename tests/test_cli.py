"""The command line: answers ``--help`` without torch, and every usage error is one ``error:`` line, exit 2."""
from __future__ import annotations

import re
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


def test_train_flags_map_one_to_one_onto_train_config(capsys, monkeypatch, tmp_path):
    """Every ``klas train`` flag lands in its TrainConfig field unchanged (non-default values, so a flag
    that is dropped or crossed with another shows); a bad value of a new field is an ``error:`` line."""
    import dataclasses

    import klas.train
    from klas.errors import KlasError
    from klas.train import TrainConfig

    got = {}

    def fake_train_run(run_dir, config, **kw):
        got["run"], got["config"] = run_dir, config
        raise KlasError("captured")

    monkeypatch.setattr(klas.train, "train_run", fake_train_run)
    values = dict(epochs=4, steps_per_epoch=3, batch_size=8, lr=0.02, weight_decay=0.1, loss="ce=1,lfm=0.5",
                  teacher="largest", first_loss="lfm=1,ffm=2", first_epochs=2, sampling="bucket", layer="mlp",
                  init="random", init_images=7, amp="off", device="cpu", seed=3, root=str(tmp_path))
    argv = ["train", "run-x"]
    for name, v in values.items():
        argv += ["--" + name.replace("_", "-"), str(v)]
    argv += ["--frozen", "--no-anchor-routes", "--resume", "--overwrite"]
    code, out, err = run(capsys, *argv)
    assert code == 2 and err == "error: captured\n"
    cfg = got["config"]
    assert isinstance(cfg, TrainConfig) and str(got["run"]) == "run-x"
    for name, v in values.items():
        assert getattr(cfg, name) == (type(getattr(cfg, name))(v)), name
    assert (cfg.full_tune, cfg.anchor_routes, cfg.resume, cfg.overwrite) == (False, False, True, True)
    defaults = TrainConfig()
    changed = {f.name for f in dataclasses.fields(TrainConfig) if getattr(cfg, f.name) != getattr(defaults, f.name)}
    assert changed == set(values) | {"full_tune", "anchor_routes", "resume", "overwrite"}
    monkeypatch.undo()
    for bad, msg in ((["--first-loss", "xent"], "unknown loss 'xent' in --first-loss"),
                     (["--first-epochs", "5"], r"--first-epochs \(5\) must be below --epochs \(5\)"),
                     (["--loss", "lfm=-2"], "loss weight for lfm must be a non-negative")):
        code, out, err = run(capsys, "train", str(tmp_path / "nowhere"), *bad)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and re.search(msg, err), err


def test_tables_keep_whole_names_when_output_is_not_a_terminal(monkeypatch):
    """Piped or redirected, rich would lay tables out for 80 columns and squeeze names to 'klas_vi…'."""
    import io
    import os

    from rich.table import Table

    from klas.term import LOG_WIDTH, make_console

    table = Table()
    for col in ("route", "GFLOPs", "params", "Θ", "Γ", "bucket", "top-1 before %", "top-1 after %", "latency ms"):
        table.add_column(col)
    route = "klas_vit_ti[0..4] -> klas_vit_s[4..5]"
    table.add_row(route, "0.0030", "0.17M", "0.6544", "2.605", "1", "60.1", "77.5", "10.04")
    monkeypatch.delenv("COLUMNS", raising=False)  # (an earlier test in this process may have set it)
    buf = io.StringIO()
    make_console(file=buf).print(table)
    assert route in buf.getvalue()
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run([sys.executable, "-c", "from klas.cli import out, err; print(out.width, err.width)"],
                          capture_output=True, text=True, env=env)
    assert done.stdout.split() == [str(LOG_WIDTH)] * 2, done.stderr


def test_the_klas_command_keeps_freed_memory_for_reuse(monkeypatch):
    """klas/process.py: on glibc the command raises malloc's mmap/trim thresholds before any work (224-px
    batches otherwise page-fault on every forward pass); elsewhere it changes nothing and says so."""
    import platform

    from klas import cli
    from klas.process import keep_freed_memory

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1))
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert calls == [1]
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc
