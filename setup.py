"""Builds the native CPU decode core (iws_engine.kernels._cpu_decode) with CMake; everything else is in pyproject.toml.

CMakeLists.txt is the one build description (the CUDA compile-check and the sanitizer build for fuzzing use it too).
pip builds in a fresh isolated environment (its cmake and nanobind live there), so each build configures anew in
setuptools' temporary build directory.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        shutil.rmtree(build_dir, ignore_errors=True)
        cmake = shutil.which("cmake") or "cmake"
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), "-DIWS_NATIVE=ON", "-DIWS_CUDA_CHECK=OFF",
                        "-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}"], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "-j", str(os.cpu_count() or 2)], check=True)
        built = next(build_dir.glob("_cpu_decode*" + sysconfig.get_config_var("EXT_SUFFIX")))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, target)


setup(ext_modules=[Extension("iws_engine.kernels._cpu_decode", sources=[])], cmdclass={"build_ext": CMakeBuild})
