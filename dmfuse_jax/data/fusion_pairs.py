"""Stage-2 (fusion) data: paired infrared/visible folders cut into patches by a sliding window.

As the paper: 256x256 patches with a step of 12, the same window for both modalities, grey values
(a colour visible image contributes its BT.601 luma), scaled to the model range ([-1, 1] by default).
The patch index is built deterministically from the sorted pair list. With `chroma=True` each patch
also carries the visible image's colour offsets, RGB minus luma (zero for a grey image), in model-range
units, for the loss on the recoloured image (`fusion_loss.colour_gradient_loss`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dmfuse_jax.data.images import INPUT_RANGES, luma, match_pairs, probe_image, read_image, to_model_range
from dmfuse_jax.errors import UserError


def split_pairs(ir_dir, vi_dir, num_holdout: int = 0, max_pairs: int = 0):
    """Matched (name, ir, vi) pairs, split into (train, held-out). The held-out pairs are the last
    `num_holdout` names in sorted order (never trained on); `max_pairs` > 0 keeps the first ones."""
    pairs = match_pairs(ir_dir, vi_dir)
    if num_holdout >= len(pairs):
        raise UserError(f"{ir_dir}: {len(pairs)} pairs, cannot hold out {num_holdout} and train on the rest")
    train, held = (pairs[:-num_holdout], pairs[-num_holdout:]) if num_holdout > 0 else (pairs, [])
    if max_pairs > 0:
        train = train[:max_pairs]
    return train, held


def set_pairs(sets, resolve=None) -> tuple[list, list]:
    """Named pair lists over several folder pairs (a written-down split, e.g. configs/harvard_fusion.py).

    sets: {set name: {'ir_dir', 'vi_dir', 'train': names, 'heldout': names, optional 'repeat': n}}
    (names are file stems). Returns (train, held-out) lists of ('<set>/<name>', ir, vi), in the order
    given; a set's train pairs appear `repeat` times (default 1), so that its patches are drawn that
    many times as often (a set weight: the sets differ in size and in how hard they are). A name
    missing from its folders, or in both lists, is an error: held-out pairs are never trained on.
    `resolve(path, what)` maps a configured folder to a Path (default: as given)."""
    resolve = resolve or (lambda path, what: Path(path))
    train, held = [], []
    for set_name, s in sets.items():
        ir_dir, vi_dir = resolve(s["ir_dir"], f"data.sets.{set_name}.ir_dir"), resolve(s["vi_dir"], f"data.sets.{set_name}.vi_dir")
        by_name = {n: (a, b) for n, a, b in match_pairs(ir_dir, vi_dir)}
        both = sorted(set(s["train"]) & set(s["heldout"]))
        if both:
            raise UserError(f"data.sets.{set_name}: pair(s) {', '.join(both)} are in both train and heldout")
        repeat = s.get("repeat", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise UserError(f"data.sets.{set_name}.repeat: {repeat!r}, want a whole number >= 1 "
                            "(how many times the set's train pairs are listed)")
        for part, names, out, times in (("train", s["train"], train, repeat), ("heldout", s["heldout"], held, 1)):
            missing = [n for n in names if n not in by_name]
            if missing:
                raise UserError(f"data.sets.{set_name}.{part}: no pair named {', '.join(missing)} in {ir_dir} / {vi_dir}")
            for _ in range(times):
                out.extend((f"{set_name}/{n}", *by_name[n]) for n in names)
    return train, held


def check_sizes(pairs) -> list[tuple[int, int]]:
    """(height, width) per pair; any pair whose two images differ in size is an error listing all."""
    sizes, bad = [], []
    for name, a, b in pairs:
        (ha, wa), (hb, wb) = probe_image(a), probe_image(b)
        if (ha, wa) != (hb, wb):
            bad.append(f"  {name}: infrared {a} is {wa}x{ha}, visible {b} is {wb}x{hb}")
        sizes.append((ha, wa))
    if bad:
        raise UserError("infrared/visible size mismatch in " + str(len(bad)) + " pair(s):\n" + "\n".join(bad))
    return sizes


def patch_index(sizes: list[tuple[int, int]], patch: int, step: int) -> np.ndarray:
    """Sliding-window patch origins: (N, 3) int64 rows (pair, y, x), pair-major, then y, then x."""
    rows = []
    for i, (h, w) in enumerate(sizes):
        ys = np.arange(0, h - patch + 1, step)
        xs = np.arange(0, w - patch + 1, step)
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        rows.append(np.stack([np.full(yy.size, i), yy.ravel(), xx.ravel()], axis=1))
    return np.concatenate(rows, axis=0).astype(np.int64) if rows else np.zeros((0, 3), np.int64)


class PairedPatchSource:
    """Random access over all sliding-window patches of paired images.

    `source[i]` -> {'ir': (patch, patch, 1), 'vi': (patch, patch, 1)} float32 in the model range.
    Decoded pairs are cached in memory, once per process: the cache is not pickled, so a grain worker
    process starts with an empty one (and the source holds no lock: a pair decoded twice by two threads
    at once is written twice, with the same value).
    """

    def __init__(self, pairs, *, patch: int = 256, step: int = 12, input_range: str = "-1_1", chroma: bool = False):
        if not pairs:
            raise UserError("no training pairs (check data.ir_dir / data.vi_dir and data.max_pairs)")
        self.pairs = list(pairs)
        self.patch, self.step, self.input_range, self.chroma = patch, step, input_range, chroma
        sizes = check_sizes(self.pairs)
        small = [f"  {n}: {w}x{h}" for (n, _, _), (h, w) in zip(self.pairs, sizes) if h < patch or w < patch]
        if small:
            raise UserError(f"pairs smaller than the {patch}x{patch} patch (lower data.patch_size):\n" + "\n".join(small))
        self.index = patch_index(sizes, patch, step)
        self._cache: dict[int, tuple[np.ndarray, ...]] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": {}}

    def summary(self) -> str:
        return (f"{len(self.index)} patches of {self.patch}x{self.patch} (step {self.step}) "
                f"from {len(self.pairs)} pairs")

    def __len__(self) -> int:
        return len(self.index)

    def _pair(self, i: int) -> tuple[np.ndarray, ...]:
        got = self._cache.get(i)
        if got is None:
            _, a, b = self.pairs[i]
            vi = read_image(b)
            got = (to_model_range(luma(read_image(a)), self.input_range), to_model_range(luma(vi), self.input_range))
            if self.chroma:
                lo, hi = INPUT_RANGES[self.input_range]
                chroma = (vi - luma(vi)) * (hi - lo) if vi.shape[-1] == 3 else np.zeros(vi.shape[:-1] + (3,))
                got += (chroma.astype(np.float32),)  # an offset: scales with the range, does not shift
            self._cache[i] = got
        return got

    def __getitem__(self, index: int) -> dict:
        pair, y, x = (int(v) for v in self.index[int(index)])
        p = self.patch
        names = ("ir", "vi", "vi_chroma") if self.chroma else ("ir", "vi")
        return {k: np.ascontiguousarray(v[y:y + p, x:x + p]) for k, v in zip(names, self._pair(pair))}

    def __repr__(self) -> str:
        return f"PairedPatchSource({self.summary()})"


def preview_pairs(pairs, size: int, multiple: int, input_range: str = "-1_1") -> dict:
    """Held-out pairs for previews: centre crops of size x size (clipped to the smallest image and
    rounded down to `multiple`), stacked: {'ir', 'vi': (N, s, s, 1)} in the model range, 'names'."""
    if not pairs:
        return {}
    imgs = [(luma(read_image(a)), luma(read_image(b))) for _, a, b in pairs]
    s = min([size] + [min(i.shape[:2]) for i, _ in imgs])
    s -= s % multiple
    if s < multiple:
        raise UserError(f"held-out pairs are too small for a preview of size {size}")

    def crop(img):
        h, w = img.shape[:2]
        y, x = (h - s) // 2, (w - s) // 2
        return img[y:y + s, x:x + s]

    return {"ir": to_model_range(np.stack([crop(i) for i, _ in imgs]), input_range),
            "vi": to_model_range(np.stack([crop(v) for _, v in imgs]), input_range),
            "names": [n for n, _, _ in pairs]}
