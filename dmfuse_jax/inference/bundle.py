"""Inference bundles: a folder with the config and the params only (no optimizer state), orbax format.

  BUNDLE/dmfuse_bundle.json   marker + metadata (format version, stored param dtype, source)
  BUNDLE/config.json          the full config (`ConfigDict.to_json`)
  BUNDLE/params/              orbax PyTree checkpoint of {'unet': ..., 'head': ...}
  BUNDLE/export/              optional: the `jax.export` artefact (see `export.py`)

Params may be stored as float32, bfloat16 or float16 (a small default bundle); they are always
loaded back as float32 (the compute dtype is the config's `model.dtype`). A bundle is written to a
temporary folder beside its destination and renamed into place, so no half-written bundle exists.
"""
from __future__ import annotations

import datetime
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
FORMAT = "dmfuse-inference-bundle"
VERSION = 1
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
    """Before any work: `out` can be created as a folder, and does not exist unless `overwrite`."""
    from dmfuse_jax.data.images import check_output_path

    check_output_path(out, "--out", folder=True)
    if Path(out).exists() and not overwrite:
        raise UserError(f"{Path(out).absolute()}: already exists (pass --overwrite to replace it)")


def write_folder_atomic(out: str | os.PathLike, fill: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Creates folder `out` by calling fill(tmp) on a temporary sibling, then renaming it into place.

    An existing `out` is an error unless `overwrite` (then it is replaced only after `fill` succeeded).
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a bundle is an ordinary folder
    old = None
    try:
        fill(tmp)
        if out.exists():
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


def save_params(path: Path, params: Any, store_dtype: str = "float32") -> None:
    """Writes a numpy param tree with orbax (synchronously) after casting floats to `store_dtype`."""
    import jax
    import orbax.checkpoint as ocp

    dt = _store_dtype(store_dtype)
    tree = jax.tree_util.tree_map(lambda a: np.asarray(a).astype(dt), params)
    ckptr = ocp.PyTreeCheckpointer()
    ckptr.save(Path(path).absolute(), tree)


def restore_params(path: Path) -> Any:
    """orbax PyTree checkpoint -> numpy float32 tree."""
    import jax
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    restore_args = jax.tree_util.tree_map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    got = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), got)


def write_bundle_into(folder: Path, config, params: Any, *, store_dtype: str = "float32",
                      source: str = "") -> None:
    """Fills an (empty, new) folder with a bundle. Use `save_bundle` for the atomic version."""
    from dmfuse_jax import __version__

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_params(folder / PARAMS_DIR, params, store_dtype)
    (folder / CONFIG_FILE).write_text(config_to_json(config))
    import jax
    meta = {
        "format": FORMAT, "version": VERSION, "param_dtype": store_dtype,
        "compute_dtype": str(config.model.get("dtype", "float32")),
        "params": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params))),
        "source": str(source), "dmfuse_jax": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
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
    return meta


def load_bundle(path: str | os.PathLike):
    """-> (config, float32 numpy params, meta). Errors name the bundle and the broken part."""
    path = Path(path)
    meta = read_meta(path)
    try:
        config = config_from_json((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path / CONFIG_FILE}: unreadable bundle config: {e}") from None
    if not (path / PARAMS_DIR).is_dir():
        raise UserError(f"{path / PARAMS_DIR}: missing: the bundle {path} has no params")
    try:
        params = restore_params(path / PARAMS_DIR)
    except Exception as e:  # noqa: BLE001 - any orbax failure means the bundle's params are unusable
        raise UserError(f"{path / PARAMS_DIR}: cannot restore params: {type(e).__name__}: {str(e)[:300]}") from None
    return config, params, meta


def folder_bytes(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
