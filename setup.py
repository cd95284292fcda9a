"""Build script. The C++/CUDA extension `attnfx._C` (csrc/) is optional at runtime and is
added here once csrc/ holds sources; until then this is a pure-Python package."""
from pathlib import Path

from setuptools import find_packages, setup

csrc = Path(__file__).parent / "csrc"
ext_modules, cmdclass = [], {}
if any(csrc.glob("*.cpp")):
    from torch.utils import cpp_extension

    ext_modules = [cpp_extension.CppExtension("attnfx._C", sorted(str(p) for p in csrc.glob("*.cpp")))]
    cmdclass = {"build_ext": cpp_extension.BuildExtension}

# kernels/ sits at the top of the repository (DESIGN §5) and installs as attnfx.kernels.
setup(packages=find_packages("src") + ["attnfx.kernels"],
      package_dir={"": "src", "attnfx.kernels": "kernels"},
      ext_modules=ext_modules, cmdclass=cmdclass)
