"""Independent reference formulations of the 21 fusion metrics, to check `dmfuse_jax.evaluation.metrics`.

The VIFB metrics are line-by-line transcriptions of the VIFB toolbox's MATLAB (github.com/xingchenzhang/
VIFB, metrics/metrics*.m): explicit loops where MATLAB loops, MATLAB's conv2 / filter2 / imfilter /
gradient / round written out from their definitions, MATLAB's complex FFT results kept complex. The
others transcribe the MATLAB the field uses (metricZhao.m + myphasecong3.m for PC, VIFF_Public.m,
Wang's msssim.m, Piella's Q_W / Q_E, Haghighat's fmi.m is in test_metrics.py) with direct 2-D
correlations where the package uses separable or FFT filtering. Slow: for small images only.

Inputs: float64 (H, W) arrays of 8-bit values; colour: (H, W, 3). Order as VIFB calls them:
(vis, ir, fused) = (img1, img2, fused).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import signal

# ----------------------------------------------------------------------------- MATLAB primitives


def m_round(x):
    """MATLAB round / int16(): half away from zero."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def fspecial_gaussian(n, sigma):
    ax = np.arange(n) - (n - 1) / 2
    x, y = np.meshgrid(ax, ax)
    h = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    h[h < np.finfo(float).eps * h.max()] = 0
    return h / h.sum()


def filter2(h, x, shape):
    """MATLAB filter2: 2-D correlation, zero padding, 'same' (centre floor((size+1)/2)) or 'valid'."""
    return signal.correlate2d(x, h, mode=shape)


def conv2_same(x, h):
    """MATLAB conv2(x, h, 'same') for a 3x3 h, as explicit sums: out(i,j) = sum_uv x(i-u+1, j-v+1) h(u,v)."""
    m, n = x.shape
    out = np.zeros((m, n))
    for i in range(m):
        for j in range(n):
            acc = 0.0
            for u in range(3):
                for v in range(3):
                    ii, jj = i - u + 1, j - v + 1
                    if 0 <= ii < m and 0 <= jj < n:
                        acc += x[ii, jj] * h[u, v]
            out[i, j] = acc
    return out


def imfilter_replicate(x, h):
    """MATLAB imfilter(x, h, 'replicate') for a 3x3 h: correlation with replicated borders."""
    m, n = x.shape
    out = np.zeros((m, n))
    for i in range(m):
        for j in range(n):
            acc = 0.0
            for u in range(3):
                for v in range(3):
                    ii = min(max(i + u - 1, 0), m - 1)
                    jj = min(max(j + v - 1, 0), n - 1)
                    acc += x[ii, jj] * h[u, v]
            out[i, j] = acc
    return out


def m_gradient(x):
    """MATLAB [dzdx, dzdy] = gradient(x): central differences inside, one-sided at the borders."""
    m, n = x.shape
    dx, dy = np.zeros((m, n)), np.zeros((m, n))
    for i in range(m):
        for j in range(n):
            if j == 0:
                dx[i, j] = x[i, 1] - x[i, 0]
            elif j == n - 1:
                dx[i, j] = x[i, n - 1] - x[i, n - 2]
            else:
                dx[i, j] = (x[i, j + 1] - x[i, j - 1]) / 2
            if i == 0:
                dy[i, j] = x[1, j] - x[0, j]
            elif i == m - 1:
                dy[i, j] = x[m - 1, j] - x[m - 2, j]
            else:
                dy[i, j] = (x[i + 1, j] - x[i - 1, j]) / 2
    return dx, dy


def freqspace_meshgrid(m, n):
    """MATLAB [u, v] = freqspace([m n], 'meshgrid')."""
    f1 = (np.arange(n) - math.floor(n / 2)) * (2 / n)
    f2 = (np.arange(m) - math.floor(m / 2)) * (2 / m)
    return np.meshgrid(f1, f2)


def normalize1(data):
    da, xiao = data.max(), data.min()
    if da == 0 and xiao == 0:
        return data
    return m_round((data - xiao) / (da - xiao) * 255)


def blkproc(x, ws, fun):
    """MATLAB blkproc(x, [ws ws], fun): zero padded to whole blocks."""
    m, n = x.shape
    nb_m, nb_n = -(-m // ws), -(-n // ws)
    pad = np.zeros((nb_m * ws, nb_n * ws), dtype=x.dtype)
    pad[:m, :n] = x
    return np.array([[fun(pad[i * ws:(i + 1) * ws, j * ws:(j + 1) * ws]) for j in range(nb_n)]
                     for i in range(nb_m)])


# ------------------------------------------------------------------------ VIFB, metrics*.m


def entropy(img1, img2, fused):
    m, n = fused.shape
    X = np.zeros(256)
    for i in range(m):
        for j in range(n):
            X[int(math.floor(fused[i, j]))] += 1
    result = 0.0
    for k in range(256):
        P = X[k] / (m * n)
        if P != 0:
            result += P * math.log2(P)
    return -result


def variance(img1, img2, fused):
    r, c = fused.shape
    mean = sum(fused[i, j] for i in range(r) for j in range(c)) / (r * c)
    return math.sqrt(sum((fused[i, j] - mean) ** 2 for i in range(r) for j in range(c)) / (r * c))


def _mutinf(a, b):
    M, N = a.shape
    hab, ha, hb = np.zeros((256, 256)), np.zeros(256), np.zeros(256)
    a = (a - a.min()) / (a.max() - a.min()) if a.max() != a.min() else np.zeros((M, N))
    b = (b - b.min()) / (b.max() - b.min()) if b.max() != b.min() else np.zeros((M, N))
    a, b = m_round(a * 255).astype(int), m_round(b * 255).astype(int)
    for i in range(M):
        for j in range(N):
            hab[a[i, j], b[i, j]] += 1
            ha[a[i, j]] += 1
            hb[b[i, j]] += 1

    def h(x):
        p = x / x.sum()
        p = p[x != 0]
        return float(np.sum(-p * np.log(p)))

    return h(ha) + h(hb) - h(hab)


def mutinf(img1, img2, fused):
    return _mutinf(img1, fused) + _mutinf(img2, fused)


def _ssim(img1, fused):
    w = fspecial_gaussian(11, 1.5)
    C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    m, n = img1.shape
    vals = []
    for i in range(m - 10):
        for j in range(n - 10):
            a, b = img1[i:i + 11, j:j + 11], fused[i:i + 11, j:j + 11]
            ua, ub = np.sum(w * a), np.sum(w * b)
            sa = np.sum(w * a * a) - ua * ua
            sb = np.sum(w * b * b) - ub * ub
            sab = np.sum(w * a * b) - ua * ub
            vals.append(((2 * ua * ub + C1) * (2 * sab + C2)) / ((ua * ua + ub * ub + C1) * (sa + sb + C2)))
    return float(np.mean(vals))


def ssim(img1, img2, fused):
    return _ssim(img1, fused) + _ssim(img2, fused)


def spatial_frequency(img1, img2, fused):
    """metricsSpatial_frequency.m on the array as given: for an H x W x 3 array, [m, n] = size(F) makes
    n = 3W and F(i, j) indexes the array in MATLAB's column-major order."""
    m = fused.shape[0]
    n = fused.size // m
    flat = fused.flatten(order="F")

    def F(i, j):  # 1-based two-subscript indexing of the (possibly 3-D) array
        return flat[(i - 1) + (j - 1) * m]

    RF = sum((F(i, j) - F(i, j - 1)) ** 2 for i in range(1, m + 1) for j in range(2, n + 1)) / (m * n)
    CF = sum((F(i, j) - F(i - 1, j)) ** 2 for j in range(1, n + 1) for i in range(2, m + 1)) / (m * n)
    return math.sqrt(RF + CF)


def avg_gradient(img1, img2, fused):
    r, c = fused.shape
    dx, dy = m_gradient(fused)
    s = np.sqrt((dx ** 2 + dy ** 2) / 2)
    return float(np.sum(s) / ((r - 1) * (c - 1)))


def edge_intensity(img1, img2, fused):
    w = np.array([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]])  # fspecial('sobel')
    gx, gy = imfilter_replicate(fused, w), imfilter_replicate(fused, w.T)
    return float(np.mean(np.sqrt(gx * gx + gy * gy)))


def _cross_entropy(img1, fused):
    m1, n1 = img1.shape
    X1, X2 = np.zeros(256), np.zeros(256)
    for i in range(m1):
        for j in range(n1):
            X1[int(img1[i, j])] += 1
            X2[int(fused[i, j])] += 1
    result = 0.0
    for k in range(256):
        P1, P2 = X1[k] / (m1 * n1), X2[k] / (m1 * n1)
        if P1 != 0 and P2 != 0:
            result += P1 * math.log2(P1 / P2)
    return result


def cross_entropy(img1, img2, fused):
    return (_cross_entropy(img1, fused) + _cross_entropy(img2, fused)) / 2.0


def _mse(a, b):
    m, n = a.shape
    return math.sqrt(sum((a[i, j] - b[i, j]) ** 2 for i in range(m) for j in range(n))) / (m * n)


def psnr(img1, img2, fused):
    MES = (_mse(img1, fused) + _mse(img2, fused)) / 2.0
    return 20 * math.log10(255 / math.sqrt(MES))


def rmse(img1, img2, fused):
    return (_mse(img1, fused) + _mse(img2, fused)) / 2.0


def qabf(strA, strB, strF):
    Tg, kg, Dg, Ta, ka, Da = 0.9994, -15, 0.5, 0.9879, -22, 0.8
    h1 = np.array([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]])
    h3 = np.array([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])

    def grad(p):
        Sx, Sy = conv2_same(255 * p, h3), conv2_same(255 * p, h1)  # pA = 255*im2double(double(A))
        g = np.sqrt(Sx ** 2 + Sy ** 2)
        a = np.zeros_like(g)
        for i in range(g.shape[0]):
            for j in range(g.shape[1]):
                a[i, j] = math.pi / 2 if Sx[i, j] == 0 else math.atan(Sy[i, j] / Sx[i, j])
        return g, a

    gA, aA = grad(strA)
    gB, aB = grad(strB)
    gF, aF = grad(strF)

    def q(gS, aS):
        Q = np.zeros_like(gS)
        for i in range(gS.shape[0]):
            for j in range(gS.shape[1]):
                if gS[i, j] > gF[i, j]:
                    G = gF[i, j] / gS[i, j]
                elif gS[i, j] == gF[i, j]:
                    G = gF[i, j]
                else:
                    G = gS[i, j] / gF[i, j]
                A = 1 - abs(aS[i, j] - aF[i, j]) / (math.pi / 2)
                Q[i, j] = Tg / (1 + math.exp(kg * (G - Dg))) * Ta / (1 + math.exp(ka * (A - Da)))
        return Q

    QAF, QBF = q(gA, aA), q(gB, aB)
    return float(np.sum(QAF * gA + QBF * gB) / np.sum(gA + gB))


def _fft_filter(x, S):
    """ifft2(ifftshift(fftshift(fft2(x)) .* S)), kept complex as MATLAB does."""
    return np.fft.ifft2(np.fft.ifftshift(np.fft.fftshift(np.fft.fft2(x)) * S))


def qcb(im1, im2, fused):
    im1, im2, fused = normalize1(im1), normalize1(im2), normalize1(fused)
    f0, f1, a, p, q, Z = 15.3870, 1.3456, 0.7622, 3, 2, 0.0001
    hang, lie = im1.shape
    u, v = freqspace_meshgrid(hang, lie)
    u, v = lie / 30 * u, hang / 30 * v
    r = np.sqrt(u ** 2 + v ** 2)
    Sd = np.exp(-(r / f0) ** 2) - a * np.exp(-(r / f1) ** 2)
    ax = np.arange(-15, 16)
    x, y = np.meshgrid(ax, ax)
    G1 = np.exp(-(x * x + y * y) / (2 * 2 * 2)) / (2 * np.pi * 2 * 2)
    G2 = np.exp(-(x * x + y * y) / (2 * 4 * 4)) / (2 * np.pi * 4 * 4)

    def response(im):
        f = _fft_filter(im, Sd)
        C = np.abs(filter2(G1, f, "same") / filter2(G2, f, "same") - 1)
        return C ** p / (C ** q + Z)

    C1P, C2P, CfP = response(im1), response(im2), response(fused)
    mask = (C1P < CfP).astype(float)
    Q1F = (C1P / CfP) * mask + (CfP / C1P) * (1 - mask)
    mask = (C2P < CfP).astype(float)
    Q2F = (C2P / CfP) * mask + (CfP / C2P) * (1 - mask)
    ramda1 = C1P * C1P / (C1P * C1P + C2P * C2P)
    ramda2 = C2P * C2P / (C1P * C1P + C2P * C2P)
    return float(np.mean(ramda1 * Q1F + ramda2 * Q2F))


def qcv(im1, im2, fused):
    im1, im2, fused = normalize1(im1), normalize1(im2), normalize1(fused)
    ws, alpha = 16, 5
    flt1 = np.array([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    flt2 = np.array([[-1.0, -2, -1], [0, 0, 0], [1, 2, 1]])

    def G(im):
        return np.sqrt(filter2(flt1, im, "same") ** 2 + filter2(flt2, im, "same") ** 2)

    ramda1 = blkproc(G(im1), ws, lambda x: np.sum(x ** alpha))
    ramda2 = blkproc(G(im2), ws, lambda x: np.sum(x ** alpha))
    hang, lie = im1.shape
    u, v = freqspace_meshgrid(hang, lie)
    u, v = lie / 8 * u, hang / 8 * v
    r = np.sqrt(u ** 2 + v ** 2)
    theta_m = 2.6 * (0.0192 + 0.144 * r) * np.exp(-(0.144 * r) ** 1.1)
    D1 = blkproc(_fft_filter(im1 - fused, theta_m), ws, lambda x: np.mean(x ** 2))
    D2 = blkproc(_fft_filter(im2 - fused, theta_m), ws, lambda x: np.mean(x ** 2))
    return float(np.real(np.sum(ramda1 * D1 + ramda2 * D2) / np.sum(ramda1 + ramda2)))


VIFB = {"EN": entropy, "SD": variance, "MI": mutinf, "SSIM": ssim, "SF": spatial_frequency, "AG": avg_gradient,
        "EI": edge_intensity, "CE": cross_entropy, "PSNR": psnr, "RMSE": rmse, "Qabf": qabf, "Qcb": qcb, "Qcv": qcv}


def vifb_colour(name, vis, ir, fused):
    """metrics<Name>.m's wrapper for a colour fused image and a grey infrared image (b == 3, b1 == 1):
    mean over k of the metric on (vis(:,:,k), ir, fused(:,:,k)); SF, AG and EI take the 3-D array."""
    fn = VIFB[name]
    if name == "SF":
        return spatial_frequency(None, None, fused)
    if name == "EI":  # imfilter filters each plane of the 3-D array; mean(mean(mean(g)))
        return float(np.mean([edge_intensity(None, None, fused[..., k]) for k in range(3)]))
    return float(np.mean([fn(vis[..., k], ir, fused[..., k]) for k in range(3)]))


# ------------------------------------------------------------------- metrics VIFB does not define


def cc(vis, ir, fused):
    return (np.corrcoef(ir.ravel(), fused.ravel())[0, 1] + np.corrcoef(vis.ravel(), fused.ravel())[0, 1]) / 2


def scd(vis, ir, fused):
    return (np.corrcoef((fused - vis).ravel(), ir.ravel())[0, 1]
            + np.corrcoef((fused - ir).ravel(), vis.ravel())[0, 1])


def _ssim_index_maps(a, b):
    """Wang's ssim_index.m: filter2 'valid' with the 11x11 Gaussian, K = (0.01, 0.03), L = 255."""
    w = fspecial_gaussian(11, 1.5)
    C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = filter2(w, a, "valid"), filter2(w, b, "valid")
    s1 = filter2(w, a * a, "valid") - mu1 * mu1
    s2 = filter2(w, b * b, "valid") - mu2 * mu2
    s12 = filter2(w, a * b, "valid") - mu1 * mu2
    cs = (2 * s12 + C2) / (s1 + s2 + C2)
    return ((2 * mu1 * mu2 + C1) / (mu1 * mu1 + mu2 * mu2 + C1)) * cs, cs


def _msssim(a, b):
    """Wang's msssim.m: 5 levels, imfilter(x, ones(2)/4, 'symmetric', 'same') then x(1:2:end, 1:2:end)."""
    weight = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    mssim, mcs = [], []
    for level in range(5):
        s, c = _ssim_index_maps(a, b)
        mssim.append(s.mean())
        mcs.append(c.mean())
        if level < 4:
            def down(x):
                m, n = x.shape
                xp = np.pad(x, 1, mode="symmetric")  # MATLAB 'symmetric' mirrors including the edge
                # even kernel: MATLAB's centre is element (1, 1), so pixel (i, j) averages (i..i+1, j..j+1)
                out = np.array([[xp[i + 1:i + 3, j + 1:j + 3].mean() for j in range(n)] for i in range(m)])
                return out[0::2, 0::2]
            a, b = down(a), down(b)
    return float(np.prod(np.array(mcs[:4]) ** weight[:4]) * mssim[4] ** weight[4])


def ms_ssim(vis, ir, fused):
    return (_msssim(ir, fused) + _msssim(vis, fused)) / 2


def _com_vid_vind_g(ref, dist, sq):
    out = []
    for scale in range(1, 5):
        N = 2 ** (4 - scale + 1) + 1
        win = fspecial_gaussian(N, N / 5)
        if scale > 1:
            ref = filter2(win, ref, "valid")[::2, ::2]
            dist = filter2(win, dist, "valid")[::2, ::2]
        mu1, mu2 = filter2(win, ref, "valid"), filter2(win, dist, "valid")
        sigma1_sq = filter2(win, ref * ref, "valid") - mu1 * mu1
        sigma2_sq = filter2(win, dist * dist, "valid") - mu2 * mu2
        sigma12 = filter2(win, ref * dist, "valid") - mu1 * mu2
        sigma1_sq[sigma1_sq < 0] = 0
        sigma2_sq[sigma2_sq < 0] = 0
        g = sigma12 / (sigma1_sq + 1e-10)
        sv_sq = sigma2_sq - g * sigma12
        g[sigma1_sq < 1e-10] = 0
        sv_sq[sigma1_sq < 1e-10] = sigma2_sq[sigma1_sq < 1e-10]
        sigma1_sq[sigma1_sq < 1e-10] = 0
        g[sigma2_sq < 1e-10] = 0
        sv_sq[sigma2_sq < 1e-10] = 0
        sv_sq[g < 0] = sigma2_sq[g < 0]
        g[g < 0] = 0
        sv_sq[sv_sq <= 1e-10] = 1e-10
        out.append((np.log10(1 + g ** 2 * sigma1_sq / (sv_sq + sq)), np.log10(1 + sigma1_sq / sq), g))
    return out


def viff(vis, ir, fused):
    """VIFF_Public.m with Im1 = ir, Im2 = vis."""
    sq, C = 0.005 * 255 * 255, 1e-7
    p = np.array([1, 0, 0.15, 1]) / 2.15
    T1, T2 = _com_vid_vind_g(ir, fused, sq), _com_vid_vind_g(vis, fused, sq)
    F = []
    for (Z1, M1, G1), (Z2, M2, G2) in zip(T1, T2):
        L = G1 < G2
        Z12, M12 = Z2.copy(), M2.copy()
        Z12[L], M12[L] = Z1[L], M1[L]
        F.append(np.sum(Z12 + C) / np.sum(M12 + C))
    return float(np.sum(np.array(F) * p))


def _q_w(a, b, f):
    """Piella's weighted fusion quality index with Wang's SSIM per 11x11 Gaussian window ('valid'):
    sum_w c(w) [lambda(w) SSIM(a, f | w) + (1 - lambda(w)) SSIM(b, f | w)], saliency = local variance,
    lambda = s_a / (s_a + s_b) (1/2 where both are 0), c = max(s_a, s_b) / sum over windows."""
    w = fspecial_gaussian(11, 1.5)
    m, n = a.shape
    num, den = 0.0, 0.0
    sal = []
    for i in range(m - 10):
        for j in range(n - 10):
            wa, wb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
            sa = np.sum(w * wa * wa) - np.sum(w * wa) ** 2
            sb = np.sum(w * wb * wb) - np.sum(w * wb) ** 2
            sal.append((i, j, sa, sb))
    s_af, _ = _ssim_index_maps(f, a)
    s_bf, _ = _ssim_index_maps(f, b)
    for i, j, sa, sb in sal:
        lam = 0.5 if sa + sb == 0 else sa / (sa + sb)
        c = max(sa, sb)
        num += c * (lam * s_af[i, j] + (1 - lam) * s_bf[i, j])
        den += c
    return num / den


def qe(vis, ir, fused):
    """Q_E = Q_W(a, b, f) * Q_W(a', b', f') with Prewitt edge magnitudes (filter2 of [1 0 -1] x3 and its
    transpose), Piella and Heijmans 2003, alpha = 1."""
    k = np.array([[1.0, 0, -1], [1, 0, -1], [1, 0, -1]])

    def edge(x):
        return np.sqrt(filter2(k, x, "same") ** 2 + filter2(k.T, x, "same") ** 2)

    return _q_w(ir, vis, fused) * _q_w(edge(ir), edge(vis), edge(fused))


def _mef_ssim(seq, fI, K=0.03):
    """mef_ssim.m, loop for loop (window by window, norm(), the Gaussian-weighted statistics)."""
    window = fspecial_gaussian(11, 1.5)
    eps = np.finfo(float).eps
    s1, s2, s3 = seq.shape
    wsize, bd = 11, 5
    swin = np.ones((wsize, wsize)) / wsize ** 2
    mu = np.zeros((s1 - 2 * bd, s2 - 2 * bd, s3))
    ed = np.zeros_like(mu)
    for i in range(s3):
        img = seq[:, :, i]
        mu[:, :, i] = filter2(swin, img, "valid")
        sigma_sq = filter2(swin, img * img, "valid") - mu[:, :, i] ** 2
        ed[:, :, i] = np.sqrt(np.maximum(wsize ** 2 * sigma_sq, 0)) + 0.001
    R = np.zeros((s1 - 2 * bd, s2 - 2 * bd))
    for i in range(bd, s1 - bd):
        for j in range(bd, s2 - bd):
            vecs = seq[i - bd:i + bd + 1, j - bd:j + bd + 1, :].reshape(wsize * wsize, s3, order="F")
            den = sum(np.linalg.norm(vecs[:, k] - mu[i - bd, j - bd, k]) for k in range(s3))
            sv = vecs.sum(1)
            R[i - bd, j - bd] = (np.linalg.norm(sv - sv.mean()) + eps) / (den + eps)
    R[R > 1] = 1 - eps
    R[R < 0] = 0 + eps
    p = np.tan(np.pi / 2 * R)
    p[p > 10] = 10
    w_map = (ed / wsize) ** p[:, :, None] + eps
    w_map = w_map / w_map.sum(2, keepdims=True)
    max_ed = ed.max(2)
    C = (K * 255) ** 2
    q_map = np.zeros_like(R)
    wv = window.flatten(order="F")
    for i in range(bd, s1 - bd):
        for j in range(bd, s2 - bd):
            blocks = seq[i - bd:i + bd + 1, j - bd:j + bd + 1, :]
            r_block = np.zeros((wsize, wsize))
            for k in range(s3):
                r_block += w_map[i - bd, j - bd, k] * (blocks[:, :, k] - mu[i - bd, j - bd, k]) / ed[i - bd, j - bd, k]
            if np.linalg.norm(r_block) > 0:
                r_block = r_block / np.linalg.norm(r_block) * max_ed[i - bd, j - bd]
            r_vec = r_block.flatten(order="F")
            f_vec = fI[i - bd:i + bd + 1, j - bd:j + bd + 1].flatten(order="F")
            mu1, mu2 = np.sum(wv * r_vec), np.sum(wv * f_vec)
            s1sq, s2sq = np.sum(wv * (r_vec - mu1) ** 2), np.sum(wv * (f_vec - mu2) ** 2)
            s12 = np.sum(wv * (r_vec - mu1) * (f_vec - mu2))
            q_map[i - bd, j - bd] = (2 * s12 + C) / (s1sq + s2sq + C)
    return q_map.mean()


def ms_ssim_mef(vis, ir, fused):
    """analysis_ms_ssim.m (level 3, weights [0.0448 0.2856 0.3001] / sum) on imgSeq = (ir, vis)."""
    weight = np.array([0.0448, 0.2856, 0.3001])
    weight = weight / weight.sum()
    seq, f = np.stack([ir, vis], -1), fused

    def down(x):  # imfilter(x, ones(2)/4, 'symmetric', 'same'); x(1:2:end, 1:2:end)
        m, n = x.shape
        xp = np.pad(x, 1, mode="symmetric")
        return np.array([[xp[i + 1:i + 3, j + 1:j + 3].mean() for j in range(n)] for i in range(m)])[0::2, 0::2]

    Q = []
    for level in range(3):
        Q.append(_mef_ssim(seq, f))
        if level < 2:
            seq = np.stack([down(seq[:, :, k]) for k in range(seq.shape[2])], -1)
            f = down(f)
    return float(np.prod(np.array(Q) ** weight))


# --- FMI: literal port of Haghighat's fmi.m (w = 3), window by window


def _fmi_window_reference(a_sub, f_sub):
    if np.array_equal(a_sub, f_sub):
        return 1.0

    def pdf(s):
        lo, hi = s.min(), s.max()
        s = np.ones_like(s) if hi == lo else (s - lo) / (hi - lo)
        return s.flatten(order="F") / s.sum()

    a_pdf, f_pdf = pdf(a_sub), pdf(f_sub)
    a_cdf, f_cdf = np.cumsum(a_pdf), np.cumsum(f_pdf)
    at, ft = a_pdf - a_pdf.mean(), f_pdf - f_pdf.mean()
    c = 0.0 if np.sum(at * ft) == 0 else np.sum(at * ft) / np.sqrt(np.sum(at * at) * np.sum(ft * ft))
    i = np.arange(1, 10)
    a_sd = abs(np.sqrt(complex(np.sum(i * i * a_pdf) - np.sum(i * a_pdf) ** 2)))
    f_sd = abs(np.sqrt(complex(np.sum(i * i * f_pdf) - np.sum(i * f_pdf) ** 2)))
    if c >= 0:
        def bound(x, y):
            return 0.0 if x < 0 or y < 0 else 0.5 * (f_cdf[x] + a_cdf[y] - abs(f_cdf[x] - a_cdf[y]))
        zero = c == 0 or a_sd == 0 or f_sd == 0
    else:
        def bound(x, y):
            return 0.0 if x < 0 or y < 0 else 0.5 * (f_cdf[x] + a_cdf[y] - 1 + abs(f_cdf[x] + a_cdf[y] - 1))
        zero = a_sd == 0 or f_sd == 0
    if zero:
        mix = 0.0
    else:
        cov = sum(bound(x, y) - f_cdf[x] * a_cdf[y] for x in range(9) for y in range(9))
        mix = c / (cov / (f_sd * a_sd))
    joint = 0.0
    for x in range(9):
        for y in range(9):
            p = mix * (bound(x, y) - bound(x - 1, y) - bound(x, y - 1) + bound(x - 1, y - 1)) \
                + (1 - mix) * f_pdf[x] * a_pdf[y]
            if p != 0:
                joint += float(np.real(-p * np.log2(complex(p))))
    ea = -np.sum(a_pdf[a_pdf > 0] * np.log2(a_pdf[a_pdf > 0]))
    ef = -np.sum(f_pdf[f_pdf > 0] * np.log2(f_pdf[f_pdf > 0]))
    mi = ea + ef - joint
    return 0.0 if mi == 0 else 2 * mi / (ea + ef)


def fmi_reference(a, b, f):
    """Haghighat's fmi.m (w = 3) loop for loop on feature maps a, b (sources) and f (fused)."""
    h, w = f.shape
    vals = [(_fmi_window_reference(a[p - 1:p + 2, q - 1:q + 2], f[p - 1:p + 2, q - 1:q + 2])
             + _fmi_window_reference(b[p - 1:p + 2, q - 1:q + 2], f[p - 1:p + 2, q - 1:q + 2])) / 2
            for p in range(1, h - 1) for q in range(1, w - 1)]
    return float(np.mean(vals))


# --- PC: metricZhao.m (pc_assessFusion) with myphasecong3.m, float64 and the direct IFFT noise sums


def _lowpassfilter(rows, cols, cutoff, n):
    """The lowpassfilter.m that ships with Z. Liu's toolbox (fftshift of a centred Butterworth)."""
    x = (np.ones((rows, 1)) * np.arange(1, cols + 1) - (cols // 2 + 1)) / cols
    y = (np.arange(1, rows + 1)[:, None] * np.ones((1, cols)) - (rows // 2 + 1)) / rows
    radius = np.sqrt(x ** 2 + y ** 2)
    return np.fft.fftshift(1.0 / (1.0 + (radius / cutoff) ** (2 * n)))


def myphasecong3(im, nscale=4, norient=6, min_wl=3, mult=2.1, sigma_onf=0.55, d_theta=1.2, k=2.0,
                 cut_off=0.5, g=10):
    epsilon = 0.0001
    theta_sigma = np.pi / norient / d_theta
    rows, cols = im.shape
    imagefft = np.fft.fft2(im)
    zero = np.zeros((rows, cols))
    total_energy, total_sum_an = zero.copy(), zero.copy()
    covx2, covy2, covxy = zero.copy(), zero.copy(), zero.copy()
    xr = (np.arange(cols) - (cols - 1) / 2) / (cols - 1) if cols % 2 else (np.arange(cols) - cols / 2) / cols
    yr = (np.arange(rows) - (rows - 1) / 2) / (rows - 1) if rows % 2 else (np.arange(rows) - rows / 2) / rows
    x, y = np.meshgrid(xr, yr)
    radius = np.sqrt(x ** 2 + y ** 2)
    radius[rows // 2, cols // 2] = 1
    theta = np.arctan2(-y, x)
    radius, theta = np.fft.ifftshift(radius), np.fft.ifftshift(theta)
    sintheta, costheta = np.sin(theta), np.cos(theta)
    lp = _lowpassfilter(rows, cols, 0.45, 15)
    log_gabor = []
    for s in range(nscale):
        fo = 1.0 / (min_wl * mult ** s)
        lgf = np.exp(-(np.log(radius / fo)) ** 2 / (2 * np.log(sigma_onf) ** 2)) * lp
        lgf[0, 0] = 0
        log_gabor.append(lgf)
    for o in range(norient):
        angl = o * np.pi / norient
        ds = sintheta * np.cos(angl) - costheta * np.sin(angl)
        dc = costheta * np.cos(angl) + sintheta * np.sin(angl)
        spread = np.exp(-np.abs(np.arctan2(ds, dc)) ** 2 / (2 * theta_sigma ** 2))
        sum_e, sum_o, sum_an, energy = zero.copy(), zero.copy(), zero.copy(), zero.copy()
        eo, ifft_filters = [], []
        for s in range(nscale):
            filt = log_gabor[s] * spread
            ifft_filters.append(np.real(np.fft.ifft2(filt)) * np.sqrt(rows * cols))
            e = np.fft.ifft2(imagefft * filt)
            eo.append(e)
            an = np.abs(e)
            sum_an += an
            sum_e += e.real
            sum_o += e.imag
            if s == 0:
                em_n = np.sum(filt ** 2)
                max_an = an
            else:
                max_an = np.maximum(max_an, an)
        x_energy = np.sqrt(sum_e ** 2 + sum_o ** 2) + epsilon
        mean_e, mean_o = sum_e / x_energy, sum_o / x_energy
        for e in eo:
            E, O = e.real, e.imag
            energy += E * mean_e + O * mean_o - np.abs(E * mean_o - O * mean_e)
        median_e2n = np.median(np.abs(eo[0]).reshape(-1) ** 2)
        noise_power = (-median_e2n / np.log(0.5)) / em_n
        est_sum_an2 = sum(f ** 2 for f in ifft_filters)
        est_sum_aiaj = sum(ifft_filters[si] * ifft_filters[sj]
                           for si in range(nscale - 1) for sj in range(si + 1, nscale))
        est2 = 2 * noise_power * np.sum(est_sum_an2) + 4 * noise_power * np.sum(est_sum_aiaj)
        tau = np.sqrt(est2 / 2)
        T = (tau * np.sqrt(np.pi / 2) + k * np.sqrt((2 - np.pi / 2) * tau ** 2)) / 1.7
        energy = np.maximum(energy - T, zero)
        width = sum_an / (max_an + epsilon) / nscale
        weight = 1.0 / (1 + np.exp((cut_off - width) * g))
        total_sum_an += sum_an
        total_energy += weight * energy
        pc_o = weight * energy / sum_an
        covx, covy = pc_o * np.cos(angl), pc_o * np.sin(angl)
        covx2 += covx ** 2
        covy2 += covy ** 2
        covxy += covx * covy
    pc = total_energy / (total_sum_an + epsilon)
    covx2, covy2, covxy = covx2 / (norient / 2), covy2 / (norient / 2), covxy / norient
    denom = np.sqrt(covxy ** 2 + (covx2 - covy2) ** 2) + epsilon
    return pc, (covy2 + covx2 + denom) / 2, (covy2 + covx2 - denom) / 2


def _pc_correlation(im1, im2, im_max, imf, mask1, mask2, mask3):
    w = fspecial_gaussian(11, 1.5)
    C = 0.0001
    im1, im2, im_max = mask1 * im1, mask2 * im2, mask3 * im_max

    def f(x):
        return filter2(w, x, "same")

    mu1, mu2, muf, mumax = f(im1), f(im2), f(imf), f(im_max)
    s1, s2 = f(im1 * im1) - mu1 ** 2, f(im2 * im2) - mu2 ** 2
    smax, sf = f(im_max * im_max) - mumax ** 2, f(imf * imf) - muf ** 2
    s1f, s2f, smaxf = f(im1 * imf) - mu1 * muf, f(im2 * imf) - mu2 * muf, f(im_max * imf) - mumax * muf
    res1, res2, res3 = np.zeros_like(mu1), np.zeros_like(mu1), np.zeros_like(mu1)
    res1[mask1] = ((s1f + C) / (np.sqrt(np.abs(s1 * sf)) + C))[mask1]
    res2[mask2] = ((s2f + C) / (np.sqrt(np.abs(s2 * sf)) + C))[mask2]
    res3[mask3] = ((smaxf + C) / (np.sqrt(np.abs(smax * sf)) + C))[mask3]
    return np.sum(np.max(np.stack([res1, res2, res3]), axis=0)) / np.sum(mask3)


def pc(vis, ir, fused):
    """pc_assessFusion(im1 = vis, im2 = ir, fused), threshold 0.1."""
    pc1, M1, m1 = myphasecong3(vis)
    pc2, M2, m2 = myphasecong3(ir)
    pcf, Mf, mf = myphasecong3(fused)
    mask = pc1 > pc2
    pc_max = mask * pc1 + (~mask) * pc2
    M_max = mask * M1 + (~mask) * M2
    m_max = mask * m1 + (~mask) * m2
    k1, k2, k3 = pc1 > 0.1, pc2 > 0.1, pc_max > 0.1
    return (_pc_correlation(pc1, pc2, pc_max, pcf, k1, k2, k3) * _pc_correlation(M1, M2, M_max, Mf, k1, k2, k3)
            * _pc_correlation(m1, m2, m_max, mf, k1, k2, k3))


def fmi_pixel(vis, ir, fused):
    """analysis_fmi(A, B, F) on im2double images with its default feature 'edge' (MATLAB edge(I))."""
    from dmfuse_jax.evaluation.metrics import matlab_edge_sobel  # the edge map itself: test_metrics.py

    fa, fb, ff = (matlab_edge_sobel(x / 255.0) for x in (vis, ir, fused))
    return fmi_reference(fa, fb, ff)


OTHERS = {"CC": cc, "SCD": scd, "MS_SSIM": ms_ssim, "VIF": viff, "Qe": qe, "PC": pc, "FMI_pixel": fmi_pixel,
          "MS_SSIM_MEF": ms_ssim_mef}


def hand_made_triple(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic (vis, ir, fused) 8-bit images with structure: a ramp with a bright disc and bars
    (visible), a warm blob on a dark ground with a step (infrared), their weighted mix plus noise with
    a saturated corner (fused)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    vis = 40 + 120 * xx / (w - 1) + 60 * ((xx // 4) % 2) * (yy > h / 3)
    vis += 70 * (((yy - 0.4 * h) ** 2 + (xx - 0.6 * w) ** 2) < (0.18 * min(h, w)) ** 2)
    ir = 20 + 200 * np.exp(-(((yy - 0.55 * h) / (0.2 * h)) ** 2 + ((xx - 0.35 * w) / (0.15 * w)) ** 2))
    ir += 30 * (xx > 0.7 * w)
    vis = np.clip(np.floor(vis + rng.normal(0, 6, (h, w)) + 0.5), 0, 255)
    ir = np.clip(np.floor(ir + rng.normal(0, 6, (h, w)) + 0.5), 0, 255)
    fused = np.clip(np.floor(0.55 * vis + 0.45 * ir + rng.normal(0, 4, (h, w)) + 0.5), 0, 255)
    fused[:h // 4, :w // 3] = 255.0  # a saturated, flat corner: zero gradients (Qabf's gx == 0 branch)
    return vis, ir, fused


# ------------------------------------------------------------------------------------ comparison

GREY_SHAPES = ((20, 24, 0), (23, 19, 1))   # odd and even sizes; partial 16x16 Qcv blocks
MEF_SHAPE = (45, 50, 4)                    # 3-scale MEF-SSIM needs 44 pixels per side
LARGE_SHAPE = (176, 180, 2)                # MS-SSIM needs 176 pixels per side (5 scales)
LARGE_ONLY = ("MS_SSIM", "VIF")


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def largest_relative_differences() -> dict[str, float]:
    """Per metric, the largest |package - reference| / |reference| under the 'vifb' convention over the
    hand-made grey triples, and for the 13 VIFB metrics also over a colour triple (colour visible and
    fused, grey infrared) scored through `evaluate_images`, which handles VIFB's colour conventions."""
    from dmfuse_jax.evaluation import metrics as M

    table = M.CONVENTIONS["vifb"].metrics
    refs = {**VIFB, **OTHERS}
    worst = {name: 0.0 for name in table}
    for h, w, seed in (LARGE_SHAPE, MEF_SHAPE) + GREY_SHAPES:
        vis, ir, fused = hand_made_triple(h, w, seed)
        for name in table:
            if (name in LARGE_ONLY) != ((h, w, seed) == LARGE_SHAPE):
                continue
            if (name == "MS_SSIM_MEF") != ((h, w, seed) == MEF_SHAPE):
                continue
            got = table[name](ir, vis, fused)
            worst[name] = max(worst[name], _rel(got, refs[name](vis, ir, fused)))
    # colour: VIFB's per-channel wrapper (and SF on the H x 3W array) against evaluate_images
    vis, ir, fused = hand_made_triple(20, 24, 3)
    vis_c = np.stack([vis, np.flipud(vis), 255 - vis], -1)
    fused_c = np.stack([fused, np.fliplr(fused), np.clip(fused + 17, 0, 255)], -1)
    got = M.evaluate_images(ir / 255, vis_c / 255, fused_c / 255, list(VIFB), convention="vifb")
    for name in VIFB:
        worst[name] = max(worst[name], _rel(got[name], vifb_colour(name, vis_c, ir, fused_c)))
    return worst
