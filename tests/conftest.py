"""Test configuration shared by the whole suite.

- Triton kernels run under the interpreter (TRITON_INTERPRET=1) with CPU tensors unless a CUDA
  GPU is present. Triton reads the variable when a kernel is *defined*, so it is set here, before
  any test module imports trace_kernels. An explicit TRITON_INTERPRET in the environment wins.
- `@pytest.mark.gpu` tests are skipped without CUDA.
- A run in which no test passed fails, so "collected nothing" or "skipped everything" can never
  look green.
"""

from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_sessionfinish(session, exitstatus):
    if exitstatus != 0 or hasattr(session.config, "workerinput"):  # failed already, or an xdist worker
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    passed = len(reporter.stats.get("passed", [])) if reporter is not None else 0
    if passed == 0 and session.testscollected == 0:
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED
    elif passed == 0 and not session.config.option.collectonly:
        print("\nERROR: no test passed (everything was skipped or deselected)")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
