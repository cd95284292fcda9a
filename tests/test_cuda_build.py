"""The CUDA build's source list (tools/check_cuda_build.py, run by `make check-cuda` in CI): the
sources setup.py would compile on a CUDA machine have distinct object files. x.cpp and x.cu both
wrote csrc/x.o, and ninja refused the build on every CUDA torch."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _check_module():
    spec = importlib.util.spec_from_file_location("check_cuda_build", ROOT / "tools" / "check_cuda_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_sources_have_distinct_objects():
    check = _check_module()
    sources = check.setup_module().extension_sources(with_cuda=True)
    assert any(s.endswith(".cu") for s in sources) and any(s.endswith(".cpp") for s in sources)
    assert all((ROOT / s).is_file() for s in sources)
    assert check.collisions(sources) == {}


def test_a_colliding_pair_is_named():
    check = _check_module()
    assert check.collisions(["csrc/a.cpp", "csrc/a.cu", "csrc/b.cu"]) == {"csrc/a.o": ["csrc/a.cpp", "csrc/a.cu"]}


def test_the_cpu_build_has_no_cuda_source():
    sources = _check_module().setup_module().extension_sources(with_cuda=False)
    assert sources and all(s.endswith(".cpp") for s in sources)
