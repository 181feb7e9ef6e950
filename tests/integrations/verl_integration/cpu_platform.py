"""A CPU platform for verl, for the tests only (verl 0.9.1 ships CUDA / NPU / ROCm platforms).

verl's workers ask `verl.plugin.platform.get_platform()` for the device; with no accelerator it
falls back to CUDA and fails. `use_cpu_platform()` registers `CpuTestPlatform` through verl's
`PlatformRegistry.register` and selects it with VERL_PLATFORM; VERL_ENGINE_DEVICE=cuda makes
`EngineRegistry` pick the FSDP engines, which verl registers for cuda / npu only. Call it before
anything asks for the platform (a fresh process).
"""

from __future__ import annotations

import contextlib
import os

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry

NAME = "cpu_test"


class _CpuDeviceModuleType(type):
    """Memory statistics (memory_allocated, max_memory_reserved, mem_get_info, ...) read 0."""

    def __getattr__(cls, name):
        if "mem" in name:
            return lambda *args, **kwargs: 0 if name != "mem_get_info" else (0, 0)
        raise AttributeError(f"CpuDeviceModule has no {name!r}")


class CpuDeviceModule(metaclass=_CpuDeviceModuleType):
    """The torch.cuda-like namespace verl calls through `get_torch_device()`."""

    is_available = staticmethod(lambda: True)
    current_device = staticmethod(lambda: "cpu")
    get_device_name = staticmethod(lambda *args: "CPU")
    device_count = staticmethod(lambda: 1)
    set_device = staticmethod(lambda index: None)
    synchronize = staticmethod(lambda *args: None)
    empty_cache = staticmethod(lambda: None)
    manual_seed = staticmethod(torch.manual_seed)
    manual_seed_all = staticmethod(torch.manual_seed)
    get_rng_state = staticmethod(lambda *args, **kwargs: torch.get_rng_state())
    set_rng_state = staticmethod(lambda state, *args, **kwargs: torch.set_rng_state(state))


class CpuTestPlatform(PlatformBase):
    device_name = property(lambda self: "cpu")
    vendor_name = property(lambda self: NAME)
    device_module = property(lambda self: CpuDeviceModule)

    def is_available(self):
        return True

    def current_device(self):
        return "cpu"

    def device_count(self):
        return 1

    def set_device(self, device_index):
        pass

    def synchronize(self, device_index=None):
        pass

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    def manual_seed_all(self, seed):
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings):
        pass

    def empty_cache(self):
        pass

    def get_device_capability(self, device_index=0):
        return None, None

    def communication_backend_name(self):
        return "gloo"

    def visible_devices_envvar(self):
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg):
        yield

    def profiler_start(self):
        pass

    def profiler_stop(self):
        pass

    def ray_resource_name(self):
        return "CPU"

    def ray_noset_envvars(self):
        return []

    def is_ipc_supported(self):
        return False

    def cudart(self):
        return None


def use_cpu_platform() -> None:
    PlatformRegistry.register(NAME)(CpuTestPlatform)
    os.environ["VERL_PLATFORM"] = NAME
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"
