"""The field's no-reference fusion metrics, vectorised numpy/scipy, one function per metric, in
families: `vifb` (the VIFB toolbox's information and structure metrics), `gradient` (Qabf, Qe,
FMI_pixel), `similarity` (MS_SSIM, VIF, CC, SCD) and `phase_congruency` (PC).

Every metric has the signature `fn(ir, vis, fused) -> float` on grey images given as float64 arrays of
shape (H, W) holding 8-bit grey values (0..255, integral; see `to_8bit_grey`). `CONVENTIONS` maps a
convention name to its registry (CSV name -> metric); `METRICS` is the default convention's registry,
whose order is the CSV's column order; `LOWER_IS_BETTER` names the metrics where smaller is better.

Conventions (`dmfuse evaluate --convention`). Published infrared-visible tables mostly come from the
VIFB toolbox (X. Zhang, P. Ye, G. Xiao, "VIFB: A Visible and Infrared Image Fusion Benchmark", CVPR
Workshops 2020, github.com/xingchenzhang/VIFB, `metrics/metrics*.m`):
- 'vifb' (the default) reproduces its values up to float rounding: its PSNR/RMSE helper
  sqrt(sum((a-b)^2))/(H*W), SSIM and MI SUMMED over the two sources (MI in nats on min-max stretched
  images), a colour fused image scored per R, G, B channel (a grey source reused for every channel)
  and averaged, except SF, which VIFB computes on the H x 3W array of the three channels side by side.
- 'standard' uses the textbook quantities: true-MSE PSNR/RMSE, SSIM averaged over the two sources, MI
  in bits on the images' own grey levels (summed, as Qu et al. define it); colour images are scored
  on their BT.601 luminance unless color='per-channel' (then SF too is a per-channel mean).
Both share everything else (VIFB's filters, paddings, bins; Qabf with VIFB's edge orientation). The
metrics VIFB does not define follow the MATLAB code the field uses: Z. Liu's imageFusionMetrics (PC
via Kovesi's phase congruency, Qe via `ssim_index`), Haghighat's fmi.m as analysis_Reference.m calls
it (FMI_pixel), Han's VIFF_Public.m (VIF), Wang's msssim.m (MS_SSIM) and Ma et al.'s
analysis_ms_ssim.m (MS_SSIM_MEF, the variant behind the DMFuse paper's MS-SSIM; docs/evaluation.md
lists the MS-SSIM variants). Each docstring says which.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from dmfuse_jax.evaluation.metrics._common import ssim_single, to_8bit_grey
from dmfuse_jax.evaluation.metrics.gradient import fmi, fmi_pixel, matlab_edge_sobel, qabf, qe
from dmfuse_jax.evaluation.metrics.phase_congruency import phase_congruency, phase_congruency_metric
from dmfuse_jax.evaluation.metrics.similarity import (
    correlation_coefficient, ms_ssim, ms_ssim_mef, ms_ssim_single, scd, vif)
from dmfuse_jax.evaluation.metrics.vifb import (
    average_gradient, cross_entropy, edge_intensity, entropy, mutual_information,
    mutual_information_bits, psnr, psnr_vifb, qcb, qcv, rmse, rmse_vifb, spatial_frequency,
    spatial_frequency_side_by_side, standard_deviation, structural_similarity, structural_similarity_mean)

Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], float]
# A metric VIFB computes on the whole colour image: fused channels [(H, W)] * 3 -> float.
ColourMetric = Callable[[list[np.ndarray]], float]

# ----------------------------------------------------------------------------------- registry

# CSV name -> metric under the 'vifb' convention. The order is the CSV's column order: DMFuse's
# eight (with Wang's MS-SSIM), the rest, then the paper's own MS-SSIM variant.
_VIFB_METRICS: dict[str, Metric] = {
    "EN": entropy,
    "SD": standard_deviation,
    "PC": phase_congruency_metric,
    "FMI_pixel": fmi_pixel,
    "Qe": qe,
    "Qabf": qabf,
    "MS_SSIM": ms_ssim,
    "VIF": vif,
    "SSIM": structural_similarity,
    "MI": mutual_information,
    "SF": spatial_frequency,
    "AG": average_gradient,
    "PSNR": psnr_vifb,
    "RMSE": rmse_vifb,
    "CE": cross_entropy,
    "EI": edge_intensity,
    "SCD": scd,
    "CC": correlation_coefficient,
    "Qcb": qcb,
    "Qcv": qcv,
    "MS_SSIM_MEF": ms_ssim_mef,  # appended: earlier CSVs keep their column positions
}

# Where the textbook departs from VIFB.
_STANDARD_OVERRIDES: dict[str, Metric] = {
    "PSNR": psnr,
    "RMSE": rmse,
    "SSIM": structural_similarity_mean,
    "MI": mutual_information_bits,
}

LOWER_IS_BETTER = frozenset({"RMSE", "CE", "Qcv"})
COLOR_MODES = ("luminance", "per-channel")


# ------------------------------------------------------------------------------------- colour


def _luminance_8bit(x01: np.ndarray) -> np.ndarray:
    """(H, W, C) in [0, 1] -> (H, W) 8-bit values: grey as is, colour via BT.601 Y."""
    from dmfuse_jax.data.images import rgb_to_ycbcr

    x = np.asarray(x01, np.float64)
    if x.ndim == 3 and x.shape[-1] == 3:
        x = rgb_to_ycbcr(x)[..., 0]
    return to_8bit_grey(x)


# MATLAB rgb2gray: the first row of inv([1 0.956 0.621; 1 -0.272 -0.647; 1 -1.106 1.703]).
_RGB2GRAY = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])


def _rgb2gray_8bit(x01: np.ndarray) -> np.ndarray:
    """(H, W, C) in [0, 1] -> (H, W) 8-bit values: grey as is, colour as MATLAB rgb2gray on uint8
    (weighted sum of the 8-bit channels, rounded half away from zero)."""
    x = np.asarray(x01, np.float64)
    if x.ndim == 3 and x.shape[-1] == 3:
        return np.floor(to_8bit_grey_channels(x) @ _RGB2GRAY + 0.5)
    return to_8bit_grey(x)


def to_8bit_grey_channels(x01: np.ndarray) -> np.ndarray:
    """(H, W, C) in [0, 1] -> float64 (H, W, C) of integral 8-bit values (as `to_8bit_grey`)."""
    return np.clip(np.floor(np.asarray(x01, np.float64) * 255.0 + 0.5), 0.0, 255.0)


@dataclasses.dataclass(frozen=True)
class Convention:
    """metrics: CSV name -> metric; color: the default colour mode; grey: how a colour source becomes
    grey when the fused image is grey (or in 'luminance' mode); whole_colour: metrics computed on the
    whole colour fused image in 'per-channel' mode instead of a per-channel mean."""
    metrics: dict[str, Metric]
    color: str
    grey: Callable[[np.ndarray], np.ndarray]
    whole_colour: dict[str, ColourMetric]


CONVENTIONS: dict[str, Convention] = {
    "vifb": Convention(metrics=_VIFB_METRICS, color="per-channel", grey=_rgb2gray_8bit,
                       whole_colour={"SF": spatial_frequency_side_by_side}),
    "standard": Convention(metrics={**_VIFB_METRICS, **_STANDARD_OVERRIDES}, color="luminance",
                           grey=_luminance_8bit, whole_colour={}),
}
# Published tables mostly come from VIFB's MATLAB code, so by default our numbers are comparable to them.
DEFAULT_CONVENTION = "vifb"
METRICS: dict[str, Metric] = CONVENTIONS[DEFAULT_CONVENTION].metrics


def get_convention(name: str) -> Convention:
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise ValueError(f"unknown convention {name!r} (expected one of {', '.join(CONVENTIONS)})") from None


def evaluate_images(ir01: np.ndarray, vis01: np.ndarray, fused01: np.ndarray,
                    names: list[str] | tuple[str, ...] | None = None,
                    color: str | None = None, convention: str = DEFAULT_CONVENTION) -> dict[str, float]:
    """Scores one fused image against its two sources. Images: float [0, 1], (H, W), (H, W, 1) or
    (H, W, 3), all of the same H and W.

    convention: 'vifb' or 'standard' (see the module docstring). color (default: the convention's):
    'luminance': every colour image is reduced to grey first (BT.601 luminance under 'standard', MATLAB
    rgb2gray under 'vifb'). 'per-channel': a colour fused image is scored per R, G, B channel and the
    metric averaged over the channels, a grey source being reused for every channel, a colour source
    giving its own channel (VIFB); under 'vifb', SF is VIFB's SF of the three channels side by side. A
    grey fused image is scored on grey sources in both modes.
    """
    conv = get_convention(convention)
    color = conv.color if color is None else color
    if color not in COLOR_MODES:
        raise ValueError(f"unknown colour mode {color!r} (expected one of {', '.join(COLOR_MODES)})")
    table = conv.metrics
    names = list(table) if names is None else list(names)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)} (known: {', '.join(table)})")
    fused01 = np.asarray(fused01)
    if color == "per-channel" and fused01.ndim == 3 and fused01.shape[-1] == 3:
        def channel(x, c):
            x = np.asarray(x)
            return to_8bit_grey(x[..., c] if x.ndim == 3 and x.shape[-1] == 3 else x)

        triples = [(channel(ir01, c), channel(vis01, c), channel(fused01, c)) for c in range(3)]
        whole = conv.whole_colour
    else:
        triples = [(conv.grey(ir01), conv.grey(vis01), conv.grey(fused01))]
        whole = {}
    scores = {}
    for n in names:
        if n in whole:
            scores[n] = float(whole[n]([f for _, _, f in triples]))
        else:
            scores[n] = float(np.mean([table[n](a, b, f) for a, b, f in triples]))
    return scores


__all__ = [
    "COLOR_MODES", "CONVENTIONS", "Convention", "DEFAULT_CONVENTION", "LOWER_IS_BETTER", "METRICS", "Metric",
    "average_gradient", "correlation_coefficient", "cross_entropy", "edge_intensity", "entropy",
    "evaluate_images", "fmi", "get_convention", "fmi_pixel", "matlab_edge_sobel", "ms_ssim", "ms_ssim_mef",
    "ms_ssim_single",
    "mutual_information", "mutual_information_bits", "phase_congruency", "phase_congruency_metric", "psnr",
    "psnr_vifb", "qabf", "qcb", "qcv", "qe", "rmse", "rmse_vifb", "scd", "spatial_frequency",
    "spatial_frequency_side_by_side", "ssim_single", "standard_deviation", "structural_similarity",
    "structural_similarity_mean", "to_8bit_grey", "to_8bit_grey_channels", "vif",
]
