"""The part of kvmem's SGLang integration that runs in every SGLang process: its entry point.

SGLang imports and calls every ``sglang.srt.platforms`` entry point when it resolves its platform,
so this part must work (and stay light) without SGLang; the rest is tested with a real SGLang by
`make test-sglang` (tests/test_integration_sglang.py).
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from importlib.util import find_spec

import pytest

from kvmem.integrations import sglang as kvmem_sglang


def test_the_entry_point_is_registered_under_sglangs_platform_group():
    (ep,) = [ep for ep in entry_points(group="sglang.srt.platforms") if ep.name == "kvmem"]
    assert ep.value == "kvmem.integrations.sglang:activate"
    assert ep.load() is kvmem_sglang.activate


def test_activate_names_kvmems_platform_only_with_kvmem_1(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("KVMEM", raising=False)
    assert kvmem_sglang.activate() is None
    monkeypatch.setenv("KVMEM", "0")
    assert kvmem_sglang.activate() is None
    monkeypatch.setenv("KVMEM", "1")
    assert kvmem_sglang.activate() == "kvmem.integrations.sglang.platform:KvmemPlatform"


def test_importing_the_entry_point_imports_neither_torch_nor_sglang():
    code = "import sys, kvmem.integrations.sglang; print(sorted({'torch', 'sglang'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_the_version_check_names_the_range():
    assert kvmem_sglang.SUPPORTED == ">=0.5.23,<0.5.24"
    assert kvmem_sglang.check_sglang_version("0.5.23") == "0.5.23"
    with pytest.raises(kvmem_sglang.UnsupportedSglangError, match=r"supports sglang >=0\.5\.23,<0\.5\.24.*0\.5\.21"):
        kvmem_sglang.check_sglang_version("0.5.21")


@pytest.mark.skipif(find_spec("sglang") is not None, reason="sglang is installed here")
def test_without_sglang_the_version_check_says_it_is_not_installed():
    with pytest.raises(kvmem_sglang.UnsupportedSglangError, match=r"needs sglang >=0\.5\.23,<0\.5\.24; it is not"):
        kvmem_sglang.check_sglang_version()
