"""The analytic benchmark's exact denoisers and metrics are right (the benchmark is only as good as these)."""

import numpy as np
import pytest

from benchmarks.quality import analytic, report


@pytest.fixture(scope="module")
def data():
    return analytic.make_data(0)


def _log_density(data, x, sigma, labels):
    Y, K, D = data.means.shape
    logp = analytic._component_log_probs(x, data.means.reshape(Y * K, D), data.variances.reshape(Y * K, D) + sigma**2)
    if labels is not None:
        own = (np.arange(Y * K)[None] // K) == labels[:, None]
        logp = np.where(own, logp, -np.inf)
    return analytic._logsumexp(logp, axis=1)


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("sigma", [0.05, 0.7, 5.0])
def test_denoiser_is_tweedie(data, sigma, conditional):
    """E[x0 | x] = x + sigma² ∇ log p_sigma(x), checked by central differences of the exact density."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, data.num_classes, 3)
    x = analytic.sample_true(data, labels, rng) + sigma * rng.standard_normal((3, data.means.shape[2]))
    lab = labels if conditional else None
    h = 1e-4 * max(sigma, 0.05)
    dims = rng.choice(x.shape[1], 12, replace=False)
    expected = analytic.denoise(data, x, sigma, lab)
    for d in dims:
        e = np.zeros_like(x)
        e[:, d] = h
        grad = (_log_density(data, x + e, sigma, lab) - _log_density(data, x - e, sigma, lab)) / (2 * h)
        np.testing.assert_allclose(x[:, d] + sigma**2 * grad, expected[:, d], rtol=1e-4, atol=1e-5)


def test_background_delta_is_zero(data):
    """The condition moves only the foreground: conditional and unconditional denoisers agree elsewhere."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, data.num_classes, 8)
    x = rng.standard_normal((8, data.means.shape[2])) * 2.0
    delta = analytic.denoise(data, x, 1.0, labels) - analytic.denoise(data, x, 1.0, None)
    assert np.abs(delta[:, ~data.foreground]).max() < 1e-12
    assert np.abs(delta[:, data.foreground]).max() > 1e-3


def test_true_samples_score_as_truth(data):
    """Exact samples: aligned, on the manifold, MMD ≈ 0; the inflated model's unguided samples are worse."""
    labels = np.repeat(np.arange(data.num_classes), 40)
    ref = analytic.sample_true(data, labels, np.random.default_rng(3))
    own = analytic.sample_true(data, labels, np.random.default_rng(4))
    s = analytic.score(data, own, labels, ref, labels)
    assert s["alignment"] > 0.97 and s["off_manifold"] < 1.5 and abs(s["mmd2"]) < 0.01
    x, mean_scale, _ = analytic.sample_guided(data.inflated(0.25), labels, "cfg", {"scale": 1.0}, steps=16, seed=0)
    bad = analytic.score(data, x, labels, ref, labels)
    assert mean_scale == 1.0
    assert bad["off_manifold"] > 5 * s["off_manifold"]


def test_sampler_recovers_exact_model(data):
    """With the exact model and no guidance, sampling reproduces the data: the sampler is right."""
    labels = np.repeat(np.arange(data.num_classes), 40)
    ref = analytic.sample_true(data, labels, np.random.default_rng(5))
    x, _, _ = analytic.sample_guided(data, labels, "cfg", {"scale": 1.0}, steps=40, seed=1)
    s = analytic.score(data, x, labels, ref, labels)
    assert s["alignment"] > 0.97 and s["off_manifold"] < 2.0 and s["precision"] > 0.5


def test_pareto_front_and_matched_scale():
    rows = [
        {"rule": "cfg", "setting": "a", "mean_scale": 1.0, "q": 0.5, "err": 1.0},
        {"rule": "cfg", "setting": "b", "mean_scale": 3.0, "q": 0.9, "err": 3.0},
        {"rule": "samg", "setting": "c", "mean_scale": 2.0, "q": 0.8, "err": 1.5},
        {"rule": "samg", "setting": "d", "mean_scale": 2.5, "q": 0.6, "err": 2.5},  # dominated by c
    ]
    front = report.pareto_front(rows, "err", "q", maximize_x=False, maximize_y=True)
    assert [r["setting"] for r in front] == ["a", "c", "b"]
    matched = report.matched_scale_table(rows, ["q"])
    by = {r["setting"]: r for r in matched}
    assert by["c"]["cfg_q"] == pytest.approx(0.7) and by["d"]["cfg_q"] == pytest.approx(0.8)


def test_outputs_are_written_for_a_small_sweep(data, tmp_path):
    """A few real settings through sample_guided/score into every output file."""
    labels = np.repeat(np.arange(data.num_classes), 8)
    ref = analytic.sample_true(data, labels, np.random.default_rng(6))
    model = data.inflated(0.25)
    rows = []
    for rule, params in [("cfg", {"scale": 1.0}), ("cfg", {"scale": 4.0}), ("samg", {"w_min": 2.0, "w_max": 6.0})]:
        x, mean_scale, weighted = analytic.sample_guided(model, labels, rule, params, steps=8, seed=0)
        rows.append({"rule": rule, "setting": str(params), "mean_scale": mean_scale,
                     "energy_weighted_scale": weighted, "smooth": 0, **analytic.score(data, x, labels, ref, labels)})
    assert rows[2]["energy_weighted_scale"] < rows[2]["mean_scale"] <= 6.0  # SAMG lowers w where Δ is large
    analytic.write_outputs(rows, tmp_path, "analytic_test", inflate=0.25)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["analytic_test.csv", "analytic_test.md", "analytic_test_metrics.png", "analytic_test_pareto.png"]
    assert "| samg |" in (tmp_path / "analytic_test.md").read_text()
