"""The package's shape: every op exported at the top, each op folder with its naive / cpu / triton parts."""

import importlib

import pytest

import trace_kernels

OPS = {
    "tree_attention": "tree_attention",
    "linear_logprob": "linear_logprob",
    "tree_decode": "tree_decode_attention",
}  # op folder -> the public op it exports


@pytest.mark.parametrize("folder, op", OPS.items())
def test_each_op_is_exported_and_has_its_parts(folder, op):
    assert callable(getattr(trace_kernels, op)) and op in trace_kernels.__all__
    package = importlib.import_module(f"trace_kernels.{folder}")
    assert getattr(package, op) is getattr(trace_kernels, op)
    for part in ("naive", "cpu", "triton"):
        importlib.import_module(f"trace_kernels.{folder}.{part}")


def test_developer_tools_live_in_tools():
    for tool in ("compile_check", "autotune_report"):
        importlib.import_module(f"trace_kernels.tools.{tool}")
