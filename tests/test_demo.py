"""`make demo` end to end: examples/colocation.py as a subprocess, judged by the JSON summary it writes.

The demo starts its own kvmemd (host memory, private runtime directory) and two engine processes
with tiny random-weight models; `--quick` trims the documents and tokens. Every claim of the story
is read from the summary, and the test checks independently that nothing is left behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.daemon_support import shm_exists

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "examples" / "colocation.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        [sys.executable, DEMO, "--device", "host", "--quick", "--out-dir", out],
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = json.loads((out / "colocation.json").read_text())
    return result, summary


def test_the_demo_succeeds_and_says_where_the_plot_is(demo):
    result, summary = demo
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary["ok"] and summary["error"] is None
    assert f"plot of each model's mapped memory: {summary['plot']}" in result.stdout
    assert "$ kvctl status" in result.stdout and "MODEL" in result.stdout  # the real kvctl table


def test_the_limited_model_settles_at_or_under_its_limit(demo):
    _, summary = demo
    limit = summary["limit"]
    assert limit["settled"] and limit["settled_bytes"] <= limit["limit_bytes"]


def test_the_other_models_memory_goes_to_the_first_while_it_sleeps(demo):
    _, summary = demo
    sleep = summary["sleep"]
    assert sleep["qwen_mapped_before_sleep"] > 0 and sleep["qwen_mapped_asleep"] == 0
    assert sleep["llama_peak_while_qwen_asleep"] > sleep["llama_mapped_before"]
    # llama grew by more than was free while qwen was awake: it used qwen's pages.
    assert sleep["llama_used_qwens_memory"]
    assert sleep["request_held_while_asleep"]


def test_the_prefix_cache_survives_sleep_and_wake(demo):
    _, summary = demo
    wake = summary["wake"]
    assert wake["restored"] and wake["prefix_hit"]
    assert wake["tokens_after"] == wake["tokens_before"] and wake["same_tokens"]
    assert wake["same_prefix_blocks"] and wake["same_prefix_bytes"]
    assert wake["computed_prompt_tokens"] < wake["prompt_tokens"]  # the prefix was not recomputed
    assert wake["prefix_reused"]


def test_the_plot_is_a_png_with_the_actions_marked(demo):
    _, summary = demo
    png = Path(summary["plot"])
    assert png.read_bytes()[:8] == PNG_MAGIC
    labels = [m["label"] for m in summary["marks"]]
    assert labels == ["limit llama 8MiB", "sleep qwen --offload", "limit llama none", "wake qwen"]


def test_nothing_is_left_behind(demo):
    _, summary = demo
    assert summary["clean"]
    assert summary["left_behind"] == {"processes": [], "socket": False, "shm_segment": False}
    assert len(summary["pids"]) == 3  # two engines and the daemon
    for pid in summary["pids"]:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not Path(summary["socket"]).exists()
    assert not shm_exists(summary["shm_name"])


@pytest.mark.parametrize(("flag", "value"), [("--budget", "lots"), ("--limit", "-3MiB")])
def test_bad_input_is_one_line(flag: str, value: str, tmp_path: Path):
    result = subprocess.run(
        [sys.executable, DEMO, f"{flag}={value}", "--out-dir", tmp_path], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert (
        result.stderr
        == f"colocation.py: {flag}: size {value!r} is not understood: use e.g. 20GB, 20GiB, 512M, 1048576 or 25%\n"
    )
    assert result.stdout == ""
