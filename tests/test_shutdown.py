import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run(body: str) -> subprocess.CompletedProcess:
    """Run ``body`` as ``main`` under run_then_exit in a new process; an atexit handler reports on stderr."""
    code = (
        "import atexit, sys\n"
        "from mnist.shutdown import run_then_exit\n"
        "atexit.register(lambda: print('exit handler ran', file=sys.stderr))\n"
        f"def main():\n    {body}\n"
        "run_then_exit(main)\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("body", "code", "stderr"),
    [
        ("print('unterminated', end='')", 0, "exit handler ran\n"),
        ("sys.exit(3)", 3, "exit handler ran\n"),
        ("sys.exit('error: no data')", 1, "error: no data\nexit handler ran\n"),
    ],
)
def test_exit_keeps_codes_output_and_exit_handlers(body, code, stderr):
    result = run(body)
    assert result.returncode == code
    assert result.stderr == stderr
    assert result.stdout == ("unterminated" if "print" in body else "")


def test_threads_finish_before_the_process_ends():
    result = run("import threading, time; threading.Thread(target=lambda: (time.sleep(0.5), print('late'))).start()")
    assert result.returncode == 0 and result.stdout == "late\n"


def test_unexpected_exception_keeps_python_traceback():
    result = run("raise RuntimeError('bug')")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RuntimeError: bug" in result.stderr
