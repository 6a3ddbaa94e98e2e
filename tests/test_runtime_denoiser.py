"""The denoiser adapter: eps / v / flow -> x0 conversions against exact Gaussian predictions, the
fused/raw rule checks, and non-finite detection through a tiny real ONNX model that emits NaN."""

import numpy as np
import pytest

from samg.contract import DiscreteScheduler, FlowScheduler, GuidanceCombineAttrs
from samg.errors import SamgError
from samg.runtime import samplers, schedules
from samg.runtime.denoiser import Guidance, GuidedDenoiser

S0 = 0.5
MEANS = {"pred_uncond": 0.0, "pred_cond": 0.8}  # the two "conditions" are data means
SD = DiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                       beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)
FUSED = GuidanceCombineAttrs()  # a fused graph's combine (what the Denoiser decides on)


class ExactGaussianRunner:
    """The exact prediction of each parametrization for data N(mean, S0^2): an analytic model."""

    input_names = ["latents", "timestep", "encoder_hidden_states"]
    output_names = ["pred_uncond", "pred_cond"]

    def __init__(self, prediction_type, schedule):
        self.pt, self.schedule = prediction_type, schedule

    def run(self, feeds):
        xt, t = feeds["latents"].astype(np.float64), float(feeds["timestep"][0])
        s = float(self.schedule.sigmas[:-1][np.argmin(np.abs(self.schedule.timesteps - t))])
        out = {}
        for name, mu in MEANS.items():
            if self.pt == "flow":
                a, b = 1 - s, s
            else:
                a, b = 1 / np.sqrt(1 + s**2), s / np.sqrt(1 + s**2)
            x0 = mu + a * S0**2 / (a**2 * S0**2 + b**2) * (xt - a * mu)
            eps = (xt - a * x0) / b
            out[name] = {"epsilon": eps, "v_prediction": a * eps - b * x0, "flow": eps - x0}[self.pt]
        return out


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction", "flow"])
def test_x0_conversion_and_cfg_in_x0_space(pt):
    cfg = FlowScheduler(shift=3.0) if pt == "flow" else SD
    sched = schedules.make_schedule(cfg, "flow_euler" if pt == "flow" else "euler", 5)
    w = 3.0
    den = GuidedDenoiser(ExactGaussianRunner(pt, sched), prediction_type=pt, schedule=sched,
                   conditioning={"encoder_hidden_states": np.zeros((4, 1, 1), np.float32)},
                   guidance=Guidance("cfg", w, w))
    x = np.random.default_rng(0).standard_normal((2, 1, 2, 2)) * 3
    for step, sigma in enumerate(sched.sigmas[:-1]):
        sigma = float(sigma)
        x_model = x if pt == "flow" else x  # the sampler variable; exact x0 in that variable:
        var = ((1 - sigma) ** 2 * S0**2 + sigma**2) if pt == "flow" else (S0**2 + sigma**2)
        scale = (1 - sigma) if pt == "flow" else 1.0
        x0 = {k: mu + scale * S0**2 / var * (x_model - scale * mu) for k, mu in MEANS.items()}
        expected = x0["pred_uncond"] + w * (x0["pred_cond"] - x0["pred_uncond"])
        np.testing.assert_allclose(den(x.astype(np.float32), sigma, step).x0, expected, rtol=1e-4, atol=1e-4)


def test_sampling_with_weight_one_follows_the_exact_conditional_ode():
    sched = schedules.make_schedule(SD, "dpmpp_2m", 25, karras=True)
    den = GuidedDenoiser(ExactGaussianRunner("epsilon", sched), prediction_type="epsilon",
                   schedule=sched, conditioning={}, guidance=Guidance("cfg", 1.0, 1.0))
    z = np.random.default_rng(1).standard_normal((256, 1)).astype(np.float32)
    x_start = z * sched.init_noise_sigma
    out = sched.to_model_latents(samplers.sample_dpmpp_2m(den, x_start, sched.sigmas))
    mu, s_max = MEANS["pred_cond"], float(sched.sigmas[0])
    exact = mu + S0 / np.sqrt(S0**2 + s_max**2) * (x_start - mu)  # the probability-flow ODE's map
    np.testing.assert_allclose(out, exact, atol=0.02)  # 25 steps of discretization error


def test_fused_export_refuses_host_only_rules():
    sched = schedules.make_schedule(SD, "euler", 2)
    for rule in ("apg", "cfg-rescale", "cfgpp", "samg-bound"):
        with pytest.raises(SamgError, match="re-export with --guidance raw"):
            GuidedDenoiser(None, prediction_type="epsilon", combine=FUSED, schedule=sched, conditioning={},
                     guidance=Guidance(rule, 3.0, 3.0))


def test_interval_feeds_unit_scales_outside_its_range():
    sched = schedules.make_schedule(SD, "euler", 10)
    den = GuidedDenoiser(None, prediction_type="epsilon", combine=FUSED, schedule=sched, conditioning={},
                   guidance=Guidance("interval", 6.0, 6.0, {"sigma_lo": 0.5, "sigma_hi": 3.0}))
    got = [den.scales_at(i, float(s)) for i, s in enumerate(sched.sigmas[:-1])]
    assert [g[0] for g in got] == [6.0 if 0.5 < s <= 3.0 else 1.0 for s in sched.sigmas[:-1]]
    assert {g[0] for g in got} == {1.0, 6.0}


def _nan_below_timestep_model(path, threshold):
    """guided = latents * (timestep < threshold ? NaN : 1): a real ONNX graph that blows up mid-run."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Constant", [], ["thr"], value=helper.make_tensor("t", f, [], [threshold])),
        helper.make_node("Constant", [], ["nan"], value=helper.make_tensor("n", f, [], [float("nan")])),
        helper.make_node("Constant", [], ["one"], value=helper.make_tensor("o", f, [], [1.0])),
        helper.make_node("Constant", [], ["shape"], value=helper.make_tensor("s", TensorProto.INT64, [4], [-1, 1, 1, 1])),
        helper.make_node("Less", ["timestep", "thr"], ["low"]),
        helper.make_node("Where", ["low", "nan", "one"], ["factor"]),
        helper.make_node("Reshape", ["factor", "shape"], ["factor4"]),
        helper.make_node("Mul", ["latents", "factor4"], ["guided"]),
    ]
    graph = helper.make_graph(nodes, "nan_denoiser", [
        helper.make_tensor_value_info("latents", f, ["B", 4, "H", "W"]),
        helper.make_tensor_value_info("timestep", f, ["B"]),
        helper.make_tensor_value_info("encoder_hidden_states", f, ["2B", 3, 8]),
        helper.make_tensor_value_info("guidance_scales", f, ["B", 2]),
    ], [helper.make_tensor_value_info("guided", f, ["B", 4, "H", "W"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10  # onnxruntime 1.31 reads IR <= 13
    onnx.save(model, str(path))


def test_non_finite_output_names_the_step(tmp_path):
    pytest.importorskip("onnxruntime")
    from samg.runners import open_runner

    path = tmp_path / "denoiser.onnx"
    _nan_below_timestep_model(path, 500.0)
    sched = schedules.make_schedule(SD, "euler", 4)  # timesteps 751, 501, 251, 1: NaN from step 3
    den = GuidedDenoiser(open_runner(path), prediction_type="epsilon", combine=FUSED, schedule=sched,
                   conditioning={"encoder_hidden_states": np.zeros((2, 3, 8), np.float32)},
                   guidance=Guidance("samg", 2.0, 6.0))
    x = np.ones((1, 4, 2, 2), np.float32)
    with pytest.raises(SamgError, match=r"non-finite values in latents after step 3/4"):
        samplers.sample_euler(den, x * sched.init_noise_sigma, sched.sigmas)


def test_open_runner_rejects_unknown_backend_and_missing_file(tmp_path):
    from samg.runners import open_runner

    with pytest.raises(SamgError, match="unknown backend"):
        open_runner(tmp_path / "x.onnx", backend="tvm")
    with pytest.raises(SamgError, match="not found"):
        open_runner(tmp_path / "x.onnx")
