"""Build the Cython extensions in _speedups/ into the switch._speedups package.

Every ``_speedups/<name>.pyx`` becomes ``switch._speedups.<name>``. The pure-Python paths in
``switch.codec`` stay importable when an extension is missing, so a build failure shows up as a
clear "fast path unavailable" log line and a slower switch, never as a crash.
"""

import os
import tempfile
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
#: SPEEDUPS_ONLY=codec,mac builds just those extensions (handy while one .pyx is being edited).
ONLY = {n for n in os.environ.get("SPEEDUPS_ONLY", "").split(",") if n}


def openssl_sha256_links() -> bool:
    """Whether a program using OpenSSL's SHA256_* functions compiles and links here (libssl-dev's
    headers and libcrypto). The ledger extension then hashes through libcrypto directly; without
    them it builds anyway and hashes through hashlib (same bytes, ~1 us more per entry)."""
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    cc = new_compiler()
    customize_compiler(cc)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text(
            "#define OPENSSL_SUPPRESS_DEPRECATED\n#include <openssl/sha.h>\n"
            "int main(void) { SHA256_CTX c; unsigned char md[32];\n"
            "  return !(SHA256_Init(&c) && SHA256_Update(&c, md, 0) && SHA256_Final(md, &c)); }\n"
        )
        try:
            objs = cc.compile([str(src)], output_dir=tmp)
            cc.link_executable(objs, str(Path(tmp) / "probe"), libraries=["crypto"])
        except Exception:  # CompileError, LinkError: no OpenSSL development files
            return False
    return True


def extension(pyx: Path) -> Extension:
    options: dict = {"extra_compile_args": ["-O3"]}
    if pyx.stem == "ledger" and openssl_sha256_links():
        options.update(define_macros=[("SWITCH_OPENSSL_SHA256", "1")], libraries=["crypto"])
    return Extension(f"switch._speedups.{pyx.stem}", [str(pyx.relative_to(HERE))], **options)


extensions = [
    extension(pyx) for pyx in sorted((HERE / "_speedups").glob("*.pyx")) if not ONLY or pyx.stem in ONLY
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level="3",
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
