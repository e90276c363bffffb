import subprocess
import sys

import pytest

from flows.cli import build_parser, main


def test_help_lists_the_commands():
    text = build_parser().format_help()
    for command in ("run", "stage", "status", "fetch-models"):
        assert command in text


def test_console_script_help_runs():
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "durian" in proc.stdout


def test_unknown_stage_is_refused(capsys):
    assert main(["run", "nosuch"]) == 2
    assert "unknown stage 'nosuch'" in capsys.readouterr().err


def test_params_file_needs_no_dvc(capsys):
    assert main(["run", "--params", "other.yaml"]) == 2
    assert "--no-dvc" in capsys.readouterr().err


def test_stage_name_is_checked():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["stage", "deploy"])


def test_status_on_an_empty_project(project_dir, capsys):
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "not trained yet" in out and "nothing registered yet" in out
