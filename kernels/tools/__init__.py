"""Developer tools for the kernels, not used at run time.

python -m trace_kernels.tools.compile_check   compile every kernel for an NVIDIA arch without a GPU
trace_kernels.tools.autotune_report          which config the autotuner picked, per kernel (benches print it)
"""
