"""Build script: the package, and the C++/CUDA extension `attnfx._C` from csrc/ (docs/design.md §4).

The extension is optional at runtime (attnfx.ops.backends says what each op runs on without it).
Its C++ sources are always built; the .cu sources are added when torch is a CUDA build and a
CUDA toolkit is found (CUDA_HOME), so a CPU wheel of torch builds the CPU kernels only.
`make check-cuda` (tools/check_cuda_build.py) checks the CUDA build's source list from
`extension_sources` and compiles its .cu files with nvcc even then, so they cannot rot unseen.
A source's object is its path with .o: x.cpp and x.cu would collide (hence x_cuda.cu).
"""
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

CSRC = Path(__file__).parent / "csrc"
CXX_FLAGS = ["-O3"]
# torch's own nvcc flags (half operators off, relaxed constexpr) are added by BuildExtension.
NVCC_FLAGS = ["-O3"]


def extension_sources(with_cuda: bool) -> list[str]:
    """The extension's sources, relative to the repository: the .cpp files, and the .cu files
    for a CUDA build."""
    patterns = ("*.cpp", "*.cu") if with_cuda else ("*.cpp",)
    return sorted(str(p.relative_to(CSRC.parent)) for pattern in patterns for p in CSRC.glob(pattern))


def _extension():
    headers = sorted(str(p.relative_to(CSRC.parent)) for p in (*CSRC.glob("*.h"), *CSRC.glob("*.cuh")))
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if not with_cuda:
        return cpp_extension.CppExtension("attnfx._C", extension_sources(False), depends=headers,
                                          extra_compile_args={"cxx": CXX_FLAGS})
    return cpp_extension.CUDAExtension("attnfx._C", extension_sources(True), depends=headers,
                                       extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS})


if __name__ == "__main__":          # setuptools runs this file as __main__; the build check imports it
    setup(packages=find_packages("src"),
          package_dir={"": "src"},
          ext_modules=[_extension()],
          cmdclass={"build_ext": cpp_extension.BuildExtension})
