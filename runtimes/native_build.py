"""Build and locate the native ONNX Runtime custom-op library (runtimes/native/*.cc).

The library implements CGConv, PGConv and FBSConv (runtimes/OPS.md) for ONNX Runtime's CPU
execution provider. It is compiled on first use with the system's g++, and cached:

* Headers. The onnxruntime wheel ships libonnxruntime.so but no headers. We fetch Debian
  trixie's ``libonnxruntime-dev`` (ONNX Runtime 1.21 headers) with apt pointed at a private
  sources list, list directory and package cache inside our cache directory
  (``apt-get update`` + ``apt-get download``, then ``dpkg -x``): nothing is installed into the
  system and no root is needed. ``GATE2DEPLOY_ORT_INCLUDE=/dir`` uses headers you already have.
  The 1.21 C API is a subset of later versions, so the library loads in onnxruntime 1.31.
* CPU features. The library is built for baseline x86-64; the inner loops
  (isa_kernels.cc) are compiled three times (generic, AVX2+FMA, AVX-512+VNNI) and picked at
  load time by a cpuid check, so one build runs on any x86-64 machine (CI included) and still
  uses the widest vectors available. ``G2D_ISA=generic|avx2`` forces a narrower one (tests).
* Cache. ``$GATE2DEPLOY_CACHE`` or ``~/.cache/gate2deploy``; the library's file name carries a
  hash of the sources, flags and compiler, so editing a .cc file rebuilds automatically.
  Builds take a file lock, so concurrent test processes do not race.

``variant="asan"`` builds the same sources with ``-fsanitize=address,undefined`` for the
sanitizer test run (load it with the ASan runtime preloaded, see ``asan_preload``).

Command line: ``python -m gate2deploy.runtimes.native_build [--variant asan]`` prints the path.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gate2deploy.errors import UserError

NATIVE_DIR = Path(__file__).resolve().parent / "native"
DEBIAN_SUITE = "trixie"
HEADER_PACKAGE = "libonnxruntime-dev"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

# isa_kernels.cc is compiled once per entry: (namespace, extra flags).
ISA_VARIANTS = [
    ("isa_generic", []),
    ("isa_avx2", ["-mavx2", "-mfma"]),
    ("isa_avx512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma",
                    "-mprefer-vector-width=512"]),
]
COMMON_FLAGS = ["-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra",
                "-Wno-unused-parameter"]
VARIANT_FLAGS = {
    "release": ["-O3", "-DNDEBUG"],
    "asan": ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
             "-fno-sanitize-recover=undefined"],
}


def cache_dir() -> Path:
    root = os.environ.get("GATE2DEPLOY_CACHE") or Path.home() / ".cache" / "gate2deploy"
    path = Path(root) / "native"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise UserError(f"{what} failed ({' '.join(cmd[:3])} ...): " + " | ".join(tail))


def ort_include_dir() -> Path:
    """Directory holding onnxruntime_cxx_api.h (fetched from Debian on first use)."""
    env = os.environ.get("GATE2DEPLOY_ORT_INCLUDE")
    if env:
        if not (Path(env) / "onnxruntime_lite_custom_op.h").is_file():
            raise UserError(f"GATE2DEPLOY_ORT_INCLUDE={env} has no onnxruntime_lite_custom_op.h")
        return Path(env)
    target = cache_dir() / "ort-headers"
    include = target / "usr" / "include" / "onnxruntime"
    if (include / "onnxruntime_lite_custom_op.h").is_file():
        return include
    with _locked(cache_dir() / ".headers.lock"):
        if (include / "onnxruntime_lite_custom_op.h").is_file():
            return include
        _fetch_headers(target)
    return include


def _fetch_headers(target: Path) -> None:
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise UserError("cannot fetch the ONNX Runtime headers: apt-get/dpkg not found; "
                        "set GATE2DEPLOY_ORT_INCLUDE to a directory with the 1.21+ headers")
    work = Path(tempfile.mkdtemp(prefix="ort-headers-", dir=cache_dir()))
    try:
        lists = work / "lists"
        (lists / "partial").mkdir(parents=True)
        (work / "cache" / "archives" / "partial").mkdir(parents=True)
        sources = work / "sources.list"
        signed = f"[signed-by={DEBIAN_KEYRING}] " if Path(DEBIAN_KEYRING).is_file() else ""
        sources.write_text(f"deb {signed}{DEBIAN_MIRROR} {DEBIAN_SUITE} main\n")
        apt_opts = [
            "-q", "-o", f"Dir::Etc::sourcelist={sources}", "-o", "Dir::Etc::sourceparts=/dev/null",
            "-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={work / 'cache'}",
            "-o", "APT::Sandbox::User=root" if os.geteuid() == 0 else "Debug::NoLocking=1",
            "-o", "Acquire::Languages=none",
        ]
        _run(["apt-get", *apt_opts, "update"], "apt-get update (private lists)")
        _run(["apt-get", *apt_opts, "download", HEADER_PACKAGE], f"apt-get download {HEADER_PACKAGE}",
             cwd=work)
        debs = sorted(work.glob(f"{HEADER_PACKAGE}_*.deb"))
        if not debs:
            raise UserError(f"apt-get download produced no {HEADER_PACKAGE} .deb")
        extract = work / "x"
        _run(["dpkg", "-x", str(debs[0]), str(extract)], "dpkg -x")
        if target.exists():
            shutil.rmtree(target)
        os.replace(extract, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _locked:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _sources() -> list[Path]:
    return sorted(NATIVE_DIR.glob("*.cc")) + sorted(NATIVE_DIR.glob("*.h"))


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise UserError(f"C++ compiler {cxx!r} not found: install g++ (the native custom ops are "
                        "compiled on first use)")
    return cxx


def _build_hash(cxx: str, variant: str) -> str:
    h = hashlib.sha256()
    for src in _sources():
        h.update(src.name.encode())
        h.update(src.read_bytes())
    h.update(repr((COMMON_FLAGS, VARIANT_FLAGS[variant], ISA_VARIANTS)).encode())
    h.update(subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.encode())
    return h.hexdigest()[:16]


def build_library(variant: str = "release", force: bool = False) -> Path:
    """Compile (if not cached) and return the path of the custom-op shared library."""
    if variant not in VARIANT_FLAGS:
        raise UserError(f"unknown build variant {variant!r} (expected one of {sorted(VARIANT_FLAGS)})")
    if platform.machine() not in ("x86_64", "AMD64"):
        raise UserError(f"the native custom ops are built for x86-64 only, not {platform.machine()}")
    cxx = _compiler()
    out = cache_dir() / f"libgate2deploy_ops-{variant}-{_build_hash(cxx, variant)}.so"
    if out.is_file() and not force:
        return out
    include = ort_include_dir()
    with _locked(cache_dir() / f".build-{variant}.lock"):
        if out.is_file() and not force:
            return out
        flags = COMMON_FLAGS + VARIANT_FLAGS[variant] + [f"-I{include}", f"-I{NATIVE_DIR}"]
        with tempfile.TemporaryDirectory(prefix="g2d-build-", dir=cache_dir()) as tmp:
            tmp = Path(tmp)
            objects = []
            for src in sorted(NATIVE_DIR.glob("*.cc")):
                if src.name == "isa_kernels.cc":
                    for ns, isa_flags in ISA_VARIANTS:
                        obj = tmp / f"{src.stem}_{ns}.o"
                        _run([cxx, *flags, *isa_flags, f"-DG2D_ISA_NS={ns}", "-c", str(src),
                              "-o", str(obj)], f"compiling {src.name} ({ns})")
                        objects.append(obj)
                else:
                    obj = tmp / f"{src.stem}.o"
                    _run([cxx, *flags, "-c", str(src), "-o", str(obj)], f"compiling {src.name}")
                    objects.append(obj)
            link = tmp / out.name
            _run([cxx, *flags, "-shared", "-o", str(link), *map(str, objects)], "linking")
            os.replace(link, out)
    return out


def asan_preload() -> str:
    """LD_PRELOAD value for loading the sanitizer variant into Python: the compiler's
    libasan.so first (ASan must initialise before anything else), then its libstdc++, so that
    ASan's __cxa_throw interceptor finds the real one (python itself does not link libstdc++;
    without it the first C++ exception aborts with "real___cxa_throw != 0")."""
    libs = []
    for name in ("libasan.so", "libstdc++.so.6"):
        proc = subprocess.run([_compiler(), f"-print-file-name={name}"], capture_output=True,
                              text=True)
        path = Path(proc.stdout.strip())
        if not path.is_absolute() or not path.exists():
            raise UserError(f"the compiler has no {name} (needed for the sanitizer build)")
        libs.append(str(path.resolve()))
    return " ".join(libs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="release", choices=sorted(VARIANT_FLAGS))
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    try:
        print(build_library(args.variant, force=args.force))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
