"""DDFM (dmfuse_jax.ddfm) against the DDFM authors' own code (../shared/golden/ddfm, NCHW arrays):
the guided-diffusion UNet + converter, the EM step, the whole DDIM + EM sampler (per step), the
full-size OpenAI config by shape evaluation, the PyTorch reference, and `dmfuse fuse --method ddfm`
/ `dmfuse convert-torch --guided-diffusion` on tiny priors, bad inputs included."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import DATA, GOLDEN, ROOT

from dmfuse_jax.cli import main

DDFM = GOLDEN / "ddfm"
TINY_KW = dict(image_size=64, num_channels=32, num_res_blocks=1, channel_mult="1,2,2", learn_sigma=True,
               attention_resolutions="32,16", num_head_channels=16, use_scale_shift_norm=True,
               resblock_updown=True, dropout=0.0)


def nhwc(a):
    return np.moveaxis(np.asarray(a), -3, -1)


@pytest.fixture(scope="module")
def state_dict():
    from dmfuse_jax.ddfm.priors import load_state_dict
    return load_state_dict(DDFM / "ddfm_unet_tiny.pth")


@pytest.fixture(scope="module")
def tiny_unet(state_dict):
    from dmfuse_jax.ddfm import convert_guided_diffusion
    return convert_guided_diffusion(state_dict, TINY_KW)


def test_tiny_config_file_is_the_golden_create_model_call():
    from dmfuse_jax.config_lib import load_config
    from dmfuse_jax.ddfm.config import model_config
    assert dict(load_config(str(ROOT / "configs" / "ddfm_tiny.py")).model) == dict(model_config(**TINY_KW))


def test_unet_matches_the_authors_guided_diffusion_unet(tiny_unet):
    import jax
    module, params = tiny_unet
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == 1_422_278
    d = np.load(DDFM / "ddfm_unet_tiny_io.npz")
    out = jax.jit(module.apply)({"params": params}, nhwc(d["x"]), d["t"])
    assert out.shape == (2, 64, 64, 6)
    err = np.abs(np.asarray(out) - nhwc(d["out"])).max()
    assert err <= 1e-4, f"guided-diffusion UNet differs from the golden output by {err}"


def test_converter_lists_missing_unexpected_and_misshaped_keys(state_dict):
    from dmfuse_jax.ddfm import convert_guided_diffusion
    from dmfuse_jax.errors import UserError
    sd = dict(state_dict)
    del sd["out.2.bias"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["input_blocks.0.0.weight"] = np.zeros((32, 1, 3, 3), np.float32)
    with pytest.raises(UserError) as e:
        convert_guided_diffusion(sd, TINY_KW, source="bad.pth")
    msg = str(e.value)
    assert msg.startswith("bad.pth:")
    assert "missing keys (1): out.2.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "mis-shaped keys (1): input_blocks.0.0.weight (32, 1, 3, 3)" in msg
    with pytest.raises(UserError, match="unknown create_model arguments: colour"):
        convert_guided_diffusion(state_dict, {**TINY_KW, "colour": 1})


def test_full_size_openai_config_by_shape_evaluation():
    """The authors' prior (552.8 M params): output shape, and every key/shape of the PyTorch model
    (built on torch's meta device) is what the converter expects. Nothing is allocated."""
    import jax
    import jax.numpy as jnp
    from dmfuse_jax.config_lib import load_config
    from dmfuse_jax.ddfm.config import build_guided_unet
    from dmfuse_jax.ddfm.convert import state_dict_shapes

    config = load_config(str(ROOT / "configs" / "ddfm_openai256.py"))
    module = build_guided_unet(config.model)
    assert module.attention_resolutions == (8, 16, 32) and module.total_stride == 32
    x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    params = jax.eval_shape(module.init, jax.random.PRNGKey(0), x, t)
    out = jax.eval_shape(module.apply, params, x, t)
    assert (out.shape, out.dtype) == ((2, 256, 256, 6), jnp.float32)
    torch = pytest.importorskip("torch")
    from torch_references.ddfm import UNetModel
    with torch.device("meta"):
        ref = UNetModel(**dict(config.model))
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert state_dict_shapes(module) == want
    assert sum(int(np.prod(s)) for s in want.values()) == sum(x.size for x in jax.tree_util.tree_leaves(params))


def test_em_steps_match_the_authors_em_onestep():
    import jax
    from dmfuse_jax.ddfm.em import em_initial, em_onestep
    d = np.load(DDFM / "ddfm_em_io.npz")
    I, V = d["I"][:, 0], d["V"][:, 0]
    state = em_initial(I)
    step = jax.jit(lambda f, s: em_onestep(f, I, V, s, lamb=0.5, rho=0.001))
    for k in range(3):
        F, state = step(d[f"f_pre{k}"][:, 0], state)
        for name, got in [("F", F)] + [(n, getattr(state, n)) for n in ("C", "D", "F1", "F2", "H")]:
            want = d[f"{name}{k}"][:, 0]
            # C and D reach ~8e4 (1/|residual|): compared relative to their size
            err = (np.abs(np.asarray(got) - want) / np.maximum(1.0, np.abs(want))).max()
            assert err <= 1e-5, f"EM step {k}: {name} off by {err}"
        for name in ("tau_a", "tau_b"):
            assert abs(float(getattr(state, name)[0]) - float(d[f"{name}{k}"])) <= 1e-5, f"EM step {k}: {name}"


def _golden_sampler(module):
    from dmfuse_jax.ddfm.sampler import Sampler
    from dmfuse_jax.diffusion.respace import named_beta_schedule, respaced_tables
    tables = respaced_tables(named_beta_schedule("linear", 1000), "10")
    return Sampler(module, "guided_diffusion", tables, lamb=0.5, rho=0.001)


def test_sampler_matches_the_authors_ddim_em_loop_at_every_step(tiny_unet):
    from dmfuse_jax.ddfm.sampler import jitted_sample
    module, params = tiny_unet
    d = np.load(DDFM / "ddfm_sample_io.npz")
    sampler = _golden_sampler(module)
    np.testing.assert_array_equal(sampler.tables.timestep_map, d["timestep_map"])
    np.testing.assert_allclose(sampler.tables.alphas_cumprod, d["alphas_cumprod"], rtol=1e-12)
    x, steps = jitted_sample(sampler, True)(params, nhwc(d["x_start"]), d["I"][:, 0], d["V"][:, 0])
    errs = [float(np.abs(np.asarray(s) - nhwc(w)).max()) for s, w in zip(steps, d["steps"])]
    print("DDFM sampler, max |error| per step:", " ".join(f"{e:.2e}" for e in errs))
    assert errs[0] <= 1e-4, f"first step off by {errs[0]}"
    assert max(errs) <= 1e-3, f"per-step errors {errs}"
    np.testing.assert_array_equal(np.asarray(x), np.asarray(steps[-1]))


def test_chunked_sampling_is_the_sampler_and_pairs_keep_their_own_em_state(tiny_unet):
    """What the CLI runs (chunks of steps, for the progress bar), on a batch of two pairs: the golden
    pair still comes out as the authors' (its EM state is its own, not averaged over the batch)."""
    import jax.numpy as jnp
    from dmfuse_jax.ddfm.sampler import chunk_length, jitted_chunk
    module, params = tiny_unet
    d = np.load(DDFM / "ddfm_sample_io.npz")
    sampler = _golden_sampler(module)
    xs = np.concatenate([nhwc(d["x_start"])[:, ::-1], nhwc(d["x_start"])])
    I = np.concatenate([d["V"][:, 0], d["I"][:, 0]])
    V = np.concatenate([d["I"][:, 0] * 0.5, d["V"][:, 0]])
    assert chunk_length(10) == 10 and chunk_length(100) == 10 and chunk_length(7) == 7 and chunk_length(97) == 1
    carry = sampler.init(xs, I)
    fn = jitted_chunk(sampler, 5)
    for start in (0, 5):
        carry = fn(params, carry, I, V, jnp.int32(start))
    x = np.asarray(carry[0])
    err = np.abs(x[1:] - nhwc(d["sample"])).max()
    assert err <= 1e-3, f"chunked sampling, batched: the golden pair is off by {err}"
    assert np.abs(x[0] - x[1]).max() > 0.1


def test_torch_reference_reproduces_the_golden_vectors():
    torch = pytest.importorskip("torch")
    from torch_references.ddfm import UNetModel, ddim_em_sample
    model = UNetModel(**TINY_KW).eval()
    model.load_state_dict(torch.load(DDFM / "ddfm_unet_tiny.pth", map_location="cpu", weights_only=True))
    d = np.load(DDFM / "ddfm_sample_io.npz")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only contend
    try:
        with torch.no_grad():
            _, steps = ddim_em_sample(model, torch.from_numpy(d["x_start"]), torch.from_numpy(d["I"]),
                                      torch.from_numpy(d["V"]), d["timestep_map"], d["alphas_cumprod"], record=True)
    finally:
        torch.set_num_threads(threads)
    errs = [float(np.abs(s.numpy() - w).max()) for s, w in zip(steps, d["steps"])]
    assert errs[0] <= 1e-4 and max(errs) <= 1e-3, errs


# ---- the command ----

def _pair(tmp_path, h=40, w=52):
    from dmfuse_jax.data.images import read_image
    for mod, sub in (("ir", "ir"), ("vi", "vi")):
        img = read_image(DATA / "tno" / sub / "07.png")[100:100 + h, 60:60 + w]
        (tmp_path / mod).mkdir(exist_ok=True)
        Image.fromarray(np.rint(img[..., 0] * 255).astype(np.uint8)).save(tmp_path / mod / "a.png")
    return tmp_path / "ir", tmp_path / "vi"


def test_fuse_method_ddfm_with_a_guided_diffusion_prior_file(tmp_path, capsys):
    """--prior a .pth + a DDFM config; 37x50 is reflect-padded to 40x52 (--bucket 4, the stride) and cropped back."""
    ir, vi = _pair(tmp_path, 37, 50)
    rc = main(["fuse", "--method", "ddfm", "--prior", str(DDFM / "ddfm_unet_tiny.pth"),
               "--config", str(ROOT / "configs" / "ddfm_tiny.py"), "--steps", "4", "--bucket", "4", "--ir", str(ir),
               "--vis", str(vi), "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    out = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert out.shape == (37, 50) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255  # min-max stretched
    assert "DDFM (4 steps, seed 3407) with prior guided_diffusion" in capsys.readouterr().out


def test_sr3_npz_prior_and_convert_torch_bundle_load(tmp_path, tiny_config):
    """A flat npz of SR3 UNet params (the layout of ../shared/weights) + its DMFuse config loads as the
    'sr3' prior; `convert-torch --guided-diffusion` writes a bundle that loads back as the .pth."""
    import jax
    from flax.traverse_util import flatten_dict
    from dmfuse_jax.ddfm.priors import load_prior
    from dmfuse_jax.inference.fuser import random_params

    unet = random_params(tiny_config, seed=1)["unet"]
    npz = tmp_path / "unet.npz"
    np.savez(npz, **{"/".join(k): np.asarray(v, np.float16) for k, v in flatten_dict(unet).items()})
    p = load_prior(npz, config=str(ROOT / "configs" / "tiny.py"))
    assert p.kind == "sr3" and p.stride == 16 and len(p.betas) == tiny_config.diffusion.num_timesteps
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b, np.float16)), p.params, unet)

    assert main(["convert-torch", "--guided-diffusion", str(DDFM / "ddfm_unet_tiny.pth"),
                 "--config", str(ROOT / "configs" / "ddfm_tiny.py"), "--out", str(tmp_path / "gd")]) == 0
    a = load_prior(tmp_path / "gd")
    b = load_prior(DDFM / "ddfm_unet_tiny.pth", config=str(ROOT / "configs" / "ddfm_tiny.py"))
    assert a.kind == b.kind == "guided_diffusion" and a.module == b.module
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.params, b.params)


@pytest.mark.parametrize("extra, message", [
    (["--prior", "nope.pt"], "nope.pt: no such prior"),
    (["--prior", "{npz}"], "needs --config"),
    (["--prior", "{pth}", "--config", "{tiny}"], "does not fit the guided-diffusion config"),
    (["--prior", "{pth}", "--config", "{ddfm_tiny}", "--steps", "0"], "--steps 0"),
    (["--prior", "{pth}", "--config", "{ddfm_tiny}", "--steps", "2000"], "--steps 2000"),
    (["--prior", "{pth}", "--config", "{ddfm_tiny}", "--bucket", "6"],
     "--bucket 6: must be a positive multiple of the prior's stride 4"),
    (["--prior", "{pth}", "--config", "{tiny_sr3}"], "the DDFM config is for prior 'sr3'"),
])
def test_fuse_method_ddfm_bad_inputs_name_the_problem(tmp_path, capsys, extra, message):
    ir, vi = _pair(tmp_path, 8, 8)
    np.savez(tmp_path / "p.npz", x=np.zeros(1))
    (tmp_path / "sr3.py").write_text("from dmfuse_jax.ddfm.config import ddfm_config\n"
                                     "def get_config():\n    return ddfm_config(prior='sr3')\n")
    fill = {"tiny_sr3": str(tmp_path / "sr3.py"),"npz": str(tmp_path / "p.npz"), "pth": str(DDFM / "ddfm_unet_tiny.pth"),
            "tiny": str(ROOT / "configs" / "tiny.py"), "ddfm_tiny": str(ROOT / "configs" / "ddfm_tiny.py")}
    extra = [e.format(**fill) for e in extra]
    rc = main(["fuse", "--method", "ddfm", *extra, "--ir", str(ir), "--vis", str(vi), "--out", str(tmp_path / "o"),
               "--no-progress"])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_prior_is_a_ddfm_option_only(tmp_path, capsys):
    ir, vi = _pair(tmp_path, 8, 8)
    assert main(["fuse", "--method", "average", "--prior", "x.pt", "--ir", str(ir), "--vis", str(vi),
                 "--out", str(tmp_path / "o")]) == 2
    assert "--prior is a --method ddfm option" in capsys.readouterr().err


def test_method_is_checked_at_parse_time_and_library_errors_name_parameters(tmp_path, capsys):
    """A --method typo fails in argparse, before any input is looked at; the library's own errors name
    its parameters (`steps`, `method`), not the command's flags."""
    from dmfuse_jax.ddfm.fuser import DDFMFuser, SettingError
    from dmfuse_jax.ddfm.priors import load_prior
    from dmfuse_jax.errors import UserError
    from dmfuse_jax.evaluation.baselines import BASELINES
    from dmfuse_jax.commands.fuse import BASELINE_METHODS, MODEL_METHODS
    from dmfuse_jax.inference.fuser import MethodFuser

    assert BASELINE_METHODS == tuple(BASELINES) and set(MODEL_METHODS) == {"ddfm"}
    with pytest.raises(SystemExit) as e:
        main(["fuse", "--method", "avrage", "--ir", str(tmp_path / "none"), "--vis", str(tmp_path / "none"),
              "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'avrage'" in err and "no such file" not in err
    with pytest.raises(UserError, match=r"^method 'avrage': unknown method"):
        MethodFuser(method="avrage")
    prior = load_prior(DDFM / "ddfm_unet_tiny.pth", config=str(ROOT / "configs" / "ddfm_tiny.py"))
    with pytest.raises(SettingError, match=r"^steps 0: must be >= 1$") as e:
        DDFMFuser(prior=prior, steps=0)
    assert (e.value.name, e.value.value) == ("steps", 0)
    ir, vi = _pair(tmp_path, 8, 8)
    assert main(["fuse", "--method", "average", "--steps", "3", "--ir", str(ir), "--vis", str(vi),
                 "--out", str(tmp_path / "o")]) == 2
    assert "--steps is a --method ddfm option" in capsys.readouterr().err


def test_fuse_method_ddfm_turns_on_the_compilation_cache_first(tmp_path, capsys, monkeypatch):
    """--compilation-cache reaches the ddfm path, before the prior loads (and so before any compile)."""
    from dmfuse_jax import compilation
    calls = []
    monkeypatch.setattr(compilation, "enable_persistent_cache", lambda path=None: calls.append(path))
    ir, vi = _pair(tmp_path, 8, 8)
    rc = main(["fuse", "--method", "ddfm", "--prior", str(tmp_path / "nope.pt"), "--compilation-cache",
               str(tmp_path / "xla"), "--ir", str(ir), "--vis", str(vi), "--out", str(tmp_path / "o")])
    assert rc == 2 and "nope.pt: no such prior" in capsys.readouterr().err
    assert calls == [str(tmp_path / "xla")]
