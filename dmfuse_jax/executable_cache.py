"""A disk cache of compiled executables (and of the param shapes a config needs), so that a warm
`dmfuse fuse` neither traces nor lowers nor compiles: it loads.

Why: JAX's persistent compilation cache saves XLA's compile, but a hit still traces and lowers the
whole model to compute its key (about 1.3 s per bucket for the default model on 2 CPU cores), and
`check_params_fit` traces the model's init once more (1.5 s). Here an entry is found by a key made of
everything that changes the program, computed without tracing:

- the caller's program identity (for the fuser: the model/diffusion config, dtype, UNet passes,
  batch, bucket shape and the params' shapes and dtypes);
- `environment()`: jax and jaxlib versions, backend, platform version, device kind and count, the
  host CPU (XLA:CPU code is built for it), XLA_FLAGS / LIBTPU_INIT_ARGS, dmfuse's compile options,
  x64 and matmul precision, and a digest of dmfuse_jax's own source files.

An entry is one file `NAME-KEY.bin`: a JSON header line (the whole identity, the payload's length and
sha256) and the payload. It is used only when its header's identity equals the current one and the
payload's sha256 matches; anything else (stale, foreign, truncated, an executable this jaxlib cannot
load) is reported in one line and recompiled, and the entry rewritten. Entries are written to a
temporary file in the same folder and renamed, so two processes may share the folder: a reader sees
a whole entry or none.

The folder is `executables/` inside JAX's persistent compilation cache folder, whenever that cache is
on (`compilation.enable_persistent_cache`, which `dmfuse fuse` and `dmfuse train` call, or JAX's own
JAX_COMPILATION_CACHE_DIR), so `--compilation-cache off|DIR` and `DMFUSE_COMPILATION_CACHE` govern
both; `DMFUSE_EXECUTABLE_CACHE=off` turns this one off alone (JAX's cache then still serves the
compile).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

FORMAT = "dmfuse-executable-cache-1"
SUBDIR = "executables"
OFF_ENV = "DMFUSE_EXECUTABLE_CACHE"
_OFF = ("0", "off", "false", "no", "none")

# A cache folder set by `configure` (None: follow JAX's persistent cache).
_FOLDER: list[Path | None] = [None]


def configure(compilation_cache_dir: str | os.PathLike | None) -> Path | None:
    """Puts the cache in COMPILATION_CACHE_DIR/executables whatever JAX's cache does (None: follow
    JAX's cache again). Returns `folder()`."""
    _FOLDER[0] = None if compilation_cache_dir is None else Path(compilation_cache_dir) / SUBDIR
    return folder()


def folder() -> Path | None:
    """This process's cache folder, or None when the cache is off."""
    if os.environ.get(OFF_ENV, "").strip().lower() in _OFF:
        return None
    if _FOLDER[0] is not None:
        return _FOLDER[0]
    import jax

    base = jax.config.jax_compilation_cache_dir
    return Path(base) / SUBDIR if base and jax.config.jax_enable_compilation_cache else None


@functools.lru_cache(maxsize=None)
def source_digest() -> str:
    """sha256 over dmfuse_jax's .py files (path and bytes): a code change is a new program."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _host_cpu() -> str:
    """The host CPU's model and feature flags (XLA:CPU compiles for them), hashed."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return hashlib.sha256("\n".join(sorted(set(keep))).encode()).hexdigest()[:16]


def environment() -> dict[str, Any]:
    """What, besides the program, decides a compiled executable (read now, not cached: a test may
    change a version or a flag)."""
    import jax
    import jaxlib

    from dmfuse_jax import __version__, compilation

    dev = jax.devices()[0]
    return {
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
        "platform_version": getattr(dev.client, "platform_version", ""), "device_kind": dev.device_kind,
        "devices": jax.device_count(), "host_cpu": _host_cpu() if dev.platform == "cpu" else "",
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", ""),
        "compiler_options": compilation.compiler_options(), "x64": bool(jax.config.jax_enable_x64),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "dmfuse_jax": __version__, "source": source_digest(),
    }


def entry_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:40]


def _path(name: str, identity: dict) -> Path | None:
    base = folder()
    return None if base is None else base / f"{name}-{entry_key(identity)}.bin"


def read(name: str, program: dict, notes: list[str] | None = None) -> bytes | None:
    """The payload stored for `program` (+ `environment()`), or None (a miss, or an entry that is not
    whole or not this program's: then a note says why)."""
    identity = {"format": FORMAT, "name": name, "program": program, "environment": environment()}
    path = _path(name, identity)
    if path is None or not path.is_file():
        return None
    why = None
    try:
        with open(path, "rb") as f:
            header = json.loads(f.readline())
            payload = f.read()
        if header.get("identity") != json.loads(json.dumps(identity, sort_keys=True, default=str)):
            why = "it was made for another program or environment"
        elif len(payload) != header.get("bytes") or hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            why = "its payload fails its sha256 check"
    except (OSError, ValueError, AttributeError) as e:
        why = f"unreadable ({type(e).__name__})"
    if why:
        _note(notes, f"executable cache: {path.name} not used ({why}); compiling")
        return None
    return payload


def write(name: str, program: dict, payload: bytes) -> Path | None:
    """Stores `payload` for `program` atomically (temporary file + rename); None when the cache is
    off or the folder is not writable (a warning, never an error: the cache is an optimisation)."""
    identity = {"format": FORMAT, "name": name, "program": program, "environment": environment()}
    path = _path(name, identity)
    if path is None:
        return None
    header = {"identity": identity, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
              "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide entries from a shared folder's other users
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(header, sort_keys=True, default=str).encode() + b"\n")
            f.write(payload)
        os.replace(tmp, path)
        return path
    except OSError as e:
        log.warning("executable cache %s not writable (%s); continuing without storing", path.parent, e)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        return None


def _note(notes: list[str] | None, line: str) -> None:
    if notes is not None:
        notes.append(line)
    else:
        log.warning(line)


def load_or_compile(name: str, program: dict, trace: Callable[[], Any], in_tree, out_tree,
                    notes: list[str] | None = None, timings: dict | None = None):
    """A compiled executable for `program`: deserialized from the cache when it holds a whole entry
    of this program and environment, else `trace().lower().compile()` (then stored; `trace`: e.g.
    `lambda: jitted.trace(*args)`). `in_tree`/`out_tree`: the executable's argument and result tree
    structures (known to the caller without tracing). `timings` gets 'load_s', or 'trace_s' +
    'lower_s' + 'compile_s', added, and 'loaded' or 'compiled' counted. With the cache on, the
    compile bypasses JAX's persistent cache (`_without_jax_cache`), which this cache replaces for
    these programs."""
    from jax.experimental import serialize_executable

    timings = {} if timings is None else timings
    t = time.perf_counter()
    payload = read(name, program, notes)
    if payload is not None:
        try:
            exe = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
            timings["load_s"] = timings.get("load_s", 0.0) + time.perf_counter() - t
            timings["loaded"] = timings.get("loaded", 0) + 1
            return exe
        except Exception as e:  # noqa: BLE001 - a jaxlib that cannot load it: compile instead
            _note(notes, f"executable cache: {name} entry not loadable ({type(e).__name__}: {str(e)[:120]}); compiling")
    t = time.perf_counter()
    traced = trace()
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    if folder() is not None:  # this cache stores it: a fresh compile (see `_without_jax_cache`)
        with _without_jax_cache():
            exe = lowered.compile()
    else:  # off: JAX's persistent cache serves the compile as usual
        exe = lowered.compile()
    t3 = time.perf_counter()
    for k, dt in (("trace_s", t1 - t), ("lower_s", t2 - t1), ("compile_s", t3 - t2)):
        timings[k] = timings.get(k, 0.0) + dt
    timings["compiled"] = timings.get("compiled", 0) + 1
    if folder() is not None:
        try:
            payload, stored_in, stored_out = serialize_executable.serialize(exe)
        except Exception as e:  # noqa: BLE001 - a backend that cannot serialize: just do not store
            log.info("executable cache: %s not serializable (%s)", name, e)
        else:
            if stored_in == in_tree and stored_out == out_tree:
                write(name, program, payload)
            else:  # the caller's trees are wrong: a later load would misbind arguments
                log.warning("executable cache: %s trees differ from the caller's; not stored", name)
    return exe


class _without_jax_cache:
    """Compiles bypassing JAX's persistent cache. Why: on XLA:CPU (jaxlib 0.10.2) an executable that
    JAX's cache deserialized serializes into an entry that loads but fails at its first run
    ("NOT_FOUND: Function ... fusion not found"); only a fresh compile serializes whole. Uses JAX's
    private cache switch (`compilation_cache.reset_cache`); where that is missing, nothing changes."""

    def __enter__(self):
        import jax

        self._prev = None
        try:
            from jax._src import compilation_cache
        except ImportError:  # another jax layout: compile as JAX would
            return self
        self._cc = compilation_cache
        self._prev = bool(jax.config.jax_enable_compilation_cache)
        if self._prev:
            jax.config.update("jax_enable_compilation_cache", False)
            compilation_cache.reset_cache()
        return self

    def __exit__(self, *exc):
        import jax

        if self._prev:
            jax.config.update("jax_enable_compilation_cache", True)
            self._cc.reset_cache()
        return False


def cached_json(name: str, program: dict, compute: Callable[[], Any], notes: list[str] | None = None) -> Any:
    """`compute()` (a JSON value) for `program`, through the cache."""
    payload = read(name, program, notes)
    if payload is not None:
        try:
            return json.loads(payload)
        except ValueError:
            pass
    value = compute()
    write(name, program, json.dumps(value).encode())
    return value
