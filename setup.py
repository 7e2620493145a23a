"""Build badam_ext and its C++ extension ``badam_ext._C``.

Build without isolation so the extension compiles against the torch already installed
(an isolated build environment would fetch a separate, multi-GB CUDA torch)::

    pip install --no-build-isolation -e .
"""
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

SOURCES = ["csrc/arena.cpp", "csrc/bindings.cpp"]

setup(
    packages=[
        "badam_ext",
        "badam_ext.kernels",
        "badam_ext.profiling",
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
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
