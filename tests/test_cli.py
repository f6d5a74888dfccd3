"""The `flashsale` command as a user runs it: a real process, real signals."""

import os
import signal
import subprocess
import sys

import pytest

from flashsale.cli import build_parser


def flashsale(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "flashsale.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("command", [[], ["serve"]])
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: flashsale" in capsys.readouterr().out


def test_serve_reports_what_it_started_and_stops_on_sigterm(database_dsn: str) -> None:
    env = {**os.environ, "FLASHSALE_DATABASE_URL": database_dsn}
    process = flashsale("serve", "--port", "18080", env=env)
    assert process.stdout is not None
    assert "PostgreSQL ready (external), schema migrated" in process.stdout.readline()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "stopped" in out


def test_bad_configuration_stops_the_start_with_one_line() -> None:
    env = {**os.environ, "FLASHSALE_PAYMENT_PROVIDER": "paypal"}
    process = flashsale("serve", env=env)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert err.strip().count("\n") == 0 and "FLASHSALE_PAYMENT_PROVIDER" in err
    assert "Traceback" not in err
