"""Build badam_ext and its C++ extension ``badam_ext._C``.

Build without isolation so the extension compiles against the torch already installed
(an isolated build environment would fetch a separate, multi-GB CUDA torch)::

    pip install --no-build-isolation -e .
"""
import sys

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

SOURCES = ["csrc/arena.cpp", "csrc/host_buffer.cpp", "csrc/bindings.cpp", "csrc/host_buffer_bindings.cpp"]
# Link the shared libstdc++ by name: a relocated GCC whose lib dir holds only libstdc++.a would
# otherwise embed a second, static libstdc++ in _C, and its iostreams crash inside the Python
# process (seen on the GPU machine, whose CXX is such a toolchain).
LINK_ARGS = ["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []

setup(
    packages=[
        "badam_ext",
        "badam_ext.integrations",
        "badam_ext.kernels",
        "badam_ext.memory",
        "badam_ext.profiling",
        "badam_ext.states",
    ],
    # The Triton kernels live in the top-level folder triton_kernels/ but are imported as
    # badam_ext.kernels: the bare name `triton_kernels` belongs to OpenAI's Triton and a PyPI package.
    package_dir={"badam_ext.kernels": "triton_kernels"},
    ext_modules=[
        CppExtension(
            name="badam_ext._C",
            sources=SOURCES,
            include_dirs=["csrc"],
            extra_compile_args=["-O2", "-g0", "-fvisibility=hidden"],
            extra_link_args=LINK_ARGS,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
