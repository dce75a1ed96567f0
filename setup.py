"""Build script: everything is declared in pyproject.toml except the optional C++/CUDA extension.

`freeflow._C` is compiled from csrc/ when sources exist and torch is importable at build time
(`pip install --no-build-isolation .`). CUDA sources (`*.cu` kernels and `*_cuda.cpp` torch
bindings) are added only when a CUDA toolchain and a CUDA build of torch are both present. If the
extension is not built here, freeflow JIT-builds it on first use (freeflow/_ext.py), and otherwise
falls back to pure PyTorch. `FREEFLOW_NO_EXT=1` skips the build.
"""
import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp or os.environ.get("FREEFLOW_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # pragma: no cover - build without torch: JIT on first use instead
        return [], {}
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    with_cuda = bool(cu) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    # The CUDA bindings include headers that only a CUDA build of torch ships.
    host = [f for f in cpp if not f.endswith("_cuda.cpp")]
    # -fopenmp: at::parallel_for is an inline `omp parallel` region, serial without it.
    cxx = ["-O3", "-fopenmp"]
    kwargs = dict(
        name="freeflow._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            sources=cpp + cu,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            **kwargs,
        )
    else:
        ext = cpp_extension.CppExtension(sources=host, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
