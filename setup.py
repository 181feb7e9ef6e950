"""Package list for setuptools (metadata lives in pyproject.toml).

The folder kernels/ installs as the import package `trace_kernels` (pyproject's package-dir);
setuptools' automatic discovery cannot rename, so sub-packages are listed here.
"""

from setuptools import find_packages, setup

kernel_packages = ["trace_kernels" + name[len("kernels") :] for name in find_packages(include=["kernels", "kernels.*"])]
setup(packages=find_packages(include=["trace_core", "trace_core.*"]) + kernel_packages)
