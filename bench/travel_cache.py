"""A Triton cache compiled on this CPU machine for a GPU machine: the headline benchmark's kernels (the
compile-time gate's launches for sm_90, D = 128) in a directory the device call carries (`carry`), keyed as that
machine's Triton looks them up, so its first run spends its minutes timing instead of compiling.

Triton's cache key (`triton.runtime.cache.triton_key`) hashes Triton's own Python sources and its libtriton
binary. The wheels of one Triton version for other Python versions ship the same Python sources but another build of
libtriton (3.6.0: cp311 and cp312 differ only there), so a cache compiled here is found there only under the other
wheel's key. `build` takes that wheel (`pip download triton==3.6.0 --python-version 3.12 --only-binary=:all:
--no-deps -d DIR`), refuses one of another version or with other sources, and compiles under its key; `install`
(the GPU session's first step) copies the entries into the JIT's cache only where this Triton's key is the one they
were built for, and says which.

    python -m bench.travel_cache build --wheel triton-3.6.0-cp312-...whl [--out .gpu_cache]   (Triton 3.6.0 here)
    python -m bench.travel_cache install [--src .gpu_cache] [--dest ~/.triton/cache]          (on the GPU machine)
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

ONLY = ["arch=90", "d=128", "group=1"]  # the gate's jobs for the headline rows (bench.session's warm-up)
MANIFEST = "manifest.json"
DIR = ".gpu_cache"  # where build writes and the GPU session looks (git-ignored; the device call carries it)


def triton_cache_dir() -> str:
    """The directory the JIT caches compiled kernels in (TRITON_CACHE_DIR, else Triton's default)."""
    return os.environ.get("TRITON_CACHE_DIR") or os.path.expanduser("~/.triton/cache")
KEEP = (".json", ".cubin", ".ptx", ".ttgir")  # what a cache hit loads (metadata, binary), and what the gate reads


def _regroup(entry: str, keep=KEEP):
    """Point an entry's group files (__grp__*.json: absolute paths of its files) at the entry's own directory, and
    keep only the files a cache hit and the gate read; the rest (LLVM IR, TTIR, the source dump) are dropped."""
    for name in os.listdir(entry):
        if name.startswith("__grp__"):
            continue
        if not name.endswith(keep):
            os.remove(os.path.join(entry, name))
    for name in os.listdir(entry):
        if name.startswith("__grp__"):
            path = os.path.join(entry, name)
            with open(path) as f:
                group = json.load(f)
            group["child_paths"] = {c: os.path.join(os.path.abspath(entry), c) for c in group["child_paths"]
                                    if os.path.exists(os.path.join(entry, c))}
            with open(path, "w") as f:
                json.dump(group, f)


def _sha256(stream) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def wheel_key(wheel: str) -> str:
    """triton_key() as the Triton installed from `wheel` computes it: this Triton's, with the wheel's libtriton hash.
    ValueError unless the wheel is this Triton's version with the same Python sources (only then are the two
    compilers the same program, built twice)."""
    import triton
    from triton.runtime import cache
    root = os.path.dirname(triton.__file__)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        versions = {m.group(1) for n in names if (m := re.match(r"triton-([^/]+)\.dist-info/", n))}
        if versions != {triton.__version__}:
            raise ValueError(f"{os.path.basename(wheel)} holds triton {sorted(versions)}, this is triton "
                             f"{triton.__version__}: build with the GPU machine's version")
        for n in names:
            if n.startswith("triton/") and n.endswith(".py"):
                local = os.path.join(root, n[len("triton/"):])
                if not os.path.exists(local) or open(local, "rb").read() != z.read(n):
                    raise ValueError(f"{n} differs between {os.path.basename(wheel)} and this Triton: not the "
                                     "same compiler")
        so = [n for n in names if re.fullmatch(r"triton/_C/libtriton\.[\w.-]*so", n)]
        if len(so) != 1:
            raise ValueError(f"{os.path.basename(wheel)}: no single triton/_C/libtriton.so ({so})")
        with z.open(so[0]) as f:
            theirs = _sha256(f)
    with open(os.path.join(root, "_C", os.path.basename(so[0])), "rb") as f:
        ours = _sha256(f)
    key = cache.triton_key()
    if ours not in key:
        raise ValueError("this Triton's cache key does not hash its libtriton as expected; cannot rekey")
    return key.replace(ours, theirs)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def build(wheel: str, out: str, only=ONLY, workers: int = 2) -> dict:
    """Compile the gate's `only` jobs into `out` under the wheel's key, with no TRITON_* settings of this machine
    (they would enter the key); write the manifest and return it."""
    import triton
    key = wheel_key(wheel)
    os.makedirs(out, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}
    gate = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "aot_compile.py")
    with tempfile.NamedTemporaryFile("w", suffix=".key", delete=False) as f:
        f.write(key)
    start = time.time()
    try:
        r = subprocess.run([sys.executable, gate, "--workers", str(workers), "--cache-dir", os.path.abspath(out),
                            "--triton-key-file", f.name, "--only", *only], env=env, capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if r.returncode not in (0, 1):  # 1: a verdict failed, the kernels still compiled
        raise RuntimeError(f"the gate's compile failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    entries = sorted(e for e in os.listdir(out) if os.path.isdir(os.path.join(out, e)))
    for e in entries:
        _regroup(os.path.join(out, e))
    manifest = dict(triton=triton.__version__, wheel=os.path.basename(wheel), key_sha256=_digest(key),
                    only=list(only), entries=entries, compile_seconds=round(time.time() - start, 1),
                    kernels=len(re.findall(r"^sm_", r.stdout, re.M)))
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def install(src: str, dest: str) -> str:
    """Copy src's entries into the cache dest where this Triton looks them up under the key they were built for;
    a line saying what was done (a mismatch copies nothing: the kernels then compile as usual)."""
    import triton
    from triton.runtime import cache
    path = os.path.join(src, MANIFEST)
    if not os.path.exists(path):
        return f"no traveling cache at {src}"
    with open(path) as f:
        manifest = json.load(f)
    if manifest["triton"] != triton.__version__ or manifest["key_sha256"] != _digest(cache.triton_key()):
        return (f"traveling cache not used: built for triton {manifest['triton']} ({manifest['wheel']}), this is "
                f"triton {triton.__version__} with another cache key")
    os.makedirs(dest, exist_ok=True)
    copied = 0
    for e in manifest["entries"]:
        if not os.path.exists(os.path.join(dest, e)):
            shutil.copytree(os.path.join(src, e), os.path.join(dest, e))
            _regroup(os.path.join(dest, e))
            copied += 1
    return (f"traveling cache: {copied} of {len(manifest['entries'])} entries installed into {dest} "
            f"({manifest['kernels']} kernels, compiled in {manifest['compile_seconds']} s on the build machine)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.travel_cache", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the headline kernels for the GPU machine's Triton wheel")
    b.add_argument("--wheel", required=True, help="the GPU machine's Triton wheel (same version as here)")
    b.add_argument("--out", default=DIR)
    b.add_argument("--workers", type=int, default=2)
    i = sub.add_parser("install", help="on the GPU machine: copy the entries into the JIT's cache if the key matches")
    i.add_argument("--src", default=DIR)
    i.add_argument("--dest", default=triton_cache_dir())
    a = p.parse_args(argv)
    if a.cmd == "build":
        m = build(a.wheel, a.out, workers=a.workers)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(a.out) for f in fs)
        print(f"{len(m['entries'])} cache entries ({m['kernels']} kernels, {size / 2**20:.1f} MiB) for triton "
              f"{m['triton']} from {m['wheel']} in {a.out}, compiled in {m['compile_seconds']} s; carry it "
              f"(run's carry: [\"{a.out}\"])")
    else:
        print(install(a.src, a.dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
