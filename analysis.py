"""
Latent-space analysis (the paper's RQ4): do the perspectives live in distinct regions of the
student's representation space?

    python analysis.py --model out/ckpt --data data/demo_perspectives.jsonl --out out/analysis
    python analysis.py --specialists out/spec --data data/demo_perspectives.jsonl --out out/spec_analysis
    python analysis.py --encoder PATH_TO_all-MiniLM-L6-v2 --data data/demo_perspectives.jsonl --out out/minilm
    python analysis.py --embeddings out/minilm/embeddings.npz --pca-dim 16 --out out/minilm16   # refit only

One vector per (question, perspective) rationale -- the mean-pooled hidden state of a student
(or of a sentence encoder) over the rationale tokens -- is centred per question, standardised,
reduced with PCA and clustered by a Dirichlet-process Gaussian mixture fitted by truncated
stick-breaking variational inference (Blei & Jordan 2006), written here in numpy. The clusters
are scored against the perspective labels (effective clusters, NMI, ARI, purity) and drawn in
2-D (PCA and t-SNE). Outputs in --out: analysis.json, embeddings.npz, projection.png, elbo.png,
contingency.png.

With --specialists DIR the study is the paper's: one `sft` student per perspective
(DIR/<key>/ckpt, trained through train.py when missing), and each perspective's rationales are
encoded by its own specialist.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from eval import write_json
from perspectives import KEYS, read_training_jsonl

# -----------------------------------------------------------------------------
# Special functions in numpy (the DPMM must not depend on scipy)

_lgamma = np.frompyfunc(math.lgamma, 1, 1)


def gammaln(x):
    return np.asarray(_lgamma(np.asarray(x, dtype=np.float64)), dtype=np.float64)


def digamma(x):
    """psi(x) for x > 0: recurrence psi(x) = psi(x+1) - 1/x up to x >= 10, then the asymptotic
    series (error < 1e-13 there)."""
    x = np.array(x, dtype=np.float64, copy=True)
    out = np.zeros_like(x)
    small = x < 10.0
    while small.any():
        out[small] -= 1.0 / x[small]
        x[small] += 1.0
        small = x < 10.0
    f = 1.0 / (x * x)
    series = f * (1 / 12 - f * (1 / 120 - f * (1 / 252 - f * (1 / 240 - f * (1 / 132 - f * 691 / 32760)))))
    return out + np.log(x) - 0.5 / x - series


def logsumexp(a, axis):
    m = np.max(a, axis=axis, keepdims=True)
    return (m + np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True))).squeeze(axis)

# -----------------------------------------------------------------------------
# DPMM: truncated stick-breaking variational inference (Blei & Jordan 2006)
#
# Generative model, truncation T, x_n in R^d:
#   v_t ~ Beta(1, alpha0) for t < T, v_T = 1         pi_t = v_t prod_{s<t} (1 - v_s)
#   lambda_tj ~ Gamma(a0, b0_j),  mu_tj | lambda_tj ~ N(m0_j, 1 / (beta0 lambda_tj))   (Normal-Gamma)
#   z_n ~ Cat(pi),  x_nj | z_n = t ~ N(mu_tj, 1 / lambda_tj)                            (diagonal)
# Mean-field posterior q(v_t) = Beta(g1_t, g2_t), q(z_n) = Cat(r_n),
#   q(mu_tj, lambda_tj) = NormalGamma(m_tj, beta_t, a_t, b_tj); every update is the conjugate
#   coordinate-ascent step, so the ELBO never decreases.


@dataclass
class DPMMResult:
    resp: np.ndarray  # [N, T] r_nt = q(z_n = t)
    weights: np.ndarray  # [T] E_q[pi_t]
    means: np.ndarray  # [T, d] E_q[mu_t], in the coordinates of the input X
    variances: np.ndarray  # [T, d] 1 / E_q[lambda_t] = b_t / a_t
    labels: np.ndarray  # [N] argmax_t r_nt
    elbo: list = field(default_factory=list)  # one value per iteration, after the global update
    n_iter: int = 0
    converged: bool = False

    def n_effective(self, threshold: float = 0.01) -> int:
        return int((self.weights > threshold).sum())


def kmeans_pp(X, k, rng, n_lloyd=20):
    """k-means++ seeding (Arthur & Vassilvitskii 2007) + a few Lloyd steps -> hard labels.
    Stops seeding early when every point already coincides with a centre (duplicated data)."""
    N = len(X)
    centres = [X[rng.integers(N)]]
    d2 = ((X - centres[0]) ** 2).sum(1)
    while len(centres) < k:
        total = d2.sum()
        if total <= 0:
            break  # fewer distinct points than k
        c = X[rng.choice(N, p=d2 / total)]
        centres.append(c)
        d2 = np.minimum(d2, ((X - c) ** 2).sum(1))
    C = np.array(centres)
    labels = None
    for _ in range(n_lloyd):
        dist = (X * X).sum(1)[:, None] - 2 * X @ C.T + (C * C).sum(1)[None, :]
        new = dist.argmin(1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for j in range(len(C)):
            members = X[labels == j]
            if len(members):  # an empty cluster keeps its centre
                C[j] = members.mean(0)
    return labels, len(C)


def kl_beta(g1, g2, alpha):
    """KL(Beta(g1, g2) || Beta(1, alpha0)), elementwise; B(1, alpha0) = 1 / alpha0."""
    g1, g2 = np.asarray(g1, dtype=np.float64), np.asarray(g2, dtype=np.float64)
    dsum = digamma(g1 + g2)
    return (gammaln(g1 + g2) - gammaln(g1) - gammaln(g2) - np.log(alpha)
            + (g1 - 1) * (digamma(g1) - dsum) + (g2 - alpha) * (digamma(g2) - dsum))


def kl_normal_gamma(m, beta, a, b, m0, beta0, a0, b0):
    """KL(NG(m, beta, a, b) || NG(m0, beta0, a0, b0)) for lambda ~ Gamma(a, rate b),
    mu | lambda ~ N(m, 1 / (beta lambda)), elementwise: the Gamma KL plus E_q(lambda) of the KL of
    the two normals, 1/2 [beta0/beta - 1 - ln(beta0/beta) + beta0 E[lambda] (m - m0)^2]."""
    kl_gamma = (a - a0) * digamma(a) - gammaln(a) + gammaln(a0) + a0 * (np.log(b) - np.log(b0)) + a * (b0 - b) / b
    ratio = beta0 / beta
    return kl_gamma + 0.5 * (ratio - 1 - np.log(ratio) + beta0 * (a / b) * (m - m0) ** 2)


def fit_dpmm(X, truncation=20, alpha=1.0, max_iter=500, tol=1e-6, seed=0,
             mean_precision=1.0, precision_shape=None, progress=False):
    """Fit the DP Gaussian mixture above to X [N, d].

    Priors are set from the data (so X need not be standardised): m0 = mean(X), beta0 =
    `mean_precision` pseudo-observations, a0 = `precision_shape` (default d/2, i.e. scikit-learn's
    degrees_of_freedom_prior = d), b0_j = a0 * var_j(X) so that E[lambda_j] = 1 / var_j (a floor
    keeps constant columns finite). `alpha` is alpha0, the DP concentration. Iterates until the
    relative ELBO gain is below `tol`.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"fit_dpmm: X must be a non-empty 2-D array [N, d], got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("fit_dpmm: X contains NaN or inf")
    N, d = X.shape
    if precision_shape is None:
        precision_shape = d / 2
    if truncation < 1 or alpha <= 0 or mean_precision <= 0 or precision_shape <= 0:
        raise ValueError("fit_dpmm: truncation >= 1 and alpha, mean_precision, precision_shape > 0 required")
    T = int(truncation)
    rng = np.random.default_rng(seed)

    # the model is shift-invariant with m0 = mean(X): centring makes duplicated points exact zeros
    shift = X.mean(0)
    X = X - shift
    var = X.var(0)
    ref = var.max() if var.max() > 0 else 1.0
    var = np.maximum(var, 1e-6 * ref)  # constant column: tight but finite prior precision
    m0, beta0, a0, b0 = np.zeros(d), float(mean_precision), float(precision_shape), precision_shape * var

    # initial responsibilities: k-means++ clusters, largest first (the stick-breaking prior
    # expects decreasing weights, so the ordering costs the least ELBO)
    labels, k = kmeans_pp(X, T, rng)
    sizes = np.bincount(labels, minlength=k)
    order = np.argsort(-sizes, kind="stable")
    rank = np.empty(k, dtype=int)
    rank[order] = np.arange(k)
    resp = np.zeros((N, T))
    resp[np.arange(N), rank[labels]] = 1.0

    chunk = max(1, 2_000_000 // (T * d))

    def m_step(resp):
        Nk = resp.sum(0)  # N_t
        xbar = (resp.T @ X) / np.maximum(Nk, 1e-300)[:, None]
        S = np.zeros((T, d))  # S_tj = sum_n r_nt (x_nj - xbar_tj)^2
        for i in range(0, N, chunk):
            Xi, ri = X[i:i + chunk], resp[i:i + chunk]
            S += np.einsum("nt,ntd->td", ri, (Xi[:, None, :] - xbar[None]) ** 2)
        # q(v_t) = Beta(1 + N_t, alpha0 + sum_{s>t} N_s)
        tail = np.concatenate([np.cumsum(Nk[::-1])[::-1][1:], [0.0]])
        g1, g2 = 1.0 + Nk, alpha + tail
        # q(mu, lambda): beta_t = beta0 + N_t, m_t = (beta0 m0 + N_t xbar_t) / beta_t,
        # a_t = a0 + N_t / 2, b_t = b0 + S_t / 2 + beta0 N_t (xbar_t - m0)^2 / (2 beta_t)
        beta = beta0 + Nk
        m = (beta0 * m0 + Nk[:, None] * xbar) / beta[:, None]
        a = a0 + Nk / 2
        b = b0 + S / 2 + (beta0 * Nk / (2 * beta))[:, None] * (xbar - m0) ** 2
        return g1, g2, beta, m, a, b

    def log_rho(g1, g2, beta, m, a, b):
        # E[log pi_t] = E[log v_t] + sum_{s<t} E[log(1 - v_s)], with v_T = 1
        dsum = digamma(g1 + g2)
        Elog_v, Elog_1mv = digamma(g1) - dsum, digamma(g2) - dsum
        Elog_v[-1], Elog_1mv[-1] = 0.0, 0.0
        Elog_pi = Elog_v + np.concatenate([[0.0], np.cumsum(Elog_1mv)[:-1]])
        # E[log N(x_n | mu_t, lambda_t^-1)] = sum_j 1/2 (E log lambda - log 2 pi - E[lambda (x - mu)^2]),
        # E log lambda = psi(a) - log b, E[lambda (x - mu)^2] = a/b (x - m)^2 + 1/beta
        Elam = a[:, None] / b
        const = 0.5 * (d * digamma(a) - np.log(b).sum(1) - d * np.log(2 * np.pi) - d / beta)
        loglik = np.empty((N, T))
        for i in range(0, N, chunk):
            Xi = X[i:i + chunk]
            loglik[i:i + chunk] = const - 0.5 * np.einsum("td,ntd->nt", Elam, (Xi[:, None, :] - m[None]) ** 2)
        return loglik + Elog_pi

    def kl_terms(g1, g2, beta, m, a, b):
        # the last stick is fixed at v_T = 1: only T-1 Beta factors
        return (kl_beta(g1[:-1], g2[:-1], alpha).sum()
                + kl_normal_gamma(m, beta[:, None], a[:, None], b, m0, beta0, a0, b0).sum())

    elbo, converged = [], False
    bar = tqdm(range(max_iter), desc="dpmm", disable=not progress, leave=False, mininterval=1.0)
    for _ in bar:
        params = m_step(resp)
        rho = log_rho(*params)
        # ELBO = sum r (log rho - log r) - KL(q(v)||p(v)) - KL(q(mu, lambda)||p(mu, lambda))
        ent = -np.sum(resp * np.log(np.where(resp > 0, resp, 1.0)))
        elbo.append(float(np.sum(resp * rho) + ent - kl_terms(*params)))
        bar.set_postfix(elbo=f"{elbo[-1]:.6g}", refresh=False)
        # E-step: r_nt = softmax_t(log rho_nt)
        resp = np.exp(rho - logsumexp(rho, axis=1)[:, None])
        if len(elbo) > 1 and elbo[-1] - elbo[-2] < tol * abs(elbo[-2]):
            converged = True
            break
    bar.close()
    n_iter = len(elbo)

    g1, g2, beta, m, a, b = m_step(resp)
    Ev = g1 / (g1 + g2)
    Ev[-1] = 1.0
    weights = Ev * np.concatenate([[1.0], np.cumprod(1 - Ev)[:-1]])  # E[pi_t] under independent sticks
    return DPMMResult(resp=resp, weights=weights, means=m + shift, variances=b / a[:, None],
                      labels=resp.argmax(1), elbo=elbo, n_iter=n_iter, converged=converged)

# -----------------------------------------------------------------------------
# Metrics of a clustering against reference labels (perspectives)


def contingency(clusters, classes, n_clusters=None, n_classes=None):
    """C[c, k] = number of points in cluster c with label k."""
    clusters, classes = np.asarray(clusters, dtype=int), np.asarray(classes, dtype=int)
    if clusters.shape != classes.shape or clusters.ndim != 1:
        raise ValueError(f"contingency: need two 1-D label arrays of equal length, got {clusters.shape} and {classes.shape}")
    n_clusters = n_clusters or (clusters.max() + 1 if len(clusters) else 0)
    n_classes = n_classes or (classes.max() + 1 if len(classes) else 0)
    C = np.zeros((n_clusters, n_classes), dtype=np.int64)
    np.add.at(C, (clusters, classes), 1)
    return C


def _entropy(counts):
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def cluster_metrics(C):
    """NMI (arithmetic-mean normalisation), ARI and purity from a contingency table C[cluster, class].

    NMI = I(U; V) / ((H(U) + H(V)) / 2)
    ARI = (sum_ij C(n_ij, 2) - E) / ((sum_i C(a_i, 2) + sum_j C(b_j, 2)) / 2 - E),
          E = sum_i C(a_i, 2) sum_j C(b_j, 2) / C(N, 2)       (Hubert & Arabie 1985)
    purity = sum_c max_k C[c, k] / N
    """
    C = np.asarray(C, dtype=np.float64)
    N = C.sum()
    if N == 0:
        raise ValueError("cluster_metrics: empty contingency table")
    a, b = C.sum(1), C.sum(0)  # cluster sizes a_i, class sizes b_j
    nz = C > 0
    mi = float((C[nz] / N * np.log(C[nz] * N / np.outer(a, b)[nz])).sum())
    hu, hv = _entropy(a), _entropy(b)
    if hu == 0 and hv == 0:
        nmi = 1.0  # one cluster, one class: identical partitions
    else:
        nmi = max(0.0, mi) / ((hu + hv) / 2)
    comb2 = lambda n: n * (n - 1) / 2
    sum_ij, sum_a, sum_b = comb2(C).sum(), comb2(a).sum(), comb2(b).sum()
    expected = sum_a * sum_b / comb2(N) if N > 1 else 0.0
    top = (sum_a + sum_b) / 2
    ari = 1.0 if top == expected else float((sum_ij - expected) / (top - expected))
    purity = float(C.max(1).sum() / N)
    return {"nmi": float(nmi), "ari": ari, "purity": purity}

# -----------------------------------------------------------------------------
# Features: per-question centring, standardisation, PCA


def center_per_question(X, groups):
    """Subtract each question's mean rationale vector: raw vectors cluster by question topic,
    the perspective is what is left after the question is removed (see DESIGN.md, Analysis)."""
    X = np.asarray(X, dtype=np.float64).copy()
    groups = np.asarray(groups)
    for g in np.unique(groups):
        idx = groups == g
        X[idx] -= X[idx].mean(0)
    return X


def standardize(X):
    """z-score per column; constant columns become 0 instead of NaN."""
    X = np.asarray(X, dtype=np.float64)
    sd = X.std(0)
    return (X - X.mean(0)) / np.where(sd > 0, sd, 1.0)


def pca(X, k):
    """Top-k principal component scores [N, k] and explained-variance ratios; the sign of each
    component is fixed (largest loading positive) so runs are reproducible."""
    X = np.asarray(X, dtype=np.float64)
    Xc = X - X.mean(0)
    U, S, Vt = np.linalg.svd(Xc, full_matrices=False)
    k = min(k, Vt.shape[0])
    signs = np.sign(Vt[np.arange(k), np.abs(Vt[:k]).argmax(1)])
    signs[signs == 0] = 1.0
    scores = (U[:, :k] * S[:k]) * signs
    total = (S ** 2).sum()
    ratio = (S[:k] ** 2) / total if total > 0 else np.zeros(k)
    return scores, ratio


def prepare_features(V, groups, center=True, pca_dim=32):
    """What the DPMM sees: (optionally) centred per question, standardised, PCA-reduced.
    -> (X, fraction of the standardised variance kept by the PCA)"""
    X = center_per_question(V, groups) if center else np.asarray(V, dtype=np.float64)
    X = standardize(X)
    kept = 1.0
    if pca_dim and pca_dim < X.shape[1]:
        X, ratio = pca(X, pca_dim)
        kept = float(ratio.sum())
    return X, kept

# -----------------------------------------------------------------------------
# t-SNE (van der Maaten & Hinton 2008), exact O(N^2), numpy: fine up to a few thousand points


def _tsne_affinities(X, perplexity, n_steps=100):
    """p_{j|i} = exp(-beta_i ||x_i - x_j||^2) / sum_k ..., beta_i by bisection so that the
    entropy of P_i equals log(perplexity); returns the symmetric P = (P_{j|i} + P_{i|j}) / 2N."""
    N = len(X)
    sq = (X * X).sum(1)
    D = np.maximum(sq[:, None] + sq[None, :] - 2 * X @ X.T, 0.0)
    np.fill_diagonal(D, np.inf)
    D = D - D.min(1, keepdims=True)  # per-row shift: does not change P_i, avoids underflow
    target = np.log(perplexity)
    beta, lo, hi = np.ones(N), np.zeros(N), np.full(N, np.inf)
    scale = np.median(D[np.isfinite(D)]) or 1.0
    beta /= scale
    for _ in range(n_steps):
        W = np.exp(-D * beta[:, None])
        sw = W.sum(1)
        H = np.log(sw) + beta * (np.where(np.isfinite(D), D, 0) * W).sum(1) / sw
        too_flat = H > target  # entropy too high -> sharpen (increase beta)
        lo = np.where(too_flat, beta, lo)
        hi = np.where(too_flat, hi, beta)
        beta = np.where(np.isinf(hi), beta * 2, (lo + hi) / 2)
    W = np.exp(-D * beta[:, None])
    P = W / W.sum(1, keepdims=True)
    P = (P + P.T) / (2 * N)
    return np.maximum(P, 1e-12)


def tsne(X, perplexity=30.0, n_iter=1000, seed=0, progress=True):
    """2-D t-SNE embedding of X [N, d]: PCA initialisation, early exaggeration 12 for 250 steps,
    momentum 0.5 -> 0.8, per-parameter gains, learning rate max(N / 48, 50) as in openTSNE/sklearn."""
    X = np.asarray(X, dtype=np.float64)
    N = len(X)
    init, _ = pca(X, 2)
    if init.shape[1] < 2:
        init = np.pad(init, ((0, 0), (0, 2 - init.shape[1])))
    if N < 5:
        return init  # nothing to embed: t-SNE needs a neighbourhood
    perplexity = min(perplexity, (N - 1) / 3)
    P = _tsne_affinities(X, perplexity)
    rng = np.random.default_rng(seed)
    sd = init[:, 0].std()
    Y = init / sd * 1e-4 if sd > 0 else rng.normal(0, 1e-4, (N, 2))
    lr = max(N / 48, 50.0)
    update, gains = np.zeros_like(Y), np.ones_like(Y)
    for it in tqdm(range(n_iter), desc="t-sne", disable=not progress, leave=False):
        exag, momentum = (12.0, 0.5) if it < 250 else (1.0, 0.8)
        sq = (Y * Y).sum(1)
        num = 1.0 / (1.0 + np.maximum(sq[:, None] + sq[None, :] - 2 * Y @ Y.T, 0.0))  # Student-t kernel
        np.fill_diagonal(num, 0.0)
        Q = np.maximum(num / num.sum(), 1e-12)
        # dC/dy_i = 4 sum_j (p_ij - q_ij) (1 + ||y_i - y_j||^2)^-1 (y_i - y_j)
        PQ = (exag * P - Q) * num
        grad = 4 * (PQ.sum(1)[:, None] * Y - PQ @ Y)
        gains = np.where(np.sign(grad) != np.sign(update), gains + 0.2, gains * 0.8).clip(0.01)
        update = momentum * update - lr * gains * grad
        Y = Y + update
        Y -= Y.mean(0)
    return Y

# -----------------------------------------------------------------------------
# Plots (matplotlib, Agg); every output file is written to a temp name and renamed into place


def _temp_beside(path, suffix):
    """A temp file next to `path` (same file system, so os.replace is atomic), with the permissions a
    plain open() would give: mkstemp's 0600 would make the outputs unreadable to other users."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=suffix)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def _save_fig(fig, path):
    import matplotlib.pyplot as plt
    fd, tmp = _temp_beside(path, ".png.tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def _cluster_order(C):
    """Clusters that hold points, ordered by their majority perspective then size, so the
    contingency table reads as a diagonal when clusters match perspectives."""
    used = np.flatnonzero(C.sum(1) > 0)
    return sorted(used, key=lambda c: (C[c].argmax(), -C[c].sum()))


def cluster_view(C, weights, threshold=0.01):
    """What a person reads: the effective clusters (weight > threshold) in diagonal order, and the
    points of all other clusters summed into one last row. -> (effective ids, row names, table)."""
    eff = [c for c in _cluster_order(C) if weights[c] > threshold]
    rest = [c for c in _cluster_order(C) if c not in eff]
    rows, M = [f"c{c}" for c in eff], C[eff]
    if rest:
        rows.append(f"small ({len(rest)})")
        M = np.vstack([M, C[rest].sum(0, keepdims=True)])
    return eff, rows, M


_TAB = [0, 1, 2, 3, 4, 5, 6, 8, 9]  # tab10 without its grey (index 7), which marks small clusters


def perspective_colour(k, light=False):
    import matplotlib.pyplot as plt
    i = _TAB[k % len(_TAB)]
    return plt.get_cmap("tab20")(2 * i + 1) if light else plt.get_cmap("tab10")(i)


def cluster_colours(C, eff):
    """The largest cluster whose majority is perspective k takes k's colour, a second one the light
    shade of it, further ones black/purple; clusters under 1% are grey."""
    spare = [(0.0, 0.0, 0.0, 1.0), (0.45, 0.2, 0.6, 1.0), (0.6, 0.4, 0.0, 1.0)]
    seen, colours = {}, {}
    for c in sorted(eff, key=lambda c: -C[c].sum()):
        k = int(C[c].argmax())
        n = seen.get(k, 0)
        seen[k] = n + 1
        colours[c] = perspective_colour(k, light=n == 1) if n < 2 else spare[n % len(spare)]
    return colours


def plot_projection(path, coords, labels, clusters, keys, C, eff, title=""):
    """coords: {"PCA": [N, 2], "t-SNE": [M, 2]} (t-SNE may cover the subsample coords["t-SNE index"]).
    Left: coloured by perspective; right: by DPMM cluster (a cluster takes the colour of the
    perspective most of its points have, so matching panels mean matching partitions)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [k for k in ("PCA", "t-SNE") if coords.get(k) is not None]
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 4.8 * len(panels)), squeeze=False)
    colours = cluster_colours(C, eff)
    small = np.isin(clusters, eff, invert=True)
    for row, name in enumerate(panels):
        Y = coords[name]
        idx = coords.get(f"{name} index", np.arange(len(labels)))
        ax = axes[row, 0]
        for k, key in enumerate(keys):
            m = labels[idx] == k
            if m.any():
                ax.scatter(Y[m, 0], Y[m, 1], s=7, color=perspective_colour(k), label=key, alpha=0.85, linewidths=0)
        ax.set_title(f"{name}: coloured by perspective", fontsize=10)
        ax.legend(fontsize=7, markerscale=2, loc="best", frameon=False)
        ax = axes[row, 1]
        for c in eff:
            m = clusters[idx] == c
            if m.any():
                ax.scatter(Y[m, 0], Y[m, 1], s=7, color=colours[c], alpha=0.85, linewidths=0,
                           label=f"c{c} (n={C[c].sum()}, {100 * C[c].max() / C[c].sum():.0f}% {keys[C[c].argmax()]})")
        m = small[idx]
        if m.any():
            ax.scatter(Y[m, 0], Y[m, 1], s=10, color="0.55", alpha=0.85, marker="x",
                       label=f"clusters under 1% (n={int(small.sum())})")
        ax.set_title(f"{name}: coloured by DPMM cluster", fontsize=10)
        ax.legend(fontsize=6, markerscale=2, loc="best", frameon=False)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    _save_fig(fig, path)


def plot_elbo(path, elbo, converged):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(np.arange(1, len(elbo) + 1), elbo, marker=".", ms=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("ELBO")
    ax.set_title(f"DPMM variational inference ({'converged' if converged else 'not converged'}, {len(elbo)} it.)")
    ax.grid(alpha=0.3)
    _save_fig(fig, path)


def plot_contingency(path, rows, M, keys, title=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(keys), 1.2 + 0.4 * len(rows)))
    ax.imshow(M, cmap="Blues", aspect="auto")
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            if M[i, j]:
                ax.text(j, i, str(M[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if M[i, j] > 0.6 * M.max() else "black")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=8)
    ax.set_xlabel("perspective")
    ax.set_ylabel("DPMM cluster")
    if title:
        ax.set_title(title, fontsize=9)
    _save_fig(fig, path)


# -----------------------------------------------------------------------------
# Inputs: one vector per (question, perspective) rationale


@dataclass
class Items:
    qidx: np.ndarray  # [N] index of the question
    labels: np.ndarray  # [N] perspective index into KEYS
    questions: list  # [N] question text
    rationales: list  # [N] rationale text
    ids: list  # question ids, indexed by qidx


def load_items(path, max_questions=None):
    """Every rationale of the training file as one item, skipping questions with fewer than two
    perspectives (per-question centring would turn their only vector into zero)."""
    examples = read_training_jsonl(path)
    if max_questions:
        examples = examples[:max_questions]
    qidx, labels, qs, rs, ids = [], [], [], [], []
    dropped = 0
    for e in examples:
        present = [k for k in KEYS if k in e.rationales]
        if len(present) < 2:
            dropped += 1
            continue
        for k in present:
            qidx.append(len(ids))
            labels.append(KEYS.index(k))
            qs.append(e.question)
            rs.append(e.rationales[k])
        ids.append(e.id)
    if dropped:
        print(f"note: {path}: {dropped} question(s) with fewer than 2 perspectives left out")
    if not ids:
        raise SystemExit(f"error: {path}: no question with at least 2 perspectives")
    return Items(np.array(qidx), np.array(labels), qs, rs, ids)


def train_specialist(key, data, out_dir, steps, extra):
    """One `sft` student on perspective `key` through train.py (the only way a checkpoint is made)."""
    import shlex
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"),
           "--method", "sft", "--perspective", key, "--data", data, "--out", out_dir]
    if steps:
        cmd += ["--steps", str(steps)]
    cmd += shlex.split(extra or "")
    print("training specialist:", " ".join(shlex.quote(c) for c in cmd), flush=True)
    rc = subprocess.run(cmd).returncode
    if rc:
        raise SystemExit(f"error: --specialists: train.py for {key} exited with status {rc}")


def load_student(path, flag, device, layer):
    """eval.load_model with a one-line error naming the flag, and --layer checked against the depth."""
    from eval import load_model
    try:
        model, tok = load_model(path, device=device)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {flag} {path}: cannot load a checkpoint ({str(e).splitlines()[0]})")
    n = model.config.num_hidden_layers  # hidden_states has n + 1 entries: embeddings, then each layer
    if not -(n + 1) <= layer <= n:
        raise SystemExit(f"error: --layer {layer}: {path} has hidden states 0..{n} (or -1..-{n + 1})")
    return model, tok


def encode_items(args, items):
    """[N, D] float64 vectors from the chosen encoder. torch and transformers are imported only
    here: the DPMM, metrics and plots also run on a saved embeddings.npz."""
    import torch
    from metanet import encode_sentences, encode_student
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pairs = list(zip(items.questions, items.rationales))
    if args.encoder:
        try:
            V = encode_sentences(args.encoder, items.rationales, batch_size=args.batch_size, device=device)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --encoder {args.encoder}: cannot load ({str(e).splitlines()[0]})")
    elif args.model:
        model, tok = load_student(args.model, "--model", device, args.layer)
        V = encode_student(model, tok, pairs, batch_size=args.batch_size, layer=args.layer)
    else:  # --specialists: each perspective's rationales through its own sft student
        V = None
        for k, key in enumerate(KEYS):
            idx = np.flatnonzero(items.labels == k)
            if not len(idx):
                continue
            ckpt = os.path.join(args.specialists, key, "ckpt")
            if not os.path.isdir(ckpt):
                train_specialist(key, args.data, os.path.join(args.specialists, key), args.spec_steps, args.spec_args)
            if not os.path.isdir(ckpt):
                raise SystemExit(f"error: --specialists: train.py did not write {ckpt}")
            model, tok = load_student(ckpt, "--specialists", device, args.layer)
            print(f"encoding {len(idx)} {key} rationales with {ckpt}")
            Vk = encode_student(model, tok, [pairs[i] for i in idx], batch_size=args.batch_size, layer=args.layer)
            if V is None:
                V = torch.zeros(len(pairs), Vk.shape[1])
            elif Vk.shape[1] != V.shape[1]:
                raise SystemExit(f"error: --specialists: {ckpt} has width {Vk.shape[1]}, others {V.shape[1]}")
            V[idx] = Vk
            del model
    return V.double().numpy()

# -----------------------------------------------------------------------------
# Atomic writers


def write_npz(path, **arrays):
    fd, tmp = _temp_beside(path, ".npz.tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)

# -----------------------------------------------------------------------------
# The study


def analyse(V, qidx, labels, args, source):
    """Features -> DPMM -> metrics -> plots; returns the report written to OUT/analysis.json."""
    t0 = time.time()
    X, kept = prepare_features(V, qidx, center=not args.no_center, pca_dim=args.pca_dim)
    res = fit_dpmm(X, truncation=args.truncation, alpha=args.alpha, max_iter=args.max_iter, tol=args.tol,
                   seed=args.seed, mean_precision=args.mean_precision, precision_shape=args.precision_shape,
                   progress=True)
    if len(res.elbo) > 1 and (np.diff(res.elbo) < -1e-8 * np.abs(res.elbo[:-1])).any():
        print("warning: the ELBO decreased during the fit (numerical trouble?)")
    C = contingency(res.labels, labels, args.truncation, len(KEYS))
    metrics = {"n_effective_clusters": res.n_effective(0.01), "n_used_clusters": int((C.sum(1) > 0).sum()),
               **cluster_metrics(C)}
    present = [k for k in range(len(KEYS)) if (labels == k).any()]
    order = _cluster_order(C)
    eff, view_rows, view = cluster_view(C, res.weights)
    report = {
        "source": source,
        "n_questions": int(len(np.unique(qidx))),
        "n_points": int(len(labels)),
        "features": {"input_dim": int(V.shape[1]), "dim": int(X.shape[1]), "center_per_question": not args.no_center,
                     "pca_dim": int(args.pca_dim), "pca_variance_kept": round(kept, 4)},
        "dpmm": {"truncation": args.truncation, "alpha": args.alpha, "seed": args.seed, "n_iter": res.n_iter,
                 "converged": res.converged, "elbo": res.elbo[-1],
                 "weights": [round(float(w), 6) for w in res.weights]},
        "metrics": metrics,
        # every cluster that holds a point, rows in diagonal order
        "contingency": {"rows": [f"c{c}" for c in order], "columns": [KEYS[k] for k in present],
                        "counts": C[np.ix_(order, present)].tolist()},
        # as printed and drawn: effective clusters, then all smaller ones summed
        "contingency_effective": {"rows": view_rows, "columns": [KEYS[k] for k in present],
                                  "counts": view[:, present].tolist()},
        "per_perspective": {KEYS[k]: {"top_cluster": f"c{int(C[:, k].argmax())}",
                                      "share": round(float(C[:, k].max() / C[:, k].sum()), 4)} for k in present},
    }
    os.makedirs(args.out, exist_ok=True)
    coords = {"PCA": pca(X, 2)[0]}
    if args.tsne_iter > 0:
        idx = np.arange(len(X))
        if len(X) > args.tsne_max_points:
            idx = np.sort(np.random.default_rng(args.seed).choice(len(X), args.tsne_max_points, replace=False))
            print(f"t-SNE on a random {len(idx)} of {len(X)} points (--tsne-max-points)")
        coords["t-SNE"] = tsne(X[idx], perplexity=args.perplexity, n_iter=args.tsne_iter, seed=args.seed)
        coords["t-SNE index"] = idx
    title = (f"{source.get('label', '')}  |  {metrics['n_effective_clusters']} clusters, NMI {metrics['nmi']:.3f}, "
             f"ARI {metrics['ari']:.3f}, purity {metrics['purity']:.3f}")
    plot_projection(os.path.join(args.out, "projection.png"), coords, labels, res.labels, KEYS, C, eff, title)
    plot_elbo(os.path.join(args.out, "elbo.png"), res.elbo, res.converged)
    plot_contingency(os.path.join(args.out, "contingency.png"), view_rows, view[:, present], [KEYS[k] for k in present],
                     title=title.split("|")[-1].strip())
    write_npz(os.path.join(args.out, "embeddings.npz"), vectors=V, question=qidx, perspective=labels,
              cluster=res.labels, pca2=coords["PCA"], tsne2=coords.get("t-SNE", np.zeros((0, 2))),
              tsne_index=coords.get("t-SNE index", np.zeros(0, dtype=int)), keys=np.array(KEYS),
              source=np.array(json.dumps(source)))
    report["seconds_analysis"] = round(time.time() - t0, 2)
    write_json(os.path.join(args.out, "analysis.json"), report)
    return report


def print_report(r):
    m = r["metrics"]
    f = r["features"]
    print(f"points {r['n_points']} ({r['n_questions']} questions), features {f['input_dim']} -> {f['dim']} "
          f"({100 * f['pca_variance_kept']:.0f}% of the variance), centred per question: {f['center_per_question']}")
    print(f"DPMM: {r['dpmm']['n_iter']} iterations, converged {r['dpmm']['converged']}, ELBO {r['dpmm']['elbo']:.6g}")
    print(f"effective clusters (weight > 1%): {m['n_effective_clusters']}   NMI {m['nmi']:.4f}   "
          f"ARI {m['ari']:.4f}   purity {m['purity']:.4f}")
    t = r["contingency_effective"]
    w = max(10, *(len(c) for c in t["rows"]))
    print(" " * w + "".join(f"{c[:8]:>9}" for c in t["columns"]))
    for name, row in zip(t["rows"], t["counts"]):
        print(f"{name:<{w}}" + "".join(f"{v:>9}" for v in row))


def main(argv=None):
    p = argparse.ArgumentParser(description="Latent-space analysis: do the perspectives form distinct clusters?")
    g = p.add_argument_group("input")
    g.add_argument("--data", help="training JSONL (perspectives.py format) whose rationales are encoded")
    g.add_argument("--max-questions", type=int, default=0, help="use only the first N questions (0 = all)")
    g = p.add_argument_group("encoder (exactly one)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="student checkpoint dir (train.py's OUT/ckpt) or Hugging Face name")
    src.add_argument("--specialists", help="dir of one sft student per perspective, DIR/<key>/ckpt; missing ones "
                                           "are trained with train.py --method sft --perspective <key>")
    src.add_argument("--encoder", help="sentence encoder (name or path) through transformers.AutoModel, "
                                       "mean-pooled over the rationale, e.g. all-MiniLM-L6-v2")
    src.add_argument("--embeddings", help="re-analyse a saved OUT/embeddings.npz without encoding again")
    g.add_argument("--layer", type=int, default=-1, help="hidden_states index pooled for students (-1 = last layer)")
    g.add_argument("--batch-size", type=int, default=32, help="encoding batch size")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g = p.add_argument_group("specialists")
    g.add_argument("--spec-steps", type=int, default=0, help="--steps for each specialist train.py run (0 = train.py's default)")
    g.add_argument("--spec-args", default="", help="extra train.py arguments for specialists, one quoted string")
    g = p.add_argument_group("features")
    g.add_argument("--no-center", action="store_true", help="do not subtract each question's mean vector "
                                                           "(raw vectors cluster by question topic)")
    g.add_argument("--pca-dim", type=int, default=32, help="PCA dimensions after standardising (0 = no PCA)")
    g = p.add_argument_group("DPMM (truncated stick-breaking VI)")
    g.add_argument("--truncation", type=int, default=20, help="truncation level T: at most T clusters")
    g.add_argument("--alpha", type=float, default=1.0, help="DP concentration alpha0: prior weight on opening a new cluster")
    g.add_argument("--mean-precision", type=float, default=1.0, help="beta0: prior pseudo-count on cluster means")
    g.add_argument("--precision-shape", type=float, default=None,
                   help="a0: Gamma shape of the per-dimension precision prior (default d/2, as scikit-learn)")
    g.add_argument("--max-iter", type=int, default=500, help="maximum VI iterations")
    g.add_argument("--tol", type=float, default=1e-6, help="stop when the relative ELBO gain is below this")
    g.add_argument("--seed", type=int, default=0, help="seed of the k-means++ initialisation and t-SNE")
    g = p.add_argument_group("projection")
    g.add_argument("--tsne-iter", type=int, default=1000, help="t-SNE iterations (0 = PCA plot only)")
    g.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity")
    g.add_argument("--tsne-max-points", type=int, default=2000, help="t-SNE on a random subsample above this (O(N^2))")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output dir: analysis.json, embeddings.npz, projection.png, "
                                                "elbo.png, contingency.png")
    args = p.parse_args(argv)

    if args.pca_dim < 0:
        p.error("--pca-dim must be >= 0")
    if args.max_questions < 0:
        p.error("--max-questions must be >= 0")
    if args.truncation < 1:
        p.error("--truncation must be >= 1")
    if args.alpha <= 0:
        p.error("--alpha must be > 0")
    if args.embeddings:
        if not os.path.isfile(args.embeddings):
            p.error(f"--embeddings {args.embeddings}: no such file")
        z = np.load(args.embeddings)
        missing = {"vectors", "question", "perspective"} - set(z.files)
        if missing:
            p.error(f"--embeddings {args.embeddings}: missing arrays {sorted(missing)}")
        V, qidx, labels = z["vectors"], z["question"], z["perspective"]
        if V.ndim != 2 or not len(V) == len(qidx) == len(labels):
            p.error(f"--embeddings {args.embeddings}: vectors {V.shape}, question {qidx.shape} and "
                    f"perspective {labels.shape} do not match")
        before = json.loads(str(z["source"])) if "source" in z.files else {}
        source = {"mode": "embeddings", "path": args.embeddings, "encoded_by": before,
                  "label": before.get("label", os.path.basename(args.embeddings))}
    else:
        if not args.data:
            p.error("--data is required unless --embeddings is given")
        for flag, path in (("--model", args.model), ("--encoder", args.encoder)):
            # a Hugging Face name is `org/name`; anything that reads as a file path must exist
            if path and path.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(path)):
                p.error(f"{flag} {path}: no such directory")
        t0 = time.time()
        items = load_items(args.data, args.max_questions)
        print(f"{len(items.labels)} rationales from {len(items.ids)} questions in {args.data}")
        V = encode_items(args, items)
        qidx, labels = items.qidx, items.labels
        mode = "encoder" if args.encoder else "model" if args.model else "specialists"
        path = args.encoder or args.model or args.specialists
        source = {"mode": mode, "path": path, "data": args.data, "seconds_encoding": round(time.time() - t0, 1),
                  "label": f"{mode} " + "/".join(os.path.normpath(path).split(os.sep)[-2:])}
        if mode != "encoder":
            source["layer"] = args.layer
    if len(labels) < 2:
        raise SystemExit("error: need at least 2 rationales to analyse")
    report = analyse(V, qidx, labels, args, source)
    print_report(report)
    print(f"wrote {args.out}/analysis.json, embeddings.npz, projection.png, elbo.png, contingency.png")
    return report


if __name__ == "__main__":
    main()
