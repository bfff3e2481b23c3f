"""The written-down train / held-out split of the Harvard medical sets (issue 23).

Each set (MRI-CT 21 pairs, MRI-PET 42, MRI-SPECT 73; pairs named by file stem) is split once, with
`numpy.random.default_rng(SEED).permutation` over its sorted names: the first round(n / 3) names of
the permutation are held out, the rest are for training. `split(names)` recomputes it; the lists below
are its output, written out so that the split does not depend on numpy's generator staying the same
(tests/test_medical.py checks they agree). The held-out pairs are never trained on
(`configs/harvard_fusion.py` trains on TRAIN only and refuses an overlap); every medical table of
`benchmarks/quality_tno.py --split heldout` is scored on HELDOUT only.
"""
from __future__ import annotations

import numpy as np

SEED = 23

# set name -> (first-modality folder = MRI, the model's infrared role; second-modality folder),
# relative to the shared data folder.
FOLDERS: dict[str, tuple[str, str]] = {
    "mri_ct": ("harvard/MRI_CT/MRI", "harvard/MRI_CT/CT"),
    "mri_pet": ("harvard/MRI_PET/MRI", "harvard/MRI_PET/PET"),
    "mri_spect": ("harvard/MRI_SPECT/MRI", "harvard/MRI_SPECT/SPECT"),
}


def split(names, seed: int = SEED) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Sorted pair names -> (train, held-out), each sorted; about 2/3 and 1/3."""
    names = sorted(names)
    perm = np.random.default_rng(seed).permutation(len(names))
    n_held = round(len(names) / 3)
    held = {names[i] for i in perm[:n_held]}
    return tuple(n for n in names if n not in held), tuple(n for n in names if n in held)


# split(names of the folder) for each set, as computed at SEED (MRI-CT 14 + 7, MRI-PET 28 + 14,
# MRI-SPECT 49 + 24: 91 train and 45 held-out pairs).
TRAIN: dict[str, tuple[str, ...]] = {
    "mri_ct": ("11", "13", "15", "16", "17", "19", "20", "21", "25", "26", "27", "28", "29", "31"),
    "mri_pet": ("11", "12", "13", "14", "15", "16", "17", "19", "20", "22", "23", "25", "26", "28", "30", "31",
                "32", "36", "39", "40", "41", "42", "43", "45", "46", "47", "49", "50"),
    "mri_spect": ("11", "12", "14", "15", "16", "17", "19", "20", "22", "23", "25", "26", "27", "28", "30", "31",
                  "32", "33", "36", "41", "42", "43", "45", "46", "47", "48", "49", "53", "54", "56", "57", "58",
                  "59", "60", "61", "62", "63", "64", "65", "67", "69", "71", "72", "73", "75", "78", "81", "82",
                  "83"),
}
HELDOUT: dict[str, tuple[str, ...]] = {
    "mri_ct": ("12", "14", "18", "22", "23", "24", "30"),
    "mri_pet": ("18", "21", "24", "27", "29", "33", "34", "35", "37", "38", "44", "48", "51", "52"),
    "mri_spect": ("13", "18", "21", "24", "29", "34", "35", "37", "38", "39", "40", "44", "50", "51", "52", "55",
                  "66", "68", "70", "74", "76", "77", "79", "80"),
}
