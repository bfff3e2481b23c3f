"""Stage-1 (diffusion pretraining) data: image sources and the random crop/flip transform.

Sources are random access (grain `MapDataset.source` protocol: `__len__`, `__getitem__`) and return
`{'image': (H, W, 1 | 3) float32 in [0, 1], 'skipped': int32}`, where `skipped` counts the unreadable
files passed over to produce that element. `PretrainTransform` turns it into a training example
`{'image': (S, S, C) float32 in [-1, 1], 'skipped': int32}`. The count travels with the data (not in a
process-local counter), so it stays right with grain worker processes and several hosts: the trainer
sums it over each global batch. Sources hold no locks or open files, so they pickle (grain workers).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from dmfuse_jax.data.images import IMAGE_EXTENSIONS, is_image_file, luma, read_image, to_model_range
from dmfuse_jax.errors import UserError

log = logging.getLogger(__name__)


# Unreadable files this process has warned about (once per file and process; counts are in the data).
_WARNED: set[str] = set()


def warn_skipped(path: str, reason: str) -> None:
    if path not in _WARNED:
        _WARNED.add(path)
        log.warning("skipping unreadable image %s: %s", path, reason)


def scan_image_tree(root: str | os.PathLike) -> list[str]:
    """Every image file under `root`, recursively (COCO's train2017/ layout), as sorted relative paths."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder (pretraining image folder)")
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        out.extend(os.path.normpath(os.path.join(rel, f)) for f in filenames if is_image_file(f))
    out.sort()
    if not out:
        raise UserError(f"{root}: no images found recursively (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return out


def cached_file_list(root: str | os.PathLike, cache_path: str | os.PathLike | None) -> list[str]:
    """`scan_image_tree(root)`, cached in `cache_path` (JSON). The cache also pins the file order of a
    run, so a resumed run sees the same list even if files were added to the folder meanwhile."""
    root = str(Path(root).resolve())
    if cache_path is not None and os.path.isfile(cache_path):
        try:
            with open(cache_path) as f:
                cached = json.load(f)
            if cached.get("root") == root and cached.get("files"):
                return list(cached["files"])
            log.warning("file list cache %s is for %s, rescanning %s", cache_path, cached.get("root"), root)
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable file list cache %s: %s", cache_path, e)
    files = scan_image_tree(root)
    if cache_path is not None:
        from dmfuse_jax.data.images import write_text_atomic
        write_text_atomic(cache_path, json.dumps({"root": root, "files": files}))
    return files


class ImageFolderSource:
    """Random access over every image under a folder tree.

    A corrupt or unreadable file is skipped: the next readable file (in list order) is returned
    instead, with a warning (once per file and process) and the number of files passed over in the
    element's `skipped`. Deterministic, so resume and multi-process runs see the same substitutions.
    """

    def __init__(self, root: str | os.PathLike, *, cache_path: str | os.PathLike | None = None):
        self.root = Path(root)
        self.files = cached_file_list(root, cache_path)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        n = len(self.files)
        for k in range(min(n, 64)):
            path = self.root / self.files[(int(index) + k) % n]
            try:
                return {"image": read_image(path), "skipped": np.int32(k)}
            except (UserError, OSError, ValueError) as e:
                warn_skipped(str(path), str(e))
        raise UserError(f"{self.root}: 64 consecutive images could not be read (see the warnings above)")

    def __repr__(self) -> str:
        return f"ImageFolderSource({str(self.root)!r}, {len(self.files)} images)"


class TfdsSource:
    """`tfds.data_source(name)` (e.g. 'coco/2017'): random access over a prepared TFDS dataset stored
    as ArrayRecord (no tf.data), its 'image' feature as [0, 1] floats. Pickles (grain workers).

    Needs tensorflow-datasets, and TensorFlow for the COCO builder: pip install 'dmfuse-jax[tfds]'.
    The dataset must be prepared first (docs/training.md): `tfds build coco/2017 --data_dir DIR
    --file_format array_record`.
    """

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise UserError("data.source='tfds' needs tensorflow-datasets: pip install 'dmfuse-jax[tfds]'") from e
        self.name = name
        where = data_dir or "the default TFDS folder (~/tensorflow_datasets or $TFDS_DATA_DIR)"
        build = (f"prepare it with: tfds build {name} --file_format array_record"
                 + (f" --data_dir {data_dir}" if data_dir else "") + " (or use data.source='folder')")
        try:
            # download=False: never start a download (COCO: ~20 GB, on every host) inside a training run.
            self.source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
        except ImportError as e:  # the dataset's builder code imports TensorFlow (COCO's does)
            raise UserError(f"tfds dataset {name!r} needs TensorFlow ({e}): pip install 'dmfuse-jax[tfds]'") from None
        except (tfds.core.registered.DatasetNotFoundError, AssertionError, FileNotFoundError,
                NotImplementedError) as e:  # NotImplementedError: no data, or TFRecord (not random access)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"tfds dataset {name!r} split {split!r} is not prepared as ArrayRecord in {where} "
                            f"({first}); " + build) from None
        if len(self.source) == 0:
            raise UserError(f"tfds dataset {name!r} split {split!r} is empty")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        img = np.asarray(self.source[int(index)]["image"], np.float32) / 255.0
        return {"image": img[..., None] if img.ndim == 2 else img, "skipped": np.int32(0)}

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {len(self)} images)"


def resize_image(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear (antialiased) resize of (H, W, C) float32 in [0, 1]."""
    from PIL import Image

    chans = [np.asarray(Image.fromarray(img[..., c]).resize((width, height), Image.BILINEAR), np.float32)
             for c in range(img.shape[-1])]
    return np.stack(chans, axis=-1)


def to_channels(img: np.ndarray, color: str, channels: int) -> np.ndarray:
    """(H, W, 1 | 3) -> (H, W, channels): 'grey' takes the BT.601 luma (repeated if channels == 3),
    'rgb' keeps colour (a grey image is repeated)."""
    if color == "grey":
        if img.shape[-1] == 3:
            img = luma(img)
        return np.repeat(img, channels, axis=-1) if channels != 1 else img
    if color == "rgb":
        if channels != 3:
            raise UserError(f"data.color='rgb' needs a 3-channel UNet, the config has in_channels={channels}")
        return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img
    raise UserError(f"unknown data.color {color!r} (expected 'grey' or 'rgb')")


class PretrainTransform:
    """{'image': (H, W, C) in [0, 1], 'skipped'} -> {'image': (size, size, channels) float32 in [-1, 1],
    'skipped'}.

    mode 'random_crop': the shorter side is resized to `size` if smaller, then a random square crop;
    mode 'resize': the whole image resized to size x size. Then a random horizontal flip.
    Used as a grain `random_map` callable: `transform(image, rng)`.
    """

    def __init__(self, size: int, channels: int, color: str = "grey", mode: str = "random_crop",
                 flip: bool = True):
        if mode not in ("random_crop", "resize"):
            raise UserError(f"unknown data.crop {mode!r} (expected 'random_crop' or 'resize')")
        self.size, self.channels, self.color, self.mode, self.flip = size, channels, color, mode, flip

    def __call__(self, element: dict, rng: np.random.Generator) -> dict:
        img, s = element["image"], self.size
        if self.mode == "resize":
            img = resize_image(img, s, s)
        else:
            h, w = img.shape[:2]
            if min(h, w) < s:
                scale = s / min(h, w)
                img = resize_image(img, max(s, round(h * scale)), max(s, round(w * scale)))
                h, w = img.shape[:2]
            y = int(rng.integers(0, h - s + 1))
            x = int(rng.integers(0, w - s + 1))
            img = img[y:y + s, x:x + s]
        if self.flip and rng.random() < 0.5:
            img = img[:, ::-1]
        img = to_channels(np.clip(img, 0.0, 1.0), self.color, self.channels)
        return {"image": np.ascontiguousarray(to_model_range(img, "-1_1"), dtype=np.float32),
                "skipped": np.int32(element.get("skipped", 0))}
