"""The C++ compiler of an engine's wrapper: one that links the libstdc++ this process has mapped."""

import os
import shutil
import subprocess
from pathlib import Path

# A C++ compiler for engine builds, used as given (``engine_compiler`` picks one otherwise).
ENGINE_CXX = "MUSETALK_ENGINE_CXX"


def _libstdcxx(path: str) -> Path | None:
    """``path`` resolved if it is an existing absolute file (a compiler's answer may be a bare name)."""
    candidate = Path(path)
    return candidate.resolve() if candidate.is_absolute() and candidate.is_file() else None


def loaded_libstdcxx() -> Path | None:
    """The libstdc++ this process has mapped (torch loads it), or None where there is none or no /proc."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and "/libstdc++.so" in fields[5]:
            return _libstdcxx(fields[5].strip())
    return None


def compiler_libstdcxx(compiler: str) -> Path | None:
    """The libstdc++ that ``compiler`` links a shared library against, or None if it has no shared one
    (it would then link the static archive) or does not run."""
    try:
        proc = subprocess.run(
            [compiler, "-print-file-name=libstdc++.so"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return _libstdcxx(proc.stdout.strip()) if proc.returncode == 0 else None


def engine_compiler() -> str | None:
    """The C++ compiler for an engine's wrapper: ``$MUSETALK_ENGINE_CXX`` as given, else the first of
    ``$CXX``, g++, c++ and clang++ whose libstdc++ is the one this process has mapped; None (Inductor's
    default) when none is (``check.check_step`` still guards the result)."""
    if os.environ.get(ENGINE_CXX):
        return os.environ[ENGINE_CXX]
    loaded = loaded_libstdcxx()
    if loaded is None:
        return None
    names = dict.fromkeys(filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++")))
    for name in names:
        compiler = shutil.which(name)
        if compiler and compiler_libstdcxx(compiler) == loaded:
            return compiler
    return None
