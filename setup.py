"""Build the Cython extensions in _speedups/ into the switch._speedups package.

Every ``_speedups/<name>.pyx`` becomes ``switch._speedups.<name>``. The pure-Python paths in
``switch.codec`` stay importable when an extension is missing, so a build failure shows up as a
clear "fast path unavailable" log line and a slower switch, never as a crash.
"""

from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
extensions = [
    Extension(
        f"switch._speedups.{pyx.stem}",
        [str(pyx.relative_to(HERE))],
        extra_compile_args=["-O3"],
    )
    for pyx in sorted((HERE / "_speedups").glob("*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level="3",
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
