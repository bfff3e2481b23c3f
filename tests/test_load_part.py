"""`inference.checkpoints.load_part`: the one place that decides what a weights path is (bundle,
workdir, .pth, .npz), with one error vocabulary; used by `resolve`, `config.init` and DDFM priors."""
from __future__ import annotations

import numpy as np
import pytest

from dmfuse_jax.conversion import npz as npz_lib
from dmfuse_jax.errors import UserError
from dmfuse_jax.inference import bundle as bundle_lib
from dmfuse_jax.inference.checkpoints import load_part
from dmfuse_jax.models.params import param_shapes, random_params


def _same(a, b):
    import jax
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_a_bundle_and_a_flat_npz_give_the_same_part_and_other_paths_are_named_errors(tmp_path, tiny_config):
    params = random_params(tiny_config, seed=3)
    shapes = param_shapes(tiny_config)
    bundle = bundle_lib.save_bundle(tmp_path / "b", tiny_config, params)
    whole = tmp_path / "whole.npz"
    np.savez(whole, **{f"{part}/{k}": v for part in ("unet", "head") for k, v in npz_lib.flatten(params[part]).items()})
    head_only = tmp_path / "head.npz"
    np.savez(head_only, **npz_lib.flatten(params["head"]))
    for part in ("unet", "head"):
        for path in (bundle, whole):
            got = load_part(path, part, shapes[part], key="--x", what=f"the {part}")
            assert _same(got, params[part]), (path, part)
    assert _same(load_part(head_only, "head", shapes["head"], key="--x", what="the head"), params["head"])
    with pytest.raises(UserError, match=r"missing.*: no such file or folder \(init.unet_params\)"):
        load_part(tmp_path / "missing", "unet", shapes["unet"], key="init.unet_params", what="the UNet")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(UserError, match=r"w.txt: not weights dmfuse reads \(--prior\)"):
        load_part(tmp_path / "w.txt", "unet", shapes["unet"], key="--prior", what="the UNet")
    with pytest.raises(UserError, match=r"head.npz: does not fit this config's UNet"):
        load_part(head_only, "unet", shapes["unet"], key="init.unet_params", what="this config's UNet")
    other = dict(shapes["head"])
    other.pop(sorted(other)[0])
    with pytest.raises(UserError, match="b: does not fit the smaller head"):
        load_part(bundle, "head", other, key="--x", what="the smaller head")
