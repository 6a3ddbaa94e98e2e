"""Video end to end through `samg generate`: GIF and MP4 files that read back with the requested
number of frames, for both video layouts ([B,C,F,H,W] per-frame VAE and [B,F,C,H,W] joint 3-D VAE)."""

import pytest

iio = pytest.importorskip("imageio.v3")


def _frames(path):
    return iio.imread(path, index=None)


@pytest.mark.parametrize("model", ["modelscope-t2v", "cogvideox"])
def test_generate_writes_gif_and_mp4_with_all_frames(tiny_export, tmp_path, model):
    from samg.cli import main
    from samg.contract import read_export

    folder = tiny_export(model)
    latent = read_export(folder).latent
    frames = latent.frames
    for suffix in (".gif", ".mp4"):
        if suffix == ".mp4":
            pytest.importorskip("imageio_ffmpeg")
        out = tmp_path / f"{model}{suffix}"
        assert main(["generate", str(folder), "--prompt", "a cat", "--steps", "2", "--quiet", "--out", str(out)]) == 0
        video = _frames(out)
        assert video.shape[0] == frames, (suffix, video.shape)
        assert video.shape[1:3] == (latent.height, latent.width)
        assert video.std() > 0  # not a blank clip
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{model}.gif", f"{model}.mp4"]  # no temp files left
