"""Inference bundles: a folder with the config and the params only (no optimizer state), orbax format.

  BUNDLE/dmfuse_bundle.json   marker + metadata (format version, stored param dtype, source), the
                              manifest (the sha256 of every param array's stored bytes) and the
                              layout of params.bin (each array's tree path, dtype, shape, offset)
  BUNDLE/config.json          the full config (`ConfigDict.to_json`)
  BUNDLE/params.bin           the params {'unet': ..., 'head': ...}: every array's bytes, C order,
                              64-byte aligned, in one file (version 3)
  BUNDLE/params/              version 2 bundles (still read): an orbax PyTree checkpoint instead
  BUNDLE/export/              optional: the `jax.export` artefact (see `export.py`)

Why one flat file: loading is one read of the file, a sha256 per array and a cast to float32, about
1.5x the time of reading and hashing the bytes; orbax took 0.5-0.7 s for the default model's 44 MiB
(407 arrays), on the start-up path of every `dmfuse fuse` (see `benchmarks/startup.py`).

Params may be stored as float32, bfloat16 or float16 (a small default bundle); they are always
loaded back as float32 (the compute dtype is the config's `model.dtype`). A bundle is written to a
temporary folder beside its destination and renamed into place, so no half-written bundle exists.
Loading checks every array against the manifest (a flipped byte is a `UserError` naming the file and
the array). `--overwrite` replaces only a folder that is a bundle (its marker) holding nothing but a
bundle's files: never a workdir or a folder of the user's.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dmfuse_jax.config_lib import config_from_json  # noqa: F401  (re-exported)
from dmfuse_jax.errors import UserError

MARKER = "dmfuse_bundle.json"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
PARAMS_FILE = "params.bin"
FORMAT = "dmfuse-inference-bundle"
# 3: the params in one flat file (PARAMS_FILE) laid out by the marker's 'layout'.
# 2: an orbax checkpoint (PARAMS_DIR) with the sha256 manifest of the params ('arrays'); still read.
# 1: no manifest: refused (rebuild from its source: a workdir, npz or .pth files).
VERSION = 3
CHECKSUM = "sha256"
ALIGN = 64
# What a bundle folder holds; `--overwrite` refuses a folder with anything else in it.
BUNDLE_ENTRIES = frozenset({MARKER, CONFIG_FILE, PARAMS_DIR, PARAMS_FILE, "export"})
STORE_DTYPES = ("float32", "bfloat16", "float16")


def is_bundle(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def _store_dtype(name: str):
    import jax.numpy as jnp
    if name not in STORE_DTYPES:
        raise ValueError(f"unknown param storage dtype {name!r} (expected one of {', '.join(STORE_DTYPES)})")
    return jnp.dtype(name)


def config_to_json(config) -> str:
    return config.to_json_best_effort(indent=2, sort_keys=True) + "\n"


def check_bundle_out(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Before any work: `out` can be created as a folder, and does not exist unless `overwrite`
    (then it must be a bundle this project wrote, see `check_replaceable`)."""
    from dmfuse_jax.data.images import check_output_path

    check_output_path(out, "--out", folder=True)
    if Path(out).exists():
        if not overwrite:
            raise UserError(f"{Path(out).absolute()}: already exists (pass --overwrite to replace it)")
        check_replaceable(out)


def check_replaceable(out: str | os.PathLike) -> None:
    """UserError unless `out` is a folder holding a bundle (its marker names the bundle format) and
    nothing else: `--overwrite` must never delete a training workdir or the user's files."""
    out = Path(out).absolute()
    if not out.is_dir():
        raise UserError(f"{out}: --overwrite replaces only an inference bundle; this is a file")
    entries = sorted(p.name for p in out.iterdir())
    shown = ", ".join(entries[:8]) + (" ..." if len(entries) > 8 else "") or "nothing"
    try:
        meta = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{out}: not an inference bundle (no valid {MARKER}; it holds {shown}): --overwrite "
                        "replaces only a bundle dmfuse wrote; nothing was changed, choose another --out")
    other = [e for e in entries if e not in BUNDLE_ENTRIES]
    if other:
        raise UserError(f"{out}: a bundle that also holds {', '.join(other[:8])}: --overwrite would delete "
                        "them; nothing was changed, move them out or choose another --out")


def write_folder_atomic(out: str | os.PathLike, fill: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Creates folder `out` by calling fill(tmp) on a temporary sibling, then renaming it into place.

    An existing `out` is an error unless `overwrite` and it is a bundle (`check_replaceable`); it is
    replaced only after `fill` succeeded, by renames, so a failed write leaves it whole.
    """
    out = Path(out).absolute()
    if out.exists():
        if not overwrite:
            raise UserError(f"{out}: already exists (pass --overwrite to replace it)")
        check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a bundle is an ordinary folder
    old = None
    try:
        fill(tmp)
        if out.exists():
            check_replaceable(out)  # again: it may have changed while `fill` ran
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "x")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists() and (old / "x").exists():
            os.rename(old / "x", out)  # put the previous version back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def array_sha256(a: np.ndarray) -> str:
    """sha256 (hex) of an array's bytes (C order, its own dtype): the manifest's content hash."""
    return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).hexdigest()


def manifest(tree: Any) -> dict[str, str]:
    """{array path (jax keystr): sha256 of its bytes} of a numpy tree."""
    import jax
    return {jax.tree_util.keystr(k): array_sha256(np.asarray(a))
            for k, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


def verify_manifest(tree: Any, expected: dict[str, str], where: str) -> None:
    """UserError naming `where` and the first array whose bytes do not match `expected`."""
    got = manifest(tree)
    if set(got) != set(expected):
        diff = sorted(set(got) ^ set(expected))
        raise UserError(f"{where}: arrays differ from the manifest ({', '.join(diff[:4])}"
                        f"{' ...' if len(diff) > 4 else ''}): the bundle is damaged; rebuild or re-download it")
    for name in sorted(expected):
        if got[name] != expected[name]:
            raise UserError(f"{where}: array {name} fails its {CHECKSUM} check (the file is damaged): "
                            "rebuild or re-download the bundle")


def save_flat(path: Path, params: Any, store_dtype: str = "float32") -> tuple[dict[str, str], dict[str, dict]]:
    """Writes a numpy param tree as one flat file (floats cast to `store_dtype`); returns its
    manifest (sha256 of each stored array) and layout ({keystr: keys, dtype, shape, offset})."""
    import jax

    dt = _store_dtype(store_dtype)
    arrays, layout, offset = {}, {}, 0
    with open(path, "wb") as f:
        for k, a in jax.tree_util.tree_flatten_with_path(params)[0]:
            a = np.ascontiguousarray(np.asarray(a).astype(dt))
            pad = -offset % ALIGN
            f.write(b"\0" * pad)
            offset += pad
            name = jax.tree_util.keystr(k)
            layout[name] = {"keys": [getattr(p, "key", str(p)) for p in k], "dtype": str(a.dtype),
                            "shape": list(a.shape), "offset": offset}
            arrays[name] = array_sha256(a)
            f.write(a.reshape(-1).view(np.uint8).data)
            offset += a.nbytes
    return arrays, layout


def restore_flat(path: Path, layout: dict[str, dict], expected: dict[str, str]) -> Any:
    """A flat params file -> numpy float32 tree, every array checked against `expected` first.
    One read of the file; arrays are views of it until the float32 cast."""
    import jax.numpy as jnp

    try:
        data = np.fromfile(path, np.uint8)
    except OSError as e:
        raise UserError(f"{path}: cannot read the params: {e}") from None
    if set(layout) != set(expected):
        raise UserError(f"{path}: the layout and the manifest name different arrays: the bundle is damaged")
    tree: dict = {}
    for name in sorted(layout):
        row = layout[name]
        dt = jnp.dtype(row["dtype"])
        n = int(np.prod(row["shape"], dtype=np.int64)) * dt.itemsize
        start = int(row["offset"])
        if start < 0 or start + n > data.size:
            raise UserError(f"{path}: array {name} lies past the end of the file (truncated?): rebuild or "
                            "re-download the bundle")
        raw = data[start:start + n]
        if hashlib.sha256(raw).hexdigest() != expected[name]:
            raise UserError(f"{path}: array {name} fails its {CHECKSUM} check (the file is damaged): "
                            "rebuild or re-download the bundle")
        node = tree
        for key in row["keys"][:-1]:
            node = node.setdefault(key, {})
        node[row["keys"][-1]] = raw.view(dt).reshape(row["shape"]).astype(np.float32)
    return tree


def restore_params(path: Path, expected: dict[str, str] | None = None) -> Any:
    """(version 2 bundles) orbax PyTree checkpoint -> numpy float32 tree; with `expected` (a manifest), every stored
    array is checked against it first (UserError on a mismatch)."""
    import jax
    import orbax.checkpoint as ocp

    from dmfuse_jax.workdir import settle_reads_before_closing_loops

    settle_reads_before_closing_loops()  # a damaged file: one error, not a traceback per array
    path = Path(path).absolute()
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    restore_args = jax.tree_util.tree_map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    got = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    if expected is not None:
        verify_manifest(got, expected, str(path))
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), got)


def write_bundle_into(folder: Path, config, params: Any, *, store_dtype: str = "float32",
                      source: str = "") -> None:
    """Fills an (empty, new) folder with a bundle. Use `save_bundle` for the atomic version."""
    from dmfuse_jax import __version__

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays, layout = save_flat(folder / PARAMS_FILE, params, store_dtype)
    (folder / CONFIG_FILE).write_text(config_to_json(config))
    import jax
    meta = {
        "format": FORMAT, "version": VERSION, "param_dtype": store_dtype,
        "compute_dtype": str(config.model.get("dtype", "float32")),
        "params": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params))),
        "source": str(source), "dmfuse_jax": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checksum": CHECKSUM, "arrays": arrays, "layout": layout,
    }
    # The marker is written last: a folder with a marker is a complete bundle.
    (folder / MARKER).write_text(json.dumps(meta, indent=2) + "\n")


def save_bundle(out: str | os.PathLike, config, params: Any, *, store_dtype: str = "float32",
                source: str = "", overwrite: bool = False,
                extra: Callable[[Path], None] | None = None) -> Path:
    """Writes a bundle at `out` atomically; `extra(tmp_folder)` may add files (e.g. the export)."""
    _store_dtype(store_dtype)

    def fill(tmp: Path) -> None:
        write_bundle_into(tmp, config, params, store_dtype=store_dtype, source=source)
        if extra is not None:
            extra(tmp)
    return write_folder_atomic(out, fill, overwrite=overwrite)


def read_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path / MARKER}: unreadable bundle marker: {e}") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path / MARKER}: not a dmfuse inference bundle (format {meta.get('format')!r})")
    if int(meta.get("version", 0)) > VERSION:
        raise UserError(f"{path}: bundle format version {meta['version']} is newer than this dmfuse-jax "
                        f"understands ({VERSION}); upgrade dmfuse-jax")
    if meta.get("checksum") != CHECKSUM or not isinstance(meta.get("arrays"), dict):
        raise UserError(f"{path / MARKER}: no {CHECKSUM} manifest of the params (a version "
                        f"{meta.get('version')} bundle), so its params cannot be verified: rebuild it from "
                        "its source (dmfuse export / convert-npz / convert-torch)")
    return meta


def load_bundle(path: str | os.PathLike):
    """-> (config, float32 numpy params, meta). Errors name the bundle and the broken part."""
    path = Path(path)
    meta = read_meta(path)
    try:
        config = config_from_json((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path / CONFIG_FILE}: unreadable bundle config: {e}") from None
    if int(meta.get("version", 0)) >= 3:
        if not isinstance(meta.get("layout"), dict) or not (path / PARAMS_FILE).is_file():
            raise UserError(f"{path / PARAMS_FILE}: missing (or no layout in {MARKER}): the bundle {path} has no params")
        return config, restore_flat(path / PARAMS_FILE, meta["layout"], meta["arrays"]), meta
    if not (path / PARAMS_DIR).is_dir():
        raise UserError(f"{path / PARAMS_DIR}: missing: the bundle {path} has no params")
    try:
        params = restore_params(path / PARAMS_DIR, meta["arrays"])
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any orbax failure means the bundle's params are unusable
        raise UserError(f"{path / PARAMS_DIR}: cannot restore params: {type(e).__name__}: {str(e)[:300]}") from None
    return config, params, meta


def params_bytes(path: str | os.PathLike) -> int:
    """Bytes of a bundle's stored params (either version)."""
    path = Path(path)
    return (path / PARAMS_FILE).stat().st_size if (path / PARAMS_FILE).is_file() else folder_bytes(path / PARAMS_DIR)


def folder_bytes(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
