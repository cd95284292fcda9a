"""Build script: the package, and the C++/CUDA extension `attnfx._C` from csrc/ (DESIGN §4).

The extension is optional at runtime (attnfx.backends says what each op runs on without it).
Its C++ sources are always built; the .cu sources are added when torch is a CUDA build and a
CUDA toolkit is found (CUDA_HOME), so a CPU wheel of torch builds the CPU kernels only.
`make check-cuda` compiles the .cu files with nvcc even then, so they cannot rot unseen.
"""
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

CSRC = Path(__file__).parent / "csrc"
CXX_FLAGS = ["-O3"]
# torch's own nvcc flags (half operators off, relaxed constexpr) are added by BuildExtension.
NVCC_FLAGS = ["-O3"]


def _extension():
    sources = sorted(str(p.relative_to(CSRC.parent)) for p in CSRC.glob("*.cpp"))
    headers = sorted(str(p.relative_to(CSRC.parent)) for p in (*CSRC.glob("*.h"), *CSRC.glob("*.cuh")))
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if not with_cuda:
        return cpp_extension.CppExtension("attnfx._C", sources, depends=headers,
                                          extra_compile_args={"cxx": CXX_FLAGS})
    sources += sorted(str(p.relative_to(CSRC.parent)) for p in CSRC.glob("*.cu"))
    return cpp_extension.CUDAExtension("attnfx._C", sources, depends=headers,
                                       extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS})


# kernels/ sits at the top of the repository (DESIGN §5) and installs as attnfx.kernels.
setup(packages=find_packages("src") + ["attnfx.kernels"],
      package_dir={"": "src", "attnfx.kernels": "kernels"},
      ext_modules=[_extension()],
      cmdclass={"build_ext": cpp_extension.BuildExtension})
