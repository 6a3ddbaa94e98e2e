"""The sampling loop on any array type (numpy, torch tensors on any device), the runners that take
and return tensors, the torch op samg::guidance_combine, and the whole-loop CUDA graph.

CPU: the same generation through numpy and through torch CPU tensors (the bundled samg-digits
model on the torch backend, fused and raw exports); ONNX Runtime's IO binding on tensors against
its plain `run`; scales as tensors against scales as floats; the op's registration checks and its
one node under torch.compile; the buffer-driven loop a CUDA graph captures, run eagerly, against
the normal loop. GPU (`gpu` marker, skipped without CUDA): the op's CUDA kernel against the
reference, a loop that never synchronises with the host before its end, and graph replays against
the eager loop for two scale settings without a new capture. The GPU tests use a small stand-in
model in samg's own Denoiser wrapper (the GPU machine has no diffusers).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from samg import contract  # noqa: E402
from samg.errors import SamgError  # noqa: E402
from samg.runners.base import InputDecl  # noqa: E402
from samg.runtime import samplers, schedules  # noqa: E402
from samg.runtime.denoiser import Guidance, GuidedDenoiser  # noqa: E402
from samg.runtime.graph_loop import GraphLoop, GraphLoops  # noqa: E402

# numpy keeps the loop's host numbers (the model-input scale 1/sqrt(1 + σ²), DPM-Solver++'s
# coefficients) as float64 scalars (NEP 50) where torch rounds them to float32 first: about one
# float32 ulp per operation. Measured on samg-digits over 8 steps (|x| up to 2.6): at most 4e-6.
# 10x that still tells a different guidance scale apart (a scale 4 -> 4.5 change moves the result
# by more than 1e-2, checked below).
LOOP_ATOL = 5e-5
# The buffer-driven loop is the samplers' float32 operations with the sigma-derived numbers read
# from a float32 buffer instead of host numbers torch rounds to float32: the same values.
BUFFERED_ATOL = 1e-6
STEPS = 8
SD = contract.DiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)
# CogVideoX's recipe: zero terminal SNR, so the first sigma is infinite (a v-prediction loop's limit).
ZERO_SNR = contract.DiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                      beta_schedule="scaled_linear", timestep_spacing="trailing",
                                      rescale_betas_zero_snr=True, snr_shift_scale=3.0)
CUDA = torch.cuda.is_available()


# ------------------------------------------------------------------------------------ helpers


class Recording:
    """A runner passed through, noting the array types of every feed and output."""

    def __init__(self, runner):
        self.runner = runner
        self.input_names, self.output_names = runner.input_names, runner.output_names
        self.tensor_device = getattr(runner, "tensor_device", None)
        self.types: set[str] = set()

    def run(self, feeds):
        outs = self.runner.run(feeds)
        self.types |= {type(v).__module__.split(".")[0] for v in [*feeds.values(), *outs.values()]}
        return outs


def _denoiser(pipe_or_runner, guidance, schedule, conditioning, *, combine=None, prediction_type="epsilon",
              attrs=None):
    """A GuidedDenoiser over a pipeline's denoiser runner (its export's combine) or a bare runner."""
    if hasattr(pipe_or_runner, "export"):
        pipe = pipe_or_runner
        return GuidedDenoiser(pipe.runners["denoiser"], prediction_type=pipe.prediction_type,
                              combine=pipe.export.combine, host_rule_attrs=pipe.export.host_rule_attrs,
                              schedule=schedule, conditioning=conditioning, guidance=guidance)
    return GuidedDenoiser(pipe_or_runner, prediction_type=prediction_type, combine=combine, schedule=schedule,
                          conditioning=conditioning, guidance=guidance, host_rule_attrs=attrs)


def _sample(denoise, sampler, x, sigmas):
    return samplers.get_sampler(sampler)(denoise, x, sigmas, rng=np.random.default_rng(5))


@pytest.fixture(scope="module")
def digits(digits_export, tmp_path_factory):
    """{"fused": Pipeline, "raw": Pipeline} on the torch backend (CPU), with conditioning and noise."""
    from samg.export.exporter import ExportOptions, export
    from samg.runtime.pipeline import Pipeline

    raw = export(ExportOptions(model="digits", out=str(tmp_path_factory.mktemp("digits-raw") / "raw"), guidance="raw",
                               validate=False, quiet=True))
    pipes = {"fused": Pipeline.load(digits_export, backend="torch"), "raw": Pipeline.load(raw, backend="torch")}
    pipe = pipes["fused"]
    size = pipe.export.latent.height
    noise = np.random.default_rng(3).standard_normal(pipe.latent_shape(2, size, size, None)).astype(np.float32)
    return pipes, pipe.conditioning("a handwritten 4", "", 2), noise


# ------------------------------------------------------------------ 1. one loop, any array type

RULE_CASES = [("fused", "samg", 2.0, 6.0), ("fused", "cfg", 4.0, 4.0), ("raw", "apg", 4.0, 4.0)]


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m", "ddim"])
@pytest.mark.parametrize("kind,rule,w_min,w_max", RULE_CASES)
def test_numpy_and_torch_tensors_give_the_same_generation(digits, kind, rule, w_min, w_max, sampler):
    pipes, cond, noise = digits
    pipe = pipes[kind]
    guidance = Guidance(rule, w_min, w_max)
    schedule = pipe.make_schedule(guidance, sampler, STEPS, False)
    start = noise * np.float32(schedule.init_noise_sigma)

    on_host = _sample(_denoiser(pipe, guidance, schedule, cond), sampler, start, schedule.sigmas)
    recording = Recording(pipe.runners["denoiser"])
    on_tensors = _sample(_denoiser(recording, guidance, schedule, cond, combine=pipe.export.combine,
                                   attrs=pipe.export.host_rule_attrs), sampler, torch.from_numpy(start.copy()),
                         schedule.sigmas)

    assert isinstance(on_host, np.ndarray) and isinstance(on_tensors, torch.Tensor)
    assert recording.types == {"torch"}  # every feed and every output stayed a tensor
    np.testing.assert_allclose(on_tensors.numpy(), on_host, atol=LOOP_ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_pipeline_whose_runner_takes_tensors_runs_its_loop_on_them(digits, backend):
    from samg.runtime.pipeline import Pipeline

    pipes, _, noise = digits
    folder = pipes["fused"].export_dir
    options = dict(guidance="samg", w_min=2.0, w_max=6.0, steps=STEPS, sampler="dpmpp_2m", num_images=2,
                   latents=noise, output="latents")
    on_host = Pipeline.load(folder, backend).__call__("a handwritten 4", **options)
    tensors = Pipeline.load(folder, backend, device_tensors=True)
    recording = Recording(tensors.runners["denoiser"])
    tensors.runners["denoiser"] = recording
    assert recording.runner.tensor_device == "cpu"
    on_tensors = tensors("a handwritten 4", **options)
    assert recording.types == {"torch"} and isinstance(on_tensors, np.ndarray)  # back on the host at the end
    np.testing.assert_allclose(on_tensors, on_host, atol=LOOP_ATOL, rtol=0)


def test_the_comparison_tells_a_different_scale_apart(digits):
    pipes, cond, noise = digits
    pipe = pipes["fused"]
    results = []
    for scale in (4.0, 4.5):
        guidance = Guidance("cfg", scale, scale)
        schedule = pipe.make_schedule(guidance, "euler", STEPS, False)
        x = torch.from_numpy(noise * np.float32(schedule.init_noise_sigma))
        results.append(_sample(_denoiser(pipe, guidance, schedule, cond), "euler", x, schedule.sigmas).numpy())
    assert np.abs(results[0] - results[1]).max() > 200 * LOOP_ATOL


def test_device_checks_name_the_first_failing_step_after_the_loop():
    bound = 10.0
    made = []

    def check():
        made.append(samplers.StepCheck(samplers.latent_peak, lambda peak: peak > bound,
                                       lambda i, peak: SamgError(f"step {i + 1}: |x| = {peak:g}")))
        return made[-1]

    steps = [np.full((2, 3), v, np.float32) for v in (1.0, 12.0, 30.0)]
    host = check()
    host(0, steps[0])
    with pytest.raises(SamgError, match=r"step 2: \|x\| = 12"):  # a host array: at once
        host(1, steps[1])
    device = check()
    for i, x in enumerate(steps):
        device(i, torch.from_numpy(x))  # a tensor: kept, nothing raised yet
    with pytest.raises(SamgError, match=r"step 2: \|x\| = 12$"):  # the first failure, not the largest
        device.finish()


def test_non_finite_latents_on_tensors_name_the_step_once_the_loop_ends():
    runner = _stand_in_runner(fused=True, nan_below_timestep=500.0)
    counting = Recording(runner)
    calls = []
    counting.run = lambda feeds, run=counting.run: calls.append(1) or run(feeds)
    schedule = schedules.make_schedule(SD, "euler", 4)  # timesteps 751, 501, 251, 1: NaN from step 3
    den = _denoiser(counting, Guidance("samg", 2.0, 6.0), schedule, _stand_in_conditioning(1),
                    combine=contract.GuidanceCombineAttrs())
    x = torch.ones((1, 4, 4, 4)) * float(schedule.init_noise_sigma)
    with pytest.raises(SamgError, match=r"non-finite values in latents after step 3/4 \(64 of 64\)"):
        samplers.sample_euler(den, x, schedule.sigmas)
    assert len(calls) == 4  # the check read its result after the last step, not at step 3


# -------------------------------------------------------- 4. scales without host -> device copies

SCALE_CASES = [("samg", {"w_min": 2.0, "w_max": 6.0}), ("samg-bound", {"w_min": 2.0, "w_max": 6.0}),
               ("samg-linear", {"w_min": 2.0, "w_max": 6.0}), ("samg-quantile", {"w_min": 2.0, "w_max": 6.0}),
               ("cfg", {"scale": 4.5}), ("cfg-rescale", {"scale": 4.5}), ("apg", {"scale": 4.5}),
               ("cfg-zero-star", {"scale": 4.5})]


class _HostTensors:
    """Records every tensor made from host data (torch.tensor / as_tensor of a Python value or a
    numpy array dispatch to aten.lift_fresh), the copy the old scale handling made per call."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if "lift_fresh" in str(func):
                    outer.made += 1
                return func(*args, **(kwargs or {}))

        self.made, self.mode = 0, Mode()


@pytest.mark.parametrize("name,scales", SCALE_CASES)
def test_rules_take_tensor_scales_and_make_no_tensor_from_float_scales(name, scales):
    from samg.guidance import get_rule

    rule = get_rule(name)
    rng = np.random.default_rng(0)
    u, c = (torch.from_numpy(rng.standard_normal((2, 4, 6, 6)).astype(np.float32)) for _ in range(2))
    call = lambda **s: rule(u, c, step=1, sigma=2.0, state=rule.new_state(), **s)  # noqa: E731

    host = _HostTensors()
    with host.mode:
        from_floats = call(**scales)
    assert host.made == 0
    as_0d = call(**{k: torch.tensor(v) for k, v in scales.items()})
    as_vectors = call(**{k: torch.full((2,), v) for k, v in scales.items()})
    torch.testing.assert_close(as_0d, from_floats, rtol=0, atol=0)  # the same float32 arithmetic
    torch.testing.assert_close(as_vectors, from_floats, rtol=0, atol=0)


# -------------------------------------------------------------------- 2. runners on tensors


@pytest.mark.parametrize("kind", ["fused", "raw"])
def test_onnxruntime_io_binding_on_cpu_tensors_gives_what_run_gives(digits, kind):
    from samg.runners import open_runner

    pipes, cond, noise = digits
    folder = pipes[kind].export_dir
    runner = open_runner(folder / "denoiser.onnx", "onnxruntime", "cpu", threads=1)
    feeds = {"latents": noise, "timestep": np.array([501.0, 501.0], np.float32), **cond}
    if kind == "fused":
        feeds["guidance_scales"] = np.array([[2.0, 6.0], [3.0, 3.0]], np.float32)
    plain = runner.run(feeds)
    bound = runner.run({k: torch.from_numpy(v.copy()) for k, v in feeds.items()})
    wider = runner.run({k: torch.from_numpy(v.astype(np.float64)) for k, v in feeds.items()})  # cast on the device side
    assert set(bound) == set(plain) == set(runner.output_names)
    for name in plain:
        assert isinstance(bound[name], torch.Tensor)
        np.testing.assert_array_equal(bound[name].numpy(), plain[name])
        np.testing.assert_array_equal(wider[name].numpy(), plain[name])

    text = open_runner(folder / "text_encoder.onnx", "onnxruntime", "cpu", threads=1)
    length = text.inputs["input_ids"].dims[1]
    ids = np.array([[1, 5, 9, 2, 0, 0, 0, 0], [1, 7, 2, 0, 0, 0, 0, 0]], np.int64)[:, :length]
    plain_text, bound_text = text.run({"input_ids": ids}), text.run({"input_ids": torch.from_numpy(ids)})
    for name in plain_text:  # output dims named by the inputs (N) are allocated beside them
        np.testing.assert_array_equal(bound_text[name].numpy(), plain_text[name])


def test_torch_runner_takes_tensors_and_computes_in_the_asked_dtype(digits):
    from samg.runners import open_runner

    pipes, cond, noise = digits
    folder = pipes["fused"].export_dir
    feeds = {"latents": noise, "timestep": np.array([501.0, 501.0], np.float32), **cond,
             "guidance_scales": np.array([[2.0, 6.0], [3.0, 3.0]], np.float32)}
    runner = pipes["fused"].runners["denoiser"]
    assert runner.tensor_device is None  # on the CPU the pipeline's loop keeps numpy
    plain = runner.run(feeds)["guided"]
    tensors = runner.run({k: torch.from_numpy(v.copy()) for k, v in feeds.items()})["guided"]
    assert isinstance(tensors, torch.Tensor) and tensors.dtype == torch.float32
    np.testing.assert_array_equal(tensors.numpy(), plain)  # the same module on the same values

    half = open_runner(folder / "denoiser.onnx", "torch", "cpu", dtype="bfloat16")
    try:
        low = half.run({k: torch.from_numpy(v.copy()) for k, v in feeds.items()})["guided"]
    finally:
        half.module.to(torch.float32)  # the loaded pipeline is shared with the other runners of this folder
    assert low.dtype == torch.float32  # outputs come back float32
    assert half.dtype == torch.bfloat16
    scale = float(np.abs(plain).max())
    np.testing.assert_allclose(low.numpy(), plain, atol=0.05 * scale)  # bfloat16: 8 bits of mantissa
    assert np.abs(low.numpy() - plain).max() > 0  # it did compute in bfloat16
    with pytest.raises(SamgError, match="computes in float32, float16, bfloat16"):
        open_runner(folder / "denoiser.onnx", "torch", "cpu", dtype="int8")


# ------------------------------------------------------------------- the torch op


def _op_args(shape=(2, 4, 6, 6), dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    u, c = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    scales = torch.tensor([[2.0, 6.0], [3.0, 3.0]], device=device)[: shape[0]]
    return u, c, scales


def test_guidance_combine_is_one_registered_op_that_compile_keeps_whole():
    from samg.guidance import samg_v1
    from samg.op import guidance_combine
    from samg.op.torch_op import combine_op

    combine_op()  # registered
    u, c, scales = _op_args()
    torch.library.opcheck(torch.ops.samg.guidance_combine.default, (u, c, scales, 1.0, 4.0, 3, 1))

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    @torch.compile(backend=recording_backend, fullgraph=True)
    def combine(u, c, scales):
        return guidance_combine(u * 2.0, c, scales, smooth=3)

    with torch.no_grad():
        got = combine(u, c, scales)
    nodes = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "guidance_combine" in str(n.target)]
    assert len(nodes) == 1  # one op in the compiled graph, not the reference's dozens
    torch.testing.assert_close(got, samg_v1(u * 2.0, c, scales[:, 0], scales[:, 1], smooth=3), rtol=0, atol=0)

    u.requires_grad_(True)  # with gradients wanted the differentiable reference runs
    guidance_combine(u, c, scales).sum().backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()


# ------------------------------------------------------------------- 3. the loop a CUDA graph captures


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("kind,rule,w_min,w_max", RULE_CASES)
def test_buffered_loop_run_eagerly_equals_the_normal_loop(digits, kind, rule, w_min, w_max, sampler):
    pipes, cond, noise = digits
    pipe = pipes[kind]
    guidance = Guidance(rule, w_min, w_max)
    schedule = pipe.make_schedule(guidance, sampler, STEPS, False)
    start = noise * np.float32(schedule.init_noise_sigma)
    normal = _sample(_denoiser(pipe, guidance, schedule, cond), sampler, torch.from_numpy(start.copy()),
                     schedule.sigmas)
    on_host = _sample(_denoiser(pipe, guidance, schedule, cond), sampler, start, schedule.sigmas)

    loop = GraphLoop(_denoiser(pipe, guidance, schedule, cond), sampler, torch.from_numpy(start.copy()))
    buffered = loop.eager()
    np.testing.assert_allclose(buffered.numpy(), normal.numpy(), atol=BUFFERED_ATOL, rtol=0)
    np.testing.assert_allclose(buffered.numpy(), on_host, atol=LOOP_ATOL, rtol=0)


def test_buffered_loop_takes_a_new_request_from_its_buffers(digits):
    pipes, cond, noise = digits
    pipe = pipes["fused"]
    other_prompt = pipe.conditioning("a handwritten 7", "a handwritten 1", 2)
    requests = [(Guidance("samg", 2.0, 6.0), cond, noise),
                (Guidance("samg", 1.5, 9.0), other_prompt, noise[::-1].copy())]
    loop = None
    for guidance, conditioning, latents in requests:
        schedule = pipe.make_schedule(guidance, "dpmpp_2m", STEPS, False)
        x = torch.from_numpy(latents * np.float32(schedule.init_noise_sigma))
        den = _denoiser(pipe, guidance, schedule, conditioning)
        if loop is None:
            loop = GraphLoop(den, "dpmpp_2m", x)
        else:
            loop.load(x, den)  # the same buffers, new values: scales, conditioning, latents
        expected = _sample(_denoiser(pipe, guidance, schedule, conditioning), "dpmpp_2m", x.clone(), schedule.sigmas)
        np.testing.assert_allclose(loop.eager().numpy(), expected.numpy(), atol=BUFFERED_ATOL, rtol=0)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "flow_euler"])
@pytest.mark.parametrize("rule", ["samg", "apg"])
def test_buffered_loop_at_infinite_sigma_and_for_flow_models(sampler, rule):
    """The sigma-limit branches (v-prediction from zero SNR) and flow's x0, with a stand-in model."""
    flow = sampler == "flow_euler"
    prediction_type = "flow" if flow else "v_prediction"
    cfg = contract.FlowScheduler(shift=3.0) if flow else ZERO_SNR
    schedule = schedules.make_schedule(cfg, sampler, 5)
    assert flow or np.isinf(schedule.sigmas[0])
    fused = rule == "samg"
    runner = _stand_in_runner(fused=fused)
    guidance = Guidance(rule, 2.0, 6.0) if fused else Guidance(rule, 4.0, 4.0)
    combine = contract.GuidanceCombineAttrs() if fused else None
    make = lambda: _denoiser(runner, guidance, schedule, _stand_in_conditioning(2),  # noqa: E731
                             prediction_type=prediction_type, combine=combine)
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 4, 6, 6)).astype(np.float32))
    normal = _sample(make(), sampler, x * float(schedule.init_noise_sigma), schedule.sigmas)
    buffered = GraphLoop(make(), sampler, x * float(schedule.init_noise_sigma)).eager()
    assert torch.isfinite(normal).all()
    np.testing.assert_allclose(buffered.numpy(), normal.numpy(), atol=BUFFERED_ATOL, rtol=0)


def test_a_graph_is_keyed_by_structure_not_by_scales_prompts_or_latents():
    runner = _stand_in_runner(fused=True)
    x = torch.zeros((2, 4, 6, 6))

    def key(guidance, steps=4, sampler="euler", cond_seed=1, latents=x):
        schedule = schedules.make_schedule(SD, sampler, steps)
        den = _denoiser(runner, guidance, schedule, _stand_in_conditioning(2, seed=cond_seed),
                        combine=contract.GuidanceCombineAttrs())
        return GraphLoop.key(den, sampler, latents)

    base = key(Guidance("samg", 2.0, 6.0))
    assert key(Guidance("samg", 1.5, 9.0), cond_seed=7, latents=x + 1) == base  # values live in buffers
    assert key(Guidance("samg", 2.0, 6.0), steps=5) != base
    assert key(Guidance("samg", 2.0, 6.0), sampler="dpmpp_2m") != base
    assert key(Guidance("samg", 2.0, 6.0), latents=torch.zeros((1, 4, 6, 6))) != base
    assert key(Guidance("cfg", 4.0, 4.0)) != base


def test_graph_loop_refuses_what_it_cannot_capture():
    schedule = schedules.make_schedule(SD, "euler", 4)
    x = torch.zeros((2, 4, 6, 6))
    fused = _denoiser(_stand_in_runner(fused=True), Guidance("samg", 2.0, 6.0), schedule, _stand_in_conditioning(2),
                      combine=contract.GuidanceCombineAttrs())
    with pytest.raises(SamgError, match="deterministic samplers .* not 'euler_a'"):
        GraphLoop(fused, "euler_a", x)
    cfgpp = _denoiser(_stand_in_runner(fused=False), Guidance("cfgpp", 0.5, 0.5), schedule, _stand_in_conditioning(2))
    with pytest.raises(SamgError, match="cfgpp.* reads host values"):
        GraphLoop(cfgpp, "euler", x)
    with pytest.raises(SamgError, match="needs the torch backend on a CUDA device"):
        GraphLoop(fused, "euler", x).replay()


# ------------------------------------------------------------------- a stand-in model (GPU tests too)


class _StandInUNet(torch.nn.Module):
    """A stand-in for a diffusers UNet2DConditionModel (its call signature): seeded weights, an output
    that depends on the latents, the timestep and the conditioning, and differs between the halves
    of the doubled batch, so guidance has a Δ to act on. NaN below `nan_below_timestep` if given."""

    def __init__(self, channels: int = 4, dim: int = 8, nan_below_timestep: float | None = None):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.proj = torch.nn.Linear(dim, channels)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        self.nan_below = nan_below_timestep

    def forward(self, x, t, encoder_hidden_states, added_cond_kwargs=None, return_dict=False):
        emb = self.proj(encoder_hidden_states.mean(1).to(self.proj.weight.dtype)).to(x.dtype)[:, :, None, None]
        phase = torch.cos(t.float() / 300.0).to(x.dtype)[:, None, None, None]
        out = torch.tanh(self.conv(x)) * 0.5 + 0.3 * x + emb * phase
        if self.nan_below is not None:
            out = out * torch.where(t < self.nan_below, float("nan"), 1.0).to(x.dtype)[:, None, None, None]
        return (out,)


def _stand_in_conditioning(batch: int, dim: int = 8, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"encoder_hidden_states": rng.standard_normal((2 * batch, 3, dim)).astype(np.float32)}


def _stand_in_runner(*, fused: bool, device: str = "cpu", dtype: str = "float32", nan_below_timestep=None):
    """The torch runner over samg's own Denoiser wrapper around the stand-in UNet (fused: the
    GuidanceCombine op inside, as an export's graph)."""
    from samg.export.wrappers import Denoiser
    from samg.models.specs import get_spec
    from samg.runners.torch import TorchRunner

    module = Denoiser(_StandInUNet(nan_below_timestep=nan_below_timestep), get_spec("digits"), fused=fused,
                      combine=contract.GuidanceCombineAttrs().attributes(), extras={"spatial_factor": 2})
    f32 = np.dtype(np.float32)
    inputs = {"latents": InputDecl(f32, ("B", 4, "H", "W")), "timestep": InputDecl(f32, ("B",)),
              "encoder_hidden_states": InputDecl(f32, ("2B", 3, 8))}
    if fused:
        inputs["guidance_scales"] = InputDecl(f32, ("B", 2))
    outputs = ["guided"] if fused else ["pred_uncond", "pred_cond"]
    return TorchRunner.for_module(module, inputs, outputs, device=device, dtype=dtype)


# ------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape,smooth,channel_axis", [((2, 4, 16, 16), 0, 1), ((2, 4, 16, 16), 3, 1),
                                                       ((1, 3, 4, 8, 8), 3, 2)])
def test_the_ops_cuda_kernel_matches_the_reference(dtype, tolerance, shape, smooth, channel_axis):
    from samg.guidance import samg_v1
    from samg.op.torch_op import _cuda_launcher, combine_op

    assert _cuda_launcher() is not None, "the CUDA kernel could not be compiled here (CuPy, CUDA headers)"
    u, c, scales = _op_args(shape, dtype, "cuda")
    with torch.no_grad():
        got = combine_op()(u, c, scales, 1.0, 4.0, smooth, channel_axis)
    expected = samg_v1(u.double(), c.double(), scales[:, 0].double(), scales[:, 1].double(), smooth=smooth,
                       channel_axis=channel_axis)
    assert got.dtype == dtype and got.is_cuda
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m"])
def test_a_loop_on_the_gpu_synchronises_once_and_matches_the_cpu(sampler):
    guidance = Guidance("samg", 2.0, 6.0)
    schedule = schedules.make_schedule(SD, sampler, 6)
    cond = _stand_in_conditioning(2)
    start = np.random.default_rng(4).standard_normal((2, 4, 16, 16)).astype(np.float32) * np.float32(
        schedule.init_noise_sigma)
    on_cpu = _sample(_denoiser(_stand_in_runner(fused=True), guidance, schedule, cond,
                               combine=contract.GuidanceCombineAttrs()), sampler, start, schedule.sigmas)

    runner = _stand_in_runner(fused=True, device="cuda", dtype="float16")
    assert runner.tensor_device == "cuda"
    den = _denoiser(runner, guidance, schedule, cond, combine=contract.GuidanceCombineAttrs())
    x = den.place(start)  # the noise goes up once
    assert x.is_cuda
    den(x, float(schedule.sigmas[0]), 0)  # warm-up: the CUDA kernel compiles, the tables and conditioning go up
    den = _denoiser(runner, guidance, schedule, cond, combine=contract.GuidanceCombineAttrs())
    den.placed_feeds(x)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            on_gpu = _sample(den, sampler, x, schedule.sigmas)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]  # the finite check's one read after the loop
    # float16 model and combine against float32: a few float16 roundings per step
    np.testing.assert_allclose(on_gpu.cpu().numpy(), on_cpu, atol=0.03 * float(np.abs(on_cpu).max()))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("fused,dtype", [(True, "float16"), (True, "float32"), (False, "float32")])
def test_graph_replays_equal_the_eager_loop_for_two_scale_settings(sampler, fused, dtype):
    runner = _stand_in_runner(fused=fused, device="cuda", dtype=dtype)
    combine = contract.GuidanceCombineAttrs() if fused else None
    rule = "samg" if fused else "apg"
    schedule = schedules.make_schedule(SD, sampler, 6)
    start = torch.from_numpy(np.random.default_rng(4).standard_normal((2, 4, 16, 16)).astype(np.float32)).cuda()
    start = start * float(schedule.init_noise_sigma)
    settings = [Guidance(rule, 2.0, 6.0) if fused else Guidance(rule, 4.0, 4.0),
                Guidance(rule, 1.5, 9.0) if fused else Guidance(rule, 7.0, 7.0)]
    loops, results = GraphLoops(), []
    for guidance in settings:
        den = _denoiser(runner, guidance, schedule, _stand_in_conditioning(2), combine=combine)
        replayed = loops.sample(den, sampler, start)  # the first setting captures, the second replays
        (loop,) = loops.loops.values()
        eager = loop.eager()
        # Same kernels; the combine kernel's energy sums are atomics (any order): float32 last bits.
        tolerance = 1e-5 if dtype == "float32" else 1e-2
        torch.testing.assert_close(replayed, eager, rtol=tolerance, atol=tolerance)
        results.append(replayed)
    assert loop.captures == 1  # the second setting replayed the first capture
    assert (results[0] - results[1]).abs().max() > 0.05  # and the scales did change the result


# ----------------------------------------------- GPU runners asked for on a machine whose torch has no CUDA


@pytest.mark.skipif(CUDA, reason="checks a CPU build of torch")
def test_onnxruntime_on_cuda_with_a_cpu_torch_keeps_the_loop_on_numpy(digits):
    """`--backend onnxruntime --device cuda` with a CPU torch (this project's own install: onnxruntime-gpu
    beside a CPU torch) runs its loop on numpy, as before the device loop; asking for device tensors
    there is one line."""
    from samg.runners.onnxruntime import OrtRunner

    pipes, cond, noise = digits
    pipe = pipes["fused"]
    graph = pipe.export_dir / "denoiser.onnx"
    # device "cuda" with the CPU EP named: the runner asks for CUDA, this torch cannot place tensors there
    runner = OrtRunner(graph, device="cuda", providers=["CPUExecutionProvider"])
    assert runner.tensor_device is None
    guidance = Guidance("samg", 2.0, 6.0)
    den = _denoiser(runner, guidance, pipe.make_schedule(guidance, "euler", STEPS, False), cond,
                    combine=pipe.export.combine)
    assert den.place(noise) is noise  # no torch.empty(device="cuda"): it raised "Torch not compiled with CUDA"
    with pytest.raises(SamgError) as refused:
        OrtRunner(graph, device="cuda", providers=["CPUExecutionProvider"], device_tensors=True)
    assert "\n" not in str(refused.value)
    assert str(refused.value).startswith("device_tensors=True on CUDA needs torch with CUDA")


@pytest.mark.skipif(CUDA, reason="checks a CPU build of torch")
def test_tensorrt_runner_options_are_one_line_errors(digits):
    """Options the TensorRT runner does not take, and device tensors without a CUDA torch, are refused
    in one line through Pipeline.load (before any engine or GPU is touched)."""
    from samg.runners.tensorrt import TensorRTRunner
    from samg.runtime.pipeline import Pipeline

    folder = digits[0]["fused"].export_dir
    with pytest.raises(SamgError, match=r"^the TensorRT backend takes no option 'dtype': drop it"):
        Pipeline.load(folder, "tensorrt", "cuda", dtype="float16")
    with pytest.raises(SamgError, match=r"^device_tensors=True needs torch with CUDA .*: install a CUDA build"):
        Pipeline.load(folder, "tensorrt", "cuda", device_tensors=True)
    runner = TensorRTRunner.__new__(TensorRTRunner)  # what tensor_device reads (an engine needs a GPU)
    runner.device_tensors = None
    assert runner.tensor_device is None  # the default: tensors only where torch has CUDA


# ------------------------------------------------------------ the whole-loop CUDA graph as a pipeline option


def _stand_in_pipeline(runner, *, fused: bool):
    """A Pipeline over a stand-in runner: what Pipeline.sample reads of an export (scheduler, combine,
    prediction type) without an export folder (the GPU machine has no exporter)."""
    from types import SimpleNamespace

    from samg.runtime.pipeline import Pipeline

    export = SimpleNamespace(scheduler=SD, combine=contract.GuidanceCombineAttrs() if fused else None,
                             host_rule_attrs=contract.GuidanceCombineAttrs(), latent=None,
                             prediction_type="epsilon")
    return Pipeline(None, export, {"denoiser": runner}, [])


def test_cuda_graph_is_refused_in_one_line_where_it_cannot_run(digits, tmp_path):
    import subprocess
    import sys

    pipes, cond, noise = digits
    fused, raw = pipes["fused"], pipes["raw"]
    on_the_cpu = "--cuda-graph needs the torch backend on a CUDA device: pass --backend torch --device cuda, " \
                 "or drop --cuda-graph"
    with pytest.raises(SamgError) as refused:
        fused("a handwritten 4", steps=2, cuda_graph=True)  # the torch backend, on the CPU
    assert str(refused.value) == on_the_cpu
    with pytest.raises(SamgError) as refused:
        fused.sample(cond, noise, guidance=Guidance("samg", 2.0, 6.0), sampler="euler", steps=2, cuda_graph=True)
    assert str(refused.value) == on_the_cpu
    with pytest.raises(SamgError, match=r"^--cuda-graph runs the deterministic samplers \(euler, ddim, flow_euler, "
                                        r"dpmpp_2m\), not 'euler_a': pass --sampler euler, or drop --cuda-graph$"):
        fused.check_cuda_graph(Guidance("samg", 2.0, 6.0), "euler_a", capturable=True)
    with pytest.raises(SamgError, match=r"^guidance 'cfgpp' reads host values during a step, so --cuda-graph"):
        raw.check_cuda_graph(Guidance("cfgpp", 0.5, 0.5), "euler", capturable=True)
    raw.check_cuda_graph(Guidance("apg", 4.0, 4.0), "dpmpp_2m", capturable=True)  # capturable: no error

    out = tmp_path / "x.png"
    result = subprocess.run([sys.executable, "-m", "samg", "generate", str(fused.export_dir), "--prompt", "a 4",
                             "--cuda-graph", "--quiet", "--out", str(out)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == f"samg generate: error: {on_the_cpu}"
    assert not out.exists()


class _Diverging:
    """A runner passed through whose guided output is scaled up from one timestep down (the latents
    blow up) and is NaN from a later one, to see which failure a loop names."""

    def __init__(self, runner, *, tensor_device, huge_below: float, nan_below: float):
        self.runner, self.tensor_device = runner, tensor_device
        self.input_names, self.output_names = runner.input_names, runner.output_names
        self.huge_below, self.nan_below = huge_below, nan_below

    def run(self, feeds):
        outs = dict(self.runner.run(feeds))
        t = float(feeds["timestep"][0])
        factor = float("nan") if t < self.nan_below else 1e7 if t < self.huge_below else 1.0
        outs["guided"] = outs["guided"] * factor
        return outs


def test_a_blow_up_before_a_nan_is_named_alike_on_the_host_and_on_tensors(digits):
    """The host loop stops at the blow-up; a loop on tensors reads both checks after its end and must
    name the same (earlier) step, not the later NaN."""
    pipes, cond, noise = digits
    pipe = pipes["fused"]
    guidance = Guidance("samg", 2.0, 6.0)
    schedule = pipe.make_schedule(guidance, "euler", STEPS, False)
    timesteps = [schedule.timestep_for(float(s)) for s in schedule.sigmas[:-1]]
    huge_below, nan_below = (timesteps[2] + timesteps[3]) / 2, (timesteps[5] + timesteps[6]) / 2  # steps 4 and 7
    messages = {}
    for where in (None, "cpu"):
        runner = _Diverging(pipe.runners["denoiser"], tensor_device=where, huge_below=huge_below, nan_below=nan_below)
        with pytest.raises(SamgError) as failed:
            pipe.sample(cond, noise, guidance=guidance, sampler="euler", steps=STEPS, runner=runner)
        messages[where] = str(failed.value)
    assert messages[None].startswith("latents reached |x| = ") and f"after step 4/{STEPS}," in messages[None]
    assert messages["cpu"] == messages[None]

    # the buffered loop (what a CUDA graph captures) finishes its checks the same way
    runner = _Diverging(pipe.runners["denoiser"], tensor_device="cpu", huge_below=huge_below, nan_below=nan_below)
    den = _denoiser(runner, guidance, schedule, cond, combine=pipe.export.combine)
    x = torch.from_numpy(noise * np.float32(schedule.init_noise_sigma))
    with pytest.raises(SamgError, match=rf"after step 4/{STEPS}, beyond the sane bound"):
        GraphLoop(den, "euler", x, bound=1e3).eager()


@pytest.mark.skipif(CUDA, reason="where CUDA works the kernels may compile")
def test_the_ops_cuda_kernel_falls_back_to_the_reference_once_where_it_cannot_be_had(tmp_path):
    """The op's CUDA kernel function, where its kernels cannot be compiled (here: no CuPy, or CuPy
    without a usable GPU or driver, and CUDA_PATH/CUDA_HOME pointing at a folder without headers),
    computes the reference rule and says so once on stderr, without a traceback; the failure is kept."""
    import os
    import subprocess
    import sys

    from samg.build.loader import gpu_compute_capability

    if gpu_compute_capability() is not None:
        pytest.skip("a CUDA driver sees a GPU here: the kernels might compile and launch on CPU memory")
    script = (
        "import torch\n"
        "from samg.op import torch_op\n"
        "from samg.guidance import samg_v1\n"
        "g = torch.Generator().manual_seed(0)\n"
        "u, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)\n"
        "scales = torch.tensor([[2.0, 6.0], [3.0, 3.0]])\n"
        "calls = [torch_op._cuda_combine(u, c, scales, 1.0, 4.0, 3, 1) for _ in range(2)]\n"
        "expected = samg_v1(u, c, scales[:, 0], scales[:, 1], tau=1.0, sharpness=4.0, smooth=3)\n"
        "print(all(torch.equal(out, expected) for out in calls), torch_op.cuda_kernel_problem(0) is not None)\n"
    )
    no_headers = tmp_path / "cuda"
    (no_headers / "include").mkdir(parents=True)
    env = {**os.environ, "CUDA_PATH": str(no_headers), "CUDA_HOME": str(no_headers), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "True"]
    notes = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(notes) == 1, notes  # said once for two calls and the question after them
    assert notes[0].startswith("samg: samg::guidance_combine runs the reference rule on cuda:0, not its CUDA kernel (")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("fused", [True, False])
def test_pipeline_cuda_graph_equals_the_loop_without_it_and_replays_for_new_values(fused):
    runner = _stand_in_runner(fused=fused, device="cuda", dtype="float32")
    pipe = _stand_in_pipeline(runner, fused=fused)
    rule = "samg" if fused else "apg"
    settings = [(Guidance(rule, 2.0, 6.0) if fused else Guidance(rule, 4.0, 4.0), 1, 4),
                (Guidance(rule, 1.5, 9.0) if fused else Guidance(rule, 7.0, 7.0), 7, 5)]
    results = []
    for guidance, cond_seed, noise_seed in settings:
        cond = _stand_in_conditioning(2, seed=cond_seed)
        noise = np.random.default_rng(noise_seed).standard_normal((2, 4, 16, 16)).astype(np.float32)
        options = dict(guidance=guidance, sampler="dpmpp_2m", steps=6)
        plain = pipe.sample(cond, noise, **options)
        graphed = pipe.sample(cond, noise, cuda_graph=True, **options)
        assert isinstance(graphed, np.ndarray) and graphed.dtype == np.float32
        # the same kernels; the combine's energy sums are float32 atomics (any order)
        np.testing.assert_allclose(graphed, plain, rtol=1e-4, atol=1e-4 * float(np.abs(plain).max()))
        results.append(graphed)
    (loop,) = pipe.graph_loops.loops.values()
    assert loop.captures == 1  # the second request replayed the first one's capture
    assert np.abs(results[0] - results[1]).max() > 0.05
