"""The test configuration really runs Triton kernels (interpreter on CPU), and dispatch is explicit."""

import pytest
import torch
import triton
import triton.language as tl

from trace_kernels import Backend, interpreter_enabled, select_backend


@triton.jit
def _scaled_add(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x * alpha + y, mask=mask)


def test_triton_kernel_runs_in_test_configuration():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        assert interpreter_enabled(), "tests/conftest.py must enable TRITON_INTERPRET on CPU"
    x = torch.randn(1000, device=device)
    y = torch.randn(1000, device=device)
    out = torch.empty_like(x)
    _scaled_add[(triton.cdiv(1000, 128),)](x, y, out, 1000, 2.5, BLOCK=128)
    torch.testing.assert_close(out, 2.5 * x + y)


def test_select_backend_prefers_triton_where_it_can_run():
    cpu = torch.zeros(1)
    expected = Backend.TRITON if interpreter_enabled() else Backend.CPU  # CPU tests: interpreter on
    assert select_backend("op", cpu) is expected
    assert select_backend("op", cpu, backend="cpu") is Backend.CPU


def test_select_backend_without_interpreter_falls_back(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert select_backend("op", torch.zeros(1)) is Backend.CPU
    with pytest.raises(RuntimeError, match="forced"):
        select_backend("op", torch.zeros(1), backend="triton")


def test_select_backend_rejects_mixed_devices():
    with pytest.raises(ValueError, match="one device"):
        select_backend("op", torch.zeros(1), torch.zeros(1, device="meta"))
    with pytest.raises(ValueError, match="fast"):
        select_backend("op", torch.zeros(1), backend="fast")


def test_reference_is_the_old_name_of_the_cpu_backend():
    """Configs and callers written before the rename pass "reference"; it means the CPU path."""
    assert Backend("reference") is Backend.CPU and Backend.REFERENCE is Backend.CPU
    assert select_backend("op", torch.zeros(1), backend="reference") is Backend.CPU
