"""samg-shapes' UNet (samg/bundled/positional_unet.py): its coordinate features have the hand-derived
values, diffusers' StableDiffusionPipeline loads the class through model_index.json, and the ONNX
export keeps height and width dynamic (ONNX Runtime at a size other than the traced one agrees with
torch)."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from samg.bundled.positional_unet import FREQUENCIES, PositionalUNet2DConditionModel, coordinate_features  # noqa: E402


def test_coordinate_features_are_cell_centres_and_their_sinusoids():
    feats = coordinate_features(2, 4, torch.float32, "cpu")[0].numpy()
    assert feats.shape == (2 + 4 * len(FREQUENCIES), 2, 4)
    x_centres = [-0.75, -0.25, 0.25, 0.75]  # centres of 4 equal cells of [-1, 1]
    y_centres = [-0.5, 0.5]
    np.testing.assert_allclose(feats[0], [x_centres, x_centres], atol=1e-7)
    np.testing.assert_allclose(feats[1], [[y_centres[0]] * 4, [y_centres[1]] * 4], atol=1e-7)
    k = 2
    for f in FREQUENCIES:
        expected = [[math.sin(math.pi * f * x) for x in x_centres]] * 2
        np.testing.assert_allclose(feats[k], expected, atol=1e-6)
        expected_cos_y = [[math.cos(math.pi * f * y)] * 4 for y in y_centres]
        np.testing.assert_allclose(feats[k + 3], expected_cos_y, atol=1e-6)
        k += 4


def _tiny_unet(cross_attention_dim: int = 16):
    torch.manual_seed(0)
    return PositionalUNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(16, 32), layers_per_block=1,
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
    )


def test_position_reaches_the_output():
    # A plain UNet maps a spatially constant input, away from the borders, to a constant output;
    # with the coordinate features the interior varies with position.
    unet = _tiny_unet().eval()
    x = torch.ones(1, 4, 64, 64)  # interior far beyond the convolutions' reach of the borders
    cond = torch.zeros(1, 3, 16)
    with torch.no_grad():
        out = unet(x, 10, cond).sample[0, :, 28:36, 28:36]
        unet.conv_in.project.weight.zero_()
        plain = unet(x, 10, cond).sample[0, :, 28:36, 28:36]
    # float32 rounding in the global self-attention leaves ~1e-5 of spread in the plain case
    assert float((out - out.mean((1, 2), keepdim=True)).abs().max()) > 1e-2
    assert float((plain - plain.mean((1, 2), keepdim=True)).abs().max()) < 1e-4


def test_diffusers_pipeline_loads_the_class(tmp_path):
    from diffusers import StableDiffusionPipeline

    from samg.models.specs import get_spec

    tiny = get_spec("sd15").build_tiny(seed=0)
    unet = _tiny_unet(tiny.text_encoder.config.hidden_size).eval()
    tiny.register_modules(unet=unet)
    tiny.save_pretrained(tmp_path / "pipe")
    index = (tmp_path / "pipe" / "model_index.json").read_text()
    assert '"samg.bundled.positional_unet"' in index and '"PositionalUNet2DConditionModel"' in index
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert type(loaded.unet) is PositionalUNet2DConditionModel
    x = torch.randn(1, 4, 8, 8)
    cond = torch.randn(1, 5, tiny.text_encoder.config.hidden_size)
    with torch.no_grad():
        np.testing.assert_array_equal(loaded.unet(x, 5, cond).sample.numpy(), unet(x, 5, cond).sample.numpy())


def test_onnx_export_keeps_the_size_dynamic(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    unet = _tiny_unet().eval()
    sample, cond = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 16)
    path = tmp_path / "unet.onnx"
    with torch.no_grad():
        torch.onnx.export(
            lambda_module(unet), (sample, torch.tensor([10.0]), cond), str(path), dynamo=False,
            input_names=["sample", "timestep", "cond"], output_names=["out"],
            dynamic_axes={"sample": {0: "B", 2: "H", 3: "W"}, "cond": {0: "B"}, "timestep": {0: "B"}},
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = torch.randn(2, 4, 12, 20)  # neither the traced size nor square
    cond2 = torch.randn(2, 3, 16)
    got = session.run(None, {"sample": other.numpy(), "timestep": np.array([10.0, 10.0], np.float32),
                             "cond": cond2.numpy()})[0]
    with torch.no_grad():
        expected = unet(other, torch.tensor([10.0, 10.0]), cond2).sample.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def lambda_module(unet):
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, cond):
            return self.unet(sample, timestep, cond).sample

    return Wrapper()
