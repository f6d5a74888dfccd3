#!/usr/bin/env python3
"""Set up the project's virtual environment from the lock file, then run a command in it.

    python3 dev.py serve [OPTIONS]   the engine on embedded defaults (`flashsale serve OPTIONS`)
    python3 dev.py test [ARGS]       the whole test suite (`pytest ARGS`)
    python3 dev.py lint              ruff and mypy on the package, its tests and bench
    python3 dev.py flashsale ARGS    any `flashsale` command (replay, ...)
    python3 dev.py bench ARGS        the load-test harness (`python -m bench ARGS`)

Only the standard library is used here, so a machine with nothing but python3 can run it.
The environment is rebuilt only when requirements.lock or pyproject.toml change.
"""

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
STAMP = VENV / ".installed-from"


def lock_digest() -> str:
    digest = hashlib.sha256()
    for name in ("requirements.lock", "pyproject.toml"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def ensure_environment() -> None:
    wanted = lock_digest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    print("dev.py: installing the locked dependencies into .venv (a few minutes the first time)")
    if not (BIN / "python").exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "--require-hashes", "-r", str(ROOT / "requirements.lock")], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], check=True)
    STAMP.write_text(wanted)
    print("dev.py: environment ready")


def command_for(action: str, args: list[str]) -> list[str]:
    python = str(BIN / "python")
    match action:
        case "serve":
            return [str(BIN / "flashsale"), "serve", *args]
        case "flashsale":
            return [str(BIN / "flashsale"), *args]
        case "test":
            return [python, "-m", "pytest", *args]
        case "bench":
            return [python, "-m", "bench", *args]
    sys.exit(f"dev.py: unknown command {action!r}; see `python3 dev.py --help`")


def lint() -> int:
    ruff = subprocess.run([str(BIN / "ruff"), "check", "flashsale", "tests", "bench"], cwd=ROOT)
    mypy = subprocess.run([str(BIN / "mypy"), "flashsale", "tests", "bench"], cwd=ROOT)
    return ruff.returncode or mypy.returncode


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        try:
            print(__doc__, flush=True)
        except BrokenPipeError:  # `python3 dev.py --help | head -3`: the reader went away
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    action, args = sys.argv[1], sys.argv[2:]
    ensure_environment()
    if action == "lint":
        return lint()
    command = command_for(action, args)
    os.chdir(ROOT)
    os.execv(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
