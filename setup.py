"""Build the Cython extensions in _speedups/ into the switch._speedups package.

Every ``_speedups/<name>.pyx`` becomes ``switch._speedups.<name>``. The pure-Python paths in
``switch.codec`` stay importable when an extension is missing, so a build failure shows up as a
clear "fast path unavailable" log line and a slower switch, never as a crash.
"""

import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
#: SPEEDUPS_ONLY=codec,mac builds just those extensions (handy while one .pyx is being edited).
ONLY = {n for n in os.environ.get("SPEEDUPS_ONLY", "").split(",") if n}
extensions = [
    Extension(
        f"switch._speedups.{pyx.stem}",
        [str(pyx.relative_to(HERE))],
        extra_compile_args=["-O3"],
    )
    for pyx in sorted((HERE / "_speedups").glob("*.pyx"))
    if not ONLY or pyx.stem in ONLY
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level="3",
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
