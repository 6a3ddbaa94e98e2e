"""The samg-digits quality benchmark: metric functions against closed forms, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks.quality import digits, report
from samg.bundled import CLASSIFIER_DIR, SAMG_DIGITS_DIR
from samg.errors import SamgError

needs_classifier = pytest.mark.skipif(
    not (CLASSIFIER_DIR / "config.json").exists(), reason="digit classifier not bundled yet"
)
needs_model = pytest.mark.skipif(
    not (SAMG_DIGITS_DIR / "model_index.json").exists(), reason="samg-digits not bundled yet"
)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(m)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()  # 7.25 + 4 + 1
    got = digits.frechet_distance_from_stats(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, abs=1e-9)
    assert digits.frechet_distance_from_stats(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_non_commuting_covariances():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    s1, s2 = a @ a.T + 0.1 * np.eye(4), b @ b.T + 0.1 * np.eye(4)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    # tr (S1 S2)^½ = tr (S1^½ S2 S1^½)^½, computed here by symmetric eigendecompositions only
    root1 = _sqrt_psd(s1)
    cross = np.trace(_sqrt_psd(root1 @ s2 @ root1))
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross
    assert digits.frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_from_samples_approaches_closed_form():
    rng = np.random.default_rng(1)
    a = rng.normal([0.0, 0.0], [1.0, 2.0], size=(20000, 2))
    b = rng.normal([3.0, 0.0], [1.0, 1.0], size=(20000, 2))
    assert digits.frechet_distance(a, b) == pytest.approx(9.0 + 1.0, rel=0.03)
    with pytest.raises(SamgError, match="at least 2 samples"):
        digits.frechet_distance(a[:1], b)


def test_saturation_on_constructed_images():
    images = np.array([-1.5, -1.0, 0.0, 0.5, 1.0, 1.2, 0.99, -0.2]).reshape(1, 2, 2, 2)
    fraction, overshoot = digits.saturation(images)
    assert fraction == pytest.approx(2 / 8)  # exactly ±1 is in range
    assert overshoot == pytest.approx((0.5 + 0.2) / 8)
    assert digits.saturation(np.zeros((2, 3, 4, 4))) == (0.0, 0.0)


def test_diversity_is_mean_pairwise_distance_within_each_prompt():
    triangle = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, math.sqrt(3.0)]])  # all sides 2
    pair = np.array([[0.0, 0.0], [0.0, 6.0]])  # one distance 6
    features = np.concatenate([triangle, pair])
    labels = np.array([3, 3, 3, 7, 7])
    assert digits.mean_pairwise_distance(triangle) == pytest.approx(2.0)
    assert digits.diversity(features, labels) == pytest.approx((2.0 + 6.0) / 2)


def test_alignment_counts_argmax_hits():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert digits.alignment(logits, np.array([1, 0, 0])) == pytest.approx(2 / 3)


def test_classifier_images_are_8_bit_and_rgb():
    x = np.linspace(-1.3, 1.3, 3 * 4 * 4, dtype=np.float32).reshape(1, 3, 4, 4)
    out = digits.to_classifier_images(x)
    assert out.shape == (1, 4, 4, 3) and out.min() == 0.0 and out.max() == 1.0
    assert np.allclose(out * 255, np.round(out * 255))


def test_sweep_params_map_onto_runtime_guidance():
    g = digits.make_guidance("samg", {"w_min": 2.0, "w_max": 6.0, "smooth": 3})
    assert (g.rule, g.w_min, g.w_max, g.options) == ("samg", 2.0, 6.0, {"smooth": 3})
    g = digits.make_guidance("cfgpp", {"lam": 0.4})
    assert (g.w_min, g.w_max, g.options) == (0.4, 0.4, {})
    for rule, _, params in digits.sweep(quick=False):
        digits.make_guidance(rule, params).validate()  # every setting is a valid request
    labels = [(r, s) for r, s, _ in digits.sweep(quick=True)]
    assert len(labels) == len(set(labels)), "settings must be unique (they key the fused check)"
    settings = [("cfg", "w=3", {"scale": 3.0}), ("samg", "(2,6)", {"w_min": 2.0, "w_max": 6.0}),
                ("samg", "(2,6) smooth", {"w_min": 2.0, "w_max": 6.0, "smooth": 3}),
                ("samg", "(2,6) tau=2", {"w_min": 2.0, "w_max": 6.0, "tau": 2.0}),
                ("samg-bound", "(2,6)", {"w_min": 2.0, "w_max": 6.0, "w_ref": 6.0}), ("apg", "w=5", {"scale": 5.0})]
    assert [label for _, label, _ in digits.core(settings)] == ["w=3", "(2,6)", "(2,6) smooth"]


@needs_classifier
def test_alignment_of_held_out_digits_is_the_classifier_accuracy():
    from samg.bundled import data, load_digit_classifier

    classify = load_digit_classifier()
    split = data.load_split()
    logits, features = classify(digits.gray_to_classifier_images(split.test_images))
    recorded = json.loads((CLASSIFIER_DIR / "config.json").read_text())["test_accuracy"]
    assert digits.alignment(logits, split.test_labels) == pytest.approx(recorded, abs=0.01)
    assert recorded > 0.9
    # The reference set against itself is at FD 0 (the floor every setting is measured from).
    assert digits.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)


# Student-t quantiles t(0.975, df) from a printed table (df 1: 12.706, df 2: 4.303).
T975_DF1, T975_DF2 = 12.7062047, 4.3026527


def test_interval_over_seeds_is_the_student_t_interval_of_the_mean():
    iv = report.interval([1.0, 2.0, 3.0])  # mean 2, std 1, half-width 4.303 / sqrt(3) = 2.484
    assert (iv["mean"], iv["std"], iv["n"]) == (pytest.approx(2.0), pytest.approx(1.0), 3)
    assert (iv["lo"], iv["hi"]) == pytest.approx((2 - T975_DF2 / math.sqrt(3), 2 + T975_DF2 / math.sqrt(3)), abs=1e-6)
    assert not report.resolved(iv)  # the interval straddles zero
    iv = report.interval([1.0, 1.2, 1.1])  # std 0.1: half-width 0.248, lower bound 0.852 > 0
    assert iv["lo"] == pytest.approx(1.1 - T975_DF2 * 0.1 / math.sqrt(3), abs=1e-6) and report.resolved(iv)
    one = report.interval([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["std"]) and not report.resolved(one)


def _synthetic_rows():
    """Two seeds; CFG at scales 1 and 3, one SAMG setting in between (values chosen for hand arithmetic)."""
    rows = []
    for seed, (cfg1, cfg3, scale, fd, smooth_scale, smooth_fd) in enumerate(
        [(10.0, 30.0, 2.0, 18.0, 2.0, 19.0), (12.0, 36.0, 2.5, 27.0, 1.5, 16.0)]
    ):
        rows += [
            {"rule": "cfg", "setting": "w=1", "seed": seed, "energy_weighted_scale": 1.0, "fd": cfg1},
            {"rule": "cfg", "setting": "w=3", "seed": seed, "energy_weighted_scale": 3.0, "fd": cfg3},
            {"rule": "samg", "setting": "(2,6)", "seed": seed, "energy_weighted_scale": scale, "fd": fd},
            {"rule": "samg", "setting": "(2,6) smooth", "seed": seed, "energy_weighted_scale": smooth_scale, "fd": smooth_fd},
        ]
    return rows


def test_differences_from_cfg_are_paired_within_each_seed():
    by = {e["setting"]: e for e in report.matched_differences(_synthetic_rows(), ["fd"], relative=("fd",))}
    samg = by["(2,6)"]
    # seed 0: CFG at 2.0 interpolates to 20 -> 18 - 20 = -2 (-10%); seed 1: CFG at 2.5 is
    # 12 + 24 * 0.75 = 30 -> 27 - 30 = -3 (-10%).
    assert samg["seeds"] == 2 and samg["energy_weighted_scale"] == pytest.approx(2.25)
    d = samg["d_fd"]
    assert (d["mean"], d["std"]) == pytest.approx((-2.5, math.sqrt(0.5)))
    assert d["hi"] == pytest.approx(-2.5 + T975_DF1 * math.sqrt(0.5) / math.sqrt(2), abs=1e-5)
    assert not report.resolved(d)  # two seeds that disagree by 1 leave the sign open
    r = samg["r_fd"]
    assert r["mean"] == pytest.approx(-0.1) and r["std"] == pytest.approx(0.0, abs=1e-12)
    assert report.resolved(r)  # -10% in both seeds
    assert "**-10 [-10, -10]**" in report.interval_table([samg], [("r_fd", "FD %", 100.0)])


def test_contrast_compares_two_settings_each_against_cfg_at_its_own_scale():
    c = report.contrast(_synthetic_rows(), ["fd"], ("samg", "(2,6) smooth"), ("samg", "(2,6)"))
    # smooth vs CFG: seed 0: 19 - 20 = -1; seed 1: at 1.5 CFG is 18 -> 16 - 18 = -2.
    # minus plain vs CFG (-2, -3): +1 in both seeds.
    assert c["seeds"] == 2
    assert (c["d_fd"]["mean"], c["d_fd"]["std"]) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert report.contrast(_synthetic_rows(), ["fd"], ("samg", "(2,6)"), ("samg", "missing")) is None


def test_quick_runs_do_not_write_into_the_tracked_results():
    from benchmarks.quality import __main__ as quality_main
    from benchmarks.quality import analytic

    results = report.RESULTS_DIR.resolve()
    for parse in (quality_main.parse_args, digits.parse_args, analytic.parse_args):
        quick = parse(["--quick"]).out.resolve()
        assert results != quick and results not in quick.parents, parse.__module__
        assert quick.relative_to(report.REPO).parts[0] == "out"  # /out/ is git-ignored
        assert parse([]).out.resolve() == results  # full runs are the committed evidence
    assert "/out/" in (report.REPO / ".gitignore").read_text().split()


@needs_model
@needs_classifier
def test_tiny_end_to_end_run(tmp_path):
    """Two settings, two samples per digit, three steps, two seeds; exports are cached in the default cache."""
    settings = [("cfg", "w=3", {"scale": 3.0}), ("samg", "(2,6)", {"w_min": 2.0, "w_max": 6.0})]
    rows, checks, facts = digits.run(
        True, tmp_path, per_digit=2, steps=3, seeds=2, settings=settings, fused_checks=settings, progress=False
    )
    assert [(r["setting"], r["seed"]) for r in rows] == [("w=3", 0), ("(2,6)", 0), ("w=3", 1), ("(2,6)", 1)]
    assert rows[0]["fd"] != rows[2]["fd"]  # the two seeds draw different noise
    assert len(checks) == 2  # the fused check runs on the first seed only
    back = report.read_csv(tmp_path / "digits_quick.csv")  # what --report-only re-renders from
    assert [(r["rule"], r["setting"], r["seed"]) for r in back] == [(r["rule"], r["setting"], r["seed"]) for r in rows]
    assert [r["fd"] for r in back] == pytest.approx([r["fd"] for r in rows], rel=1e-12)
    cfg, samg = rows[:2]
    assert cfg["mean_scale"] == pytest.approx(3.0) and cfg["energy_weighted_scale"] == pytest.approx(3.0)
    assert 2.0 <= samg["mean_scale"] <= 6.0 and 2.0 <= samg["energy_weighted_scale"] <= 6.0
    for row in rows:
        for m in digits.METRICS:
            assert math.isfinite(row[m]), (row["rule"], m)
        assert 0.0 <= row["alignment"] <= 1.0 and 0.0 <= row["saturation"] <= 1.0
    for check in checks:  # the combine inside the fused graph gives the host rule's images
        assert check["max_abs_pixel_diff"] < 1e-3, check
    for name in ("digits_quick.csv", "digits_quick.md", "digits_quick_metrics.png", "digits_quick_pareto.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "Fused export vs raw export" in (tmp_path / "digits_quick.md").read_text()


@needs_model
def test_unclipped_decoder_is_the_exported_decoder_before_its_clip():
    from samg.runtime.pipeline import Pipeline

    pipe = Pipeline.load(digits.ensure_export(SAMG_DIGITS_DIR, digits.DEFAULT_CACHE, "raw"))
    latents = pipe("a handwritten 3", guidance="cfg", scale=10.0, steps=4, seed=0, num_images=4, output="latents")
    unclipped = digits.decode_unclipped(pipe, latents)
    as_users_get_it = ((unclipped.transpose(0, 2, 3, 1) / 2 + 0.5).clip(0, 1) * 255).round()
    assert np.array_equal(as_users_get_it, pipe.decode(latents))
    assert np.abs(unclipped).max() > 1.0  # strong guidance overshoots: the Clip really is gone
