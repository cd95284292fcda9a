"""Check the CUDA build of attnfx._C without a GPU or a CUDA torch (make check-cuda, CI).

The source list is setup.py's own (extension_sources(with_cuda=True)), so what a CUDA machine
would build is what is checked: every source exists, no two sources share an object file (torch's
ninja build writes csrc/x.o for both x.cpp and x.cu and stops with "multiple rules generate"),
and every .cu compiles with nvcc under setup.py's and torch's nvcc flags for sm_80 and sm_90.
The .cpp sources are the CPU build's, compiled by `make install` already.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("80", "90")
# C++20 as torch ≥ 2.13 builds extensions. C10_CUDA_NO_CMAKE_CONFIGURE_FILE: torch's CPU wheels
# ship c10/cuda's headers but not the generated cuda_cmake_macros.h (a Windows export macro only).
HOST_FLAGS = ["-std=c++20", "-Xcompiler", "-fPIC", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]


def setup_module():
    sys.path.insert(0, str(ROOT))
    try:
        import setup                  # noqa: PLC0415 — setup() itself only runs as __main__
    finally:
        sys.path.pop(0)
    return setup


def collisions(sources: list[str]) -> dict[str, list[str]]:
    """Object file → the sources that would write it, where more than one would."""
    writers = defaultdict(list)
    for source in sources:
        writers[str(Path(source).with_suffix(".o"))].append(source)
    return {obj: names for obj, names in writers.items() if len(names) > 1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nvcc", default=os.environ.get("NVCC", "nvcc"))
    args = parser.parse_args()
    setup = setup_module()
    sources = setup.extension_sources(with_cuda=True)
    errors = [f"{' and '.join(names)} would both compile to {obj} (ninja: multiple rules generate it)"
              for obj, names in collisions(sources).items()]
    errors += [f"source {name} does not exist" for name in sources if not (ROOT / name).is_file()]
    if not any(name.endswith(".cu") for name in sources):
        errors.append("the CUDA build has no .cu source")
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if errors:
        return 1
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    flags = HOST_FLAGS + setup.NVCC_FLAGS + cpp_extension.COMMON_NVCC_FLAGS + gencode + includes
    with tempfile.TemporaryDirectory() as out:
        for source in (s for s in sources if s.endswith(".cu")):
            print(f"nvcc -c {source}", flush=True)
            obj = Path(out) / Path(source).with_suffix(".o").name
            done = subprocess.run([args.nvcc, "-c", *flags, "-o", str(obj), str(ROOT / source)])
            if done.returncode != 0:
                return done.returncode
    print(f"CUDA build of attnfx._C: {len(sources)} sources, objects distinct, every .cu compiles for sm_{'/sm_'.join(ARCHS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
