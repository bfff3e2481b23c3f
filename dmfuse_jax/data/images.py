"""Image files in and out: reading (8/16-bit, grey/RGB), pair matching, YCbCr, atomic writes, and
the check that an output path can be written, run before any work.

Every error names the file and the problem (`UserError`), so the CLI can print it and exit non-zero.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np

from dmfuse_jax.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


@contextlib.contextmanager
def _open_image(path: Path):
    """Opens an image with PIL; a missing file, a folder, or an unreadable/corrupt image becomes a
    `UserError` naming the file."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected an image file")
    try:
        with Image.open(path) as im:
            yield im
    except UnidentifiedImageError:
        raise UserError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{path}: cannot read image: {e}") from None


def probe_image(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) from the image header only, so bad files fail before any work; errors name the file."""
    with _open_image(Path(path)) as im:
        w, h = im.size
    return h, w


def verify_image(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) after decoding the whole image (then dropped): a truncated or corrupt file fails here,
    in seconds, before a model loads, not halfway through a run. Errors name the file."""
    with _open_image(Path(path)) as im:
        im.load()
        w, h = im.size
    return h, w


def alpha_to_01(alpha: np.ndarray) -> np.ndarray:
    """An alpha channel as float32 weights in [0, 1] (uint8 / 255, wider integers / their maximum)."""
    alpha = np.asarray(alpha)
    if alpha.dtype == np.bool_:
        return alpha.astype(np.float32)
    if np.issubdtype(alpha.dtype, np.integer):
        return alpha.astype(np.float32) / float(np.iinfo(alpha.dtype).max)
    return np.clip(alpha.astype(np.float32), 0.0, 1.0)


def composite_on_black(colour01: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Images with an alpha channel (RGBA, LA, a palette with transparency) are composited on black:
    colour x alpha. Transparent pixels become black (no signal to fuse); an opaque alpha changes
    nothing. The one alpha rule of the package (files and arrays)."""
    return np.asarray(colour01, np.float32) * alpha_to_01(alpha)


def read_image(path: str | os.PathLike, *, sixteen_bit: str = "minmax") -> np.ndarray:
    """Reads an image as float32 in [0, 1], shape (H, W, 1) for grey or (H, W, 3) for colour.

    8-bit images are divided by 255. 16-bit (and 32-bit integer/float) images, such as raw thermal
    TIFFs, are mapped with `sixteen_bit`: 'minmax' stretches the image's own min..max to 0..1 (the
    usual display mapping for radiometric thermal data); 'full' divides by 65535. RGB images whose
    three channels are equal (TNO stores grey this way) come back as grey. An alpha channel (RGBA,
    LA, a palette with transparency) is composited on black (`composite_on_black`).
    """
    path = Path(path)
    with _open_image(path) as im:
        im.load()
        mode = im.mode
        if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
            arr = np.asarray(im, dtype=np.uint16).astype(np.float32)
            high = True
        elif mode in ("I", "F"):
            arr = np.asarray(im, dtype=np.float32)
            high = True
        elif mode in ("L", "RGB"):
            arr = np.asarray(im, dtype=np.float32) / 255.0
            high = False
        elif mode == "1":
            arr = np.asarray(im, dtype=np.float32)
            high = False
        elif mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in im.info):
            rgba = np.asarray(im.convert("RGBA"))
            arr = composite_on_black(rgba[..., :3].astype(np.float32) / 255.0, rgba[..., 3:])
            high = False
        else:  # P, CMYK, YCbCr ...
            target = "L" if mode in ("LA", "La") else "RGB"
            arr = np.asarray(im.convert(target), dtype=np.float32) / 255.0
            high = False
    if high:
        arr = map_high_bit_depth(arr, sixteen_bit)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise UserError(f"{path}: unsupported image shape {arr.shape} (expected grey or RGB)")
    if arr.shape[-1] == 3 and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
        arr = arr[..., :1]
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise UserError(f"{path}: image is too small ({arr.shape[1]}x{arr.shape[0]})")
    return np.ascontiguousarray(arr, dtype=np.float32)


def map_high_bit_depth(arr: np.ndarray, sixteen_bit: str = "minmax") -> np.ndarray:
    """16-bit (or wider) values -> float32 [0, 1]: 'minmax' stretches the image's own range,
    'full' divides by 65535. A constant image maps to 0 under 'minmax'."""
    arr = np.asarray(arr, np.float32)
    if sixteen_bit == "minmax":
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if sixteen_bit == "full":
        return np.clip(arr / 65535.0, 0.0, 1.0)
    raise ValueError(f"unknown sixteen_bit mapping {sixteen_bit!r} (expected 'minmax' or 'full')")


def to_uint8(x01: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(x01, np.float32) * 255.0), 0, 255).astype(np.uint8)


def write_image_atomic(path: str | os.PathLike, x01: np.ndarray) -> None:
    """Writes a [0, 1] image (H, W), (H, W, 1) or (H, W, 3) as 8-bit PNG (or per suffix) atomically:
    to a temporary file in the same folder, then renamed, so no partial file is ever left."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = to_uint8(x01)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    _write_atomic(path, lambda f: Image.fromarray(arr).save(f, format=_pil_format(path)))


def _pil_format(path: Path) -> str:
    return {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF",
            ".tiff": "TIFF"}.get(path.suffix.lower(), "PNG")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in `folder`, sorted by name. Errors on a missing or image-less folder."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    if not files:
        raise UserError(f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def match_pairs(a_dir: str | os.PathLike, b_dir: str | os.PathLike, *,
                names: tuple[str, str] = ("infrared", "visible")) -> list[tuple[str, Path, Path]]:
    """Pairs files of two folders by file stem (extension may differ). Returns (stem, a, b) sorted.

    Any name present in only one folder is an error listing every unmatched name.
    """
    a = {p.stem: p for p in list_images(a_dir)}
    b = {p.stem: p for p in list_images(b_dir)}
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        msg = [f"unmatched image names between {a_dir} and {b_dir}:"]
        if only_a:
            msg.append(f"  only in {names[0]} folder {a_dir}: {', '.join(only_a[:20])}" + (" ..." if len(only_a) > 20 else ""))
        if only_b:
            msg.append(f"  only in {names[1]} folder {b_dir}: {', '.join(only_b[:20])}" + (" ..." if len(only_b) > 20 else ""))
        raise UserError("\n".join(msg))
    return [(k, a[k], b[k]) for k in sorted(a)]


# ITU-R BT.601 luma weights: the Y of YCbCr; an RGB-stored grey image (equal channels) maps to itself.
LUMA = (0.299, 0.587, 0.114)


def luma(x):
    """(..., 1 | 3) -> (..., 1): a colour image's BT.601 luma (the Y of `rgb_to_ycbcr`), a grey one as is.
    The one grey conversion of the package (data pipelines, colour routes, the model): numpy or jax
    arrays, dtype kept."""
    if x.shape[-1] == 1:
        return x
    if x.shape[-1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got an input of shape {tuple(x.shape)}")
    return LUMA[0] * x[..., 0:1] + LUMA[1] * x[..., 1:2] + LUMA[2] * x[..., 2:3]


# model.input_range -> the interval [lo, hi] that images in [0, 1] are mapped to for the model
# (DESIGN.md section 4: '-1_1' the paper, '0_1' the released test code).
INPUT_RANGES = {"-1_1": (-1.0, 1.0), "0_1": (0.0, 1.0)}


def _input_range(name: str) -> tuple[float, float]:
    if name not in INPUT_RANGES:
        raise UserError(f"unknown model.input_range {name!r} (expected one of {', '.join(map(repr, INPUT_RANGES))})")
    return INPUT_RANGES[name]


def to_model_range(x01, input_range: str):
    """Images in [0, 1] -> the model range of `input_range`; numpy or jax arrays, dtype kept."""
    lo, hi = _input_range(input_range)
    return x01 * (hi - lo) + lo


def from_model_range(y, input_range: str):
    """Model-range values -> [0, 1], clipped; numpy or jax arrays, dtype kept."""
    lo, hi = _input_range(input_range)
    return ((y - lo) / (hi - lo)).clip(0.0, 1.0)


# ITU-R BT.601 full-range YCbCr (as JPEG and OpenCV's RGB2YCrCb), on [0, 1] values.
def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB in [0, 1] -> (..., 3) Y, Cb, Cr in [0, 1] (chroma centred on 0.5)."""
    r, b = rgb[..., 0], rgb[..., 2]
    y = luma(rgb)[..., 0]
    cb = (b - y) * 0.564 + 0.5
    cr = (r - y) * 0.713 + 0.5
    return np.stack([y, cb, cr], axis=-1)


def ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """Inverse of `rgb_to_ycbcr`, clipped to [0, 1]."""
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 0.5, ycc[..., 2] - 0.5
    r = y + 1.403 * cr
    g = y - 0.714 * cr - 0.344 * cb
    b = y + 1.773 * cb
    return np.clip(np.stack([r, g, b], axis=-1), 0.0, 1.0)


def _write_atomic(path: Path, write) -> None:
    """Calls `write(binary_file)` on a temporary file beside `path`, then renames it into place, so
    readers never see a partial file; on any error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_output_path(path: str | os.PathLike, what: str, *, folder: bool = False) -> Path:
    """Fails early, before any work, when `path` (a file, or a folder with `folder`) cannot be written:
    it lies under a regular file, in a folder that is not writable (read-only filesystem, /proc,
    permissions), or it exists as the other kind. The error names `path` and `what` (e.g. '--out').
    Creates nothing: writability is proven by a temporary folder in the nearest existing parent, removed
    at once. Returns `path`."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{path}: {what} is a {'file' if folder else 'folder'}, expected a "
                        f"{'folder' if folder else 'file name'}")
    existing = (path if folder else path.parent).absolute()
    while not existing.exists():  # also False for a path under a regular file
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{path}: cannot create {what}: {existing} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dmfuse-write-check-", dir=existing))
    except OSError as e:
        raise UserError(f"{path}: cannot create {what}: {existing} is not writable ({e.strerror})") from None
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes a file atomically (temporary file in the same folder, then renamed)."""
    _write_atomic(Path(path), lambda f: f.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes a UTF-8 text file atomically (temporary file in the same folder, then renamed)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def image_grid(images: np.ndarray, cols: int) -> np.ndarray:
    """(N, H, W, C) -> one (rows H, cols W, C) mosaic, blank cells at the end."""
    n, h, w, c = images.shape
    rows = -(-n // cols)
    grid = np.ones((rows * h, cols * w, c), images.dtype)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    return grid
