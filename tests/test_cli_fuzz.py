"""Random and hostile arguments to every kvctl and kvmemd command: never a traceback, always one line
on stderr and a documented exit code.

kvctl runs in this process (click's runner; fast) against a real host daemon and against a runtime
directory with none. kvmemd runs as real processes, with a budget too small to start appended, so
that no daemon is left running whatever the arguments ask for.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmem.cli.main import main as kvctl
from tests import fakecuda
from tests.daemon_support import KVMEMD, DaemonProcess

KVCTL_CODES = {0, 1, 2, 3, 4, 5, 6}
KVMEMD_CODES = {0, 1, 2}
COMMANDS = ["status", "top", "limit", "min", "priority", "forget", "sleep", "wake", "doctor", "device"]
OPTIONS = [
    "--gpu", "--runtime-dir", "--json", "--offload", "--wait", "--timeout", "--iterations", "--device", "--help",
    "--version", "--", "-", "-1", "-x", "--no-such-option",
]  # fmt: skip
HOSTILE = [
    "", " ", "m", "model-a", "x" * 65, "x" * 5000, "modèle", "日本", "a\nb", "a\x00b", "../../etc", "-5GB", "0",
    "100", "1e309", "nan", "-1", "2147483648", "99999999999999999999", "25%", "120%", "none", "1.5GiB", "20GB",
    "\udcff", "$(id)", "%s%n", "cuda", "host", "auto",
]  # fmt: skip
tokens = st.one_of(st.sampled_from(OPTIONS + HOSTILE), st.text(max_size=12))


def check_failure(code: int, stdout: str, stderr: str) -> None:
    """A failure says why in one line on stderr; a bare command prints its help (exit 2)."""
    if code == 2 and stderr == "":
        assert stdout.startswith("Usage: "), stdout
        return
    assert stderr.startswith("Error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    with DaemonProcess(tmp_path_factory.mktemp("fuzz") / "rt", "host", "16MiB") as d:
        yield d


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(COMMANDS), args=st.lists(tokens, max_size=5), live=st.booleans())
def test_kvctl_answers_anything_with_one_line_and_a_documented_code(daemon, tmp_path, command, args, live):
    runtime = daemon.runtime_dir if live else tmp_path / "nowhere"
    argv = ["--runtime-dir", str(runtime), command, *args]
    if command == "top":
        argv += ["--iterations", "1"]
    if command in ("sleep", "wake"):
        argv += ["--timeout", "0.2"]
    result = CliRunner().invoke(kvctl, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), (argv, result.exception)
    assert result.exit_code in KVCTL_CODES, (argv, result.exit_code, result.stderr)
    if result.exit_code != 0:
        check_failure(result.exit_code, result.stdout, result.stderr)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    command=st.sampled_from(["start", "stop", "frob", ""]),
    args=st.lists(tokens.filter(lambda t: "\x00" not in t), max_size=4),  # no NUL in a process's argv
)
def test_kvmemd_answers_anything_with_one_line_and_a_documented_code(tmp_path: Path, command, args):
    argv = [KVMEMD, *([command] if command else []), *args]
    if command == "start":  # whatever the arguments, this cannot start: a budget under one page
        argv += ["--device", "host", "--budget", "1KiB", "--runtime-dir", str(tmp_path / "rt")]
    if command == "stop":
        argv += ["--runtime-dir", str(tmp_path / "rt"), "--timeout", "1"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=fakecuda.child_env())
    assert result.returncode in KVMEMD_CODES, (argv, result.returncode, result.stderr)
    if result.returncode != 0:
        check_failure(result.returncode, result.stdout, result.stderr)
