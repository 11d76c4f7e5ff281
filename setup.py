"""Build driver: runs CMakeLists.txt (the real build) with the Ninja generator.

The extension modules are torch-free (raw pointers + pybind11), so the isolated build
environment needs only setuptools, pybind11, cmake and ninja.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        # A cache from an earlier isolated build points at a pybind11 that no longer exists.
        shutil.rmtree(build_dir, ignore_errors=True)
        build_dir.mkdir(parents=True)
        config = "Debug" if self.debug else "Release"
        args = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DSPLITKERNELS_OUTPUT_DIR={out_dir}",
        ]
        if "SPLITKERNELS_CUDA" in os.environ:
            args.append(f"-DSPLITKERNELS_CUDA={os.environ['SPLITKERNELS_CUDA']}")
        subprocess.check_call(args)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])


setup(
    ext_modules=[CMakeExtension("splitkernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
