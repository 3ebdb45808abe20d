"""Module boundaries: what the daemon imports, and what importing kvmem costs."""

from __future__ import annotations

import json
import subprocess
import sys

# What the daemon and the engines share; everything else under kvmem is the engine side.
SHARED_PREFIXES = ("kvmem.common", "kvmem.device")


def loaded_after(code: str) -> list[str]:
    """The modules a fresh interpreter has loaded after running `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def engine_side(modules: list[str]) -> list[str]:
    return [
        m
        for m in modules
        if (m.startswith("kvmem.") and not m.startswith(SHARED_PREFIXES)) or m.split(".")[0] in ("torch", "triton")
    ]


def test_the_daemon_loads_no_engine_side_module():
    # Every module of the daemon package, whatever it holds now.
    code = (
        "import pkgutil, importlib, kvmemd\n"
        "for info in pkgutil.iter_modules(kvmemd.__path__):\n"
        "    importlib.import_module('kvmemd.' + info.name)\n"
    )
    modules = loaded_after(code)
    assert "kvmemd.cli" in modules and "kvmem.common.protocol" in modules
    assert engine_side(modules) == []


def test_importing_kvmem_loads_nothing_until_a_name_is_used():
    modules = loaded_after("import kvmem")
    assert [m for m in modules if m.startswith("kvmem")] == ["kvmem"]
    modules = loaded_after("import kvmem\nkvmem.connect")
    assert "kvmem.session" in modules


def test_the_shared_modules_load_only_each_other():
    modules = loaded_after("import kvmem.common.protocol, kvmem.common.status, kvmem.common.layout, kvmem.common.sizes")
    assert engine_side(modules) == []


def test_an_unknown_name_is_an_attribute_error():
    import kvmem

    try:
        kvmem.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no attribute 'no_such_name'" in str(exc)
    else:
        raise AssertionError("kvmem.no_such_name did not raise AttributeError")


def test_the_device_layer_exports_what_the_readme_lists():
    # CudaDevice is loaded on first use (its module imports cuda-bindings), but it is there by name.
    from kvmem.device import CudaDevice, HostDevice, open_device
    from kvmem.device.cuda import CudaDevice as defined

    assert CudaDevice is defined and callable(open_device) and HostDevice.kind == "host"
    modules = loaded_after("import kvmem.device")
    assert "kvmem.device.cuda" not in modules
