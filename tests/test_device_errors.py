"""Errors name the call and the driver's error; host-only argument checks."""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import tempfile

import pytest

from kvmem.device import HostDevice, InvalidArgumentError, OutOfMemoryError
from kvmem.device.cuda import CudaDevice


def test_a_driver_error_names_the_call_and_the_error():
    with CudaDevice(0) as dev:
        fd = os.memfd_create("not-a-page")
        os.ftruncate(fd, dev.granularity)
        try:
            with pytest.raises(InvalidArgumentError) as info:
                dev.import_page(fd, dev.granularity)
        finally:
            os.close(fd)
        assert str(info.value) == "cuMemImportFromShareableHandle failed: CUDA_ERROR_INVALID_VALUE (invalid argument)"
        assert info.value.call == "cuMemImportFromShareableHandle"
        assert info.value.error_name == "CUDA_ERROR_INVALID_VALUE"


def test_driver_out_of_memory_is_its_own_type_with_the_call():
    with CudaDevice(0) as dev:
        pages = []
        with pytest.raises(OutOfMemoryError) as info:
            while True:
                pages.append(dev.create_page())
        assert str(info.value) == "cuMemCreate failed: CUDA_ERROR_OUT_OF_MEMORY (out of memory)"
        assert info.value.call == "cuMemCreate"


def test_host_import_checks_kind_and_size_of_the_descriptor():
    with HostDevice(capacity=64 << 20) as dev, dev.create_page() as page, page.export() as exported:
        with pytest.raises(InvalidArgumentError, match="holds 2097152 bytes, not the 4194304 expected"):
            dev.import_page(exported.fd, 2 * dev.granularity)
        for directory in ("/dev/shm", None):  # a tmpfs file and a disk file are not memfds
            with tempfile.TemporaryFile(dir=directory) as other:
                other.truncate(dev.granularity)
                with pytest.raises(InvalidArgumentError, match="is not a kvmem host page"):
                    dev.import_page(other.fileno(), dev.granularity)


def test_host_device_options_are_validated():
    with pytest.raises(InvalidArgumentError, match="granularity 1000 is not a positive multiple"):
        HostDevice(granularity=1000)
    with pytest.raises(InvalidArgumentError, match="capacity 0 must be positive"):
        HostDevice(capacity=0)
    with HostDevice(capacity=8 << 20, granularity=64 << 10) as dev:
        assert dev.granularity == 64 << 10
        pages = [dev.create_page() for _ in range(128)]
        with pytest.raises(OutOfMemoryError, match="host device capacity exhausted"):
            dev.create_page()
        assert len(pages) == 128


def test_host_mappings_are_not_inherited_by_a_forked_child():
    with HostDevice(capacity=64 << 20) as dev, dev.reserve(dev.granularity) as reservation:
        page = dev.create_page()
        mapping = dev.map(reservation, 0, page)
        dev.set_access(reservation, 0, dev.granularity)
        dev.memset(mapping.address, 0x61, 16)
        pid = os.fork()
        if pid == 0:  # the child touches the parent's page: it must fault, not read 0x61
            faulthandler.disable()  # a quiet death: the fault is the expected outcome
            value = ctypes.c_ubyte.from_address(mapping.address).value
            os._exit(value == 0x61)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
        assert dev.read(mapping.address, 1) == b"a"
        page.close()
