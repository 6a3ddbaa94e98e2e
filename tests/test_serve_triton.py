"""`samg serve` on NVIDIA Triton Inference Server (samg.serve): the repository writer, request
parsing, and real tritonserver processes on loopback answering tritonclient requests.

The server tests need `tritonserver` (`samg serve --install-triton`, which `make test` runs once)
and skip, saying so, when it cannot be found; with SAMG_REQUIRE_TRITON=1 (set by .ci/run) they
fail instead, so CI cannot pass without the load test. Each server is started on free loopback
ports and stopped (or killed) by its test; the requests are few and short (4 to 20 steps on
samg-digits and a tiny SDXL export).

Expected images come from the independent single-request path, Pipeline.__call__ in this process:
final latents, decoded here through the VAE graph to exact floats. The server's images must equal
them after rounding, or be one level off where the exact value sits within TIE_EPS of x.5: the
server's Python backend runs numpy 1.26 (samg.serve.install), whose float math may differ from
this process's in the last bits (measured: latents within 4e-6, images within one level).
"""

import contextlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from samg.errors import SamgError

TIE_EPS = 0.01  # a level flip is allowed only this close to a rounding boundary
MODEL_LOAD_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 120
REQUIRE_TRITON_ENV = "SAMG_REQUIRE_TRITON"  # "1": a missing tritonserver or tritonclient fails the server tests
EXIT_WAIT_S = 30  # a killed process, and what it started, must be gone within this


# -- request parsing (no server) -------------------------------------------------------------------
def test_parse_request_maps_inputs_to_submit_keywords():
    from samg.serve.protocol import parse_request

    rows = parse_request({
        "prompt": np.array([b"a red fox"], dtype=object), "guidance": np.array([b"cfg"], dtype=object),
        "guidance_scale": np.array([5.5], np.float32), "num_inference_steps": np.array([12], np.int32),
        "seed": np.array([2**40 + 3], np.int64), "height": np.array([32], np.int32),
        "negative_prompt": np.array(["blurry, 模糊".encode()], dtype=object),
    })
    assert rows == [{"prompt": "a red fox", "negative_prompt": "blurry, 模糊", "guidance": "cfg", "guidance_scale": 5.5,
                     "num_inference_steps": 12, "seed": 2**40 + 3, "height": 32}]
    assert all(type(v) in (str, int, float) for v in rows[0].values())  # plain Python values for submit
    batched = parse_request({"prompt": np.array([[b"a"], [b"b"]], dtype=object),
                             "seed": np.array([[1], [2]], np.int64)}, batched=True)
    assert batched == [{"prompt": "a", "seed": 1}, {"prompt": "b", "seed": 2}]


@pytest.mark.parametrize("tensors, words", [
    ({}, "input prompt is missing"),
    ({"prompt": np.array([b"   "], dtype=object)}, "input prompt is empty"),
    ({"prompt": np.array([b"a", b"b"], dtype=object)}, "input prompt has shape [2], expected [1]"),
    ({"prompt": np.array([b"\xff\xfe"], dtype=object)}, "input prompt is not UTF-8"),
    ({"prompt": np.array([b"a"], dtype=object), "guidance_scale": np.array([np.nan], np.float32)},
     "input guidance_scale is nan, not a finite number"),
    ({"prompt": np.array([b"a"], dtype=object), "guidance_min": np.array([np.inf], np.float32)},
     "input guidance_min is inf, not a finite number"),
    ({"prompt": np.array([b"a"], dtype=object), "seed": np.array([1.5])}, "input seed must be INT64"),
    ({"prompt": np.array([b"a"], dtype=object), "steps": np.array([3], np.int32)}, "unknown input steps"),
])
def test_parse_request_errors_name_the_input(tensors, words):
    from samg.serve.protocol import parse_request

    with pytest.raises(SamgError) as err:
        parse_request(tensors)
    assert words in str(err.value) and "\n" not in str(err.value)


# -- the repository writer (no server) -------------------------------------------------------------
def _parse_config(path: Path):
    """config.pbtxt through Triton's own schema (tritonclient's ModelConfig protobuf)."""
    model_config = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config.ModelConfig())


def test_repository_config_declares_the_protocol(digits_export, tmp_path):
    from samg.serve.repository import ModelEntry, write_repository

    out = write_repository(tmp_path / "repo", digits_export,
                           models=(ModelEntry(), ModelEntry("samg_dynamic", "dynamic", 4)))
    config = _parse_config(out / "samg" / "config.pbtxt")
    from tritonclient.grpc import model_config_pb2 as mc

    inputs = {i.name: (mc.DataType.Name(i.data_type), list(i.dims), i.optional) for i in config.input}
    assert inputs == {  # the protocol of docs/serving.md, written out
        "prompt": ("TYPE_STRING", [1], False),
        "negative_prompt": ("TYPE_STRING", [1], True), "guidance": ("TYPE_STRING", [1], True),
        "guidance_scale": ("TYPE_FP32", [1], True), "guidance_min": ("TYPE_FP32", [1], True),
        "num_inference_steps": ("TYPE_INT32", [1], True), "seed": ("TYPE_INT64", [1], True),
        "height": ("TYPE_INT32", [1], True), "width": ("TYPE_INT32", [1], True),
        "num_frames": ("TYPE_INT32", [1], True),
    }
    outputs = {o.name: (mc.DataType.Name(o.data_type), list(o.dims)) for o in config.output}
    assert outputs == {"image": ("TYPE_UINT8", [-1, -1, 3]), "seed": ("TYPE_INT64", [1])}  # dynamic resolution
    assert (config.name, config.backend, config.max_batch_size) == ("samg", "python", 0)
    assert not config.HasField("dynamic_batching")
    assert not config.model_transaction_policy.decoupled  # plain HTTP/gRPC infer must work
    assert [(g.count, mc.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [(1, "KIND_CPU")]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params == {"export_dir": str(Path(digits_export).resolve()), "mode": "continuous", "max_batch_size": "8",
                      "max_queue": "64", "backend": "onnxruntime", "device": "cpu"}
    assert "from samg.serve.triton_model import TritonPythonModel" in (out / "samg" / "1" / "model.py").read_text()

    dynamic = _parse_config(out / "samg_dynamic" / "config.pbtxt")
    assert dynamic.max_batch_size == 4 and dynamic.HasField("dynamic_batching")
    assert dynamic.parameters["mode"].string_value == "dynamic"


def test_repository_copy_export_and_kserve(digits_export, tmp_path):
    yaml = pytest.importorskip("yaml")
    from samg.contract import read_export
    from samg.serve.repository import write_repository

    out = write_repository(tmp_path / "repo", digits_export, copy_export=True, kserve=True)
    config = _parse_config(out / "samg" / "config.pbtxt")
    assert config.parameters["export_dir"].string_value == "export"  # relative to samg/1/
    copied = out / "samg" / "1" / "export"
    assert read_export(copied) == read_export(digits_export)  # hashes checked: the files are the export's
    service, = [d for d in yaml.safe_load_all((out / "kserve.yaml").read_text()) if d["kind"] == "InferenceService"]
    predictor = service["spec"]["predictor"]
    assert predictor["model"]["storageUri"].startswith("s3://YOUR-BUCKET")  # the documented placeholder
    assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] == 8
    # rewriting a repository samg wrote (with the copied export's verified-stamp in it) is allowed
    write_repository(out, digits_export, copy_export=True)
    assert not (out / "kserve.yaml").exists()


def test_repository_refuses_a_folder_samg_did_not_write(digits_export, tmp_path):
    from samg.serve.repository import write_repository

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(SamgError, match="not empty and was not written by samg serve"):
        write_repository(theirs, digits_export)
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]
    # a file someone put into a samg repository stops the rewrite; the repository stays as it was
    ours = write_repository(tmp_path / "ours", digits_export)
    (ours / "samg" / "extra.txt").write_text("mine")
    before = (ours / "samg" / "config.pbtxt").read_text()
    with pytest.raises(SamgError, match="not written by samg"):
        write_repository(ours, digits_export, backend="torch")
    assert (ours / "samg" / "extra.txt").read_text() == "mine"
    assert (ours / "samg" / "config.pbtxt").read_text() == before
    for leftover in tmp_path.glob("ours.new-*"):  # the refused new repository, kept aside visibly
        assert (leftover / "samg" / "config.pbtxt").is_file()


def _samg(*args, **kw):
    return subprocess.run([sys.executable, "-m", "samg", "serve", *map(str, args)], capture_output=True, text=True,
                          timeout=120, **kw)


def test_cli_mistakes_are_one_line(digits_export, tmp_path):
    cases = [
        ((digits_export, "--out", tmp_path / "r"), "--out goes with --repository-only"),
        ((digits_export, "--repository-only"), "--repository-only needs --out"),
        ((digits_export, "--max-batch-size", "0"), "--max-batch-size must be in 1..64"),
        ((digits_export, "--max-queue", "-1"), "--max-queue must be 0 or more"),
        ((digits_export, "--ready-timeout", "nan"), "--ready-timeout must be a positive number of seconds, got nan"),
        ((digits_export, "--ready-timeout", "-5"), "--ready-timeout must be a positive number of seconds, got -5"),
        ((tmp_path / "nothing-here",), "nothing-here"),
    ]
    for args, words in cases:
        done = _samg(*args)
        assert done.returncode == 2 and words in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    env = {**os.environ, "SAMG_TRITONSERVER": str(tmp_path / "no-such-binary")}
    done = _samg(digits_export, env=env)
    assert done.returncode == 2 and "SAMG_TRITONSERVER" in done.stderr and "--install-triton" in done.stderr


def test_install_edge_cases_are_one_line(tmp_path, monkeypatch):
    """No download happens here: each case is refused, or cleaned, before one."""
    import collections

    from samg.serve import install

    home = tmp_path / "home"
    monkeypatch.setenv(install.ENV_HOME, str(home))
    home.write_text("not a folder")
    with pytest.raises(install.TritonNotFound, match=r"home is a file, not samg's tritonserver folder: remove it"):
        install.install_tritonserver(quiet=True)
    home.unlink()
    version = collections.namedtuple("version_info", "major minor micro releaselevel serial")
    monkeypatch.setattr(install.sys, "version_info", version(3, 13, 0, "final", 0))
    with pytest.raises(install.TritonNotFound, match=r"numpy==1\.26\.4, which has no wheel for Python 3\.13: run "
                                                     r"samg serve from Python 3\.10-3\.12"):
        install.install_tritonserver(quiet=True)
    monkeypatch.undo()
    # a killed install's temporary folder goes; a running one's stays
    gone = subprocess.Popen(["true"])  # noqa: S607
    gone.wait()  # reaped: its pid runs no more
    running = subprocess.Popen(["sleep", "60"])  # noqa: S607
    try:
        dead, alive = tmp_path / f".home.tmp-{gone.pid}-abc", tmp_path / f".home.tmp-{running.pid}-def"
        for folder in (dead, alive):
            (folder / "tree").mkdir(parents=True)
        install._remove_abandoned_tmp(home)
        assert alive.is_dir() and not dead.exists()
    finally:
        running.kill()
        running.wait()


# -- real servers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def triton():
    from samg.serve.install import TritonNotFound, find_tritonserver

    missing = pytest.fail if os.environ.get(REQUIRE_TRITON_ENV) == "1" else pytest.skip
    try:
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401
    except ImportError as exc:
        missing(f"no tritonclient ({exc}): pip install 'samg[serve]'")
    try:
        return find_tritonserver()
    except TritonNotFound as exc:
        missing(f"no tritonserver: {exc}")


def _endpoints():
    from samg.serve.server import local_endpoints

    return local_endpoints()


def _start(install, repository, log):
    from samg.serve.server import TritonServer

    server = TritonServer(install, repository, _endpoints(), log).start()
    try:
        server.wait_ready(MODEL_LOAD_TIMEOUT_S)
    except BaseException:
        server.kill()
        raise
    return server


class Reference:
    """The independent path: Pipeline.__call__ alone, decoded here to exact floats."""

    def __init__(self, export_dir):
        from samg.runtime.pipeline import Pipeline

        self.pipeline = Pipeline.load(export_dir)

    def exact(self, r: dict) -> np.ndarray:
        scales = dict(scale=r.get("guidance_scale"))
        if r.get("guidance_min") is not None:  # the protocol's (min, scale) is the CLI's (--w-min, --w-max)
            scales = dict(w_min=r["guidance_min"], w_max=r["guidance_scale"])
        latents = self.pipeline(r["prompt"], r.get("negative_prompt", ""), guidance=r.get("guidance", "samg"), **scales,
                                steps=r["num_inference_steps"], seed=r["seed"], height=r.get("height"),
                                width=r.get("width"), output="latents")
        vae = self.pipeline.export.vae
        z = latents / np.float32(vae.scaling_factor) + np.float32(vae.shift_factor or 0.0)
        images = np.asarray(self.pipeline.runners["vae"].run({"latents": z})["images"], np.float32)
        return ((images / 2 + 0.5).clip(0, 1) * 255)[0].transpose(1, 2, 0)  # [H, W, 3], exact


def assert_same_image(got: np.ndarray, exact: np.ndarray, what: str) -> None:
    assert got.dtype == np.uint8 and got.shape == exact.shape, (what, got.shape, exact.shape)
    diff = np.abs(got.astype(np.int16) - np.round(exact).astype(np.int16))
    near_tie = np.abs(exact - np.floor(exact) - 0.5) < TIE_EPS
    assert diff.max() <= 1 and np.all((diff == 0) | near_tie), f"{what}: max diff {diff.max()}"


def _client(kind: str, endpoints):
    if kind == "http":
        import tritonclient.http as http

        return http.InferenceServerClient(endpoints.http, network_timeout=REQUEST_TIMEOUT_S)
    import tritonclient.grpc as grpc

    return grpc.InferenceServerClient(endpoints.grpc)


def _ask(kind, endpoints, model, request):
    """(image, seed) or the exception the client raised; the client's connection is closed after."""
    from samg.serve.client import generate

    client = _client(kind, endpoints)
    try:
        options = {"client_timeout": REQUEST_TIMEOUT_S} if kind == "grpc" else {}
        return generate(client, model=model, infer_options=options, **request)
    except Exception as exc:  # noqa: BLE001 -- the caller checks what kind
        return exc
    finally:
        client.close()


def _load_plan():
    """32 good requests over two models (mixed prompts, rules, scales, steps 4..20, seeds, sizes) and
    bad ones in between, in the order the clients send them."""
    rng = np.random.default_rng(0)
    good = []
    for i in range(32):
        model = "digits" if i % 4 else "sdxl"
        rule = ("samg", "cfg")[i % 2]
        scale = float(rng.choice([1.5, 3.0, 5.0, 7.5]))
        r = dict(prompt=f"a handwritten {i % 10}" if model == "digits" else f"a photo of thing {i}",
                 guidance=rule, guidance_scale=scale, num_inference_steps=int(rng.integers(4, 21)),
                 seed=int(rng.integers(0, 2**62)))
        if rule == "samg" and i % 3 == 0:
            r["guidance_min"] = scale / 2
        if model == "digits" and i % 5 == 0:
            r.update(height=12, width=12)  # another shape: never batched with 16x16 steps
        good.append((model, r))
    bad = [
        ("digits", dict(prompt="x", guidance_min=6.0, guidance_scale=3.0), "guidance_min=6.0 is above guidance_scale=3.0"),
        ("digits", dict(prompt="x", guidance="no-such-rule"), "unknown guidance 'no-such-rule'"),
        ("digits", dict(prompt="x", num_inference_steps=100000), "num_inference_steps= must be an integer in 1..1000"),
        ("sdxl", dict(prompt="x", width=40), "width= must be a multiple of 16"),
        ("digits", dict(prompt="x", guidance_scale=float("nan")), "input guidance_scale is nan"),
        ("digits", dict(prompt="x", guidance="cfg", guidance_min=2.0, guidance_scale=4.0), "guidance_min= applies to"),
        ("digits", dict(prompt="x", seed=-5), "seed= must be an integer in 0.."),
    ]
    plan = []
    for i, (model, r) in enumerate(good):
        plan.append(("good", model, r, None))
        if i % 5 == 2 and bad:
            plan.append(("bad", *bad.pop()))
    return plan


# A third model for backpressure and cancellation: 2 workers (max_batch_size 1), no queue.
BUSY_MODEL = "digits_busy"


@pytest.fixture(scope="module")
def two_model_server(triton, digits_export, tiny_export, tmp_path_factory):
    from samg.serve.repository import ModelEntry, write_repository

    sdxl = tiny_export("sdxl", "fused")
    root = tmp_path_factory.mktemp("serve")
    models = {"digits": (ModelEntry("digits"), ModelEntry(BUSY_MODEL, max_batch_size=1, max_queue=0)),
              "sdxl": (ModelEntry("sdxl"),)}  # models named after their exports
    repos = [write_repository(root / name, export, models=models[name])
             for name, export in (("digits", digits_export), ("sdxl", sdxl))]
    server = _start(triton, repos, root / "tritonserver.log")  # one server, both repositories
    yield server, {"digits": Reference(digits_export), "sdxl": Reference(sdxl)}, sdxl
    server.stop()
    assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))  # nothing of it left behind


@pytest.mark.slow
def read_metrics(endpoints) -> str:
    with urllib.request.urlopen(endpoints.metrics_url, timeout=REQUEST_TIMEOUT_S) as response:
        return response.read().decode()


def metric_samples(metrics: str, name: str, model: str = "digits") -> dict[str, float]:
    """{labels: value} of one metric of one model."""
    return {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
            if line.startswith(name + "{") and f'model="{model}"' in line}


def wait_for_metric(endpoints, name: str, model: str, want: float, timeout: float = 60) -> None:
    """Until the metric's sum over labels reaches `want` (samg's metrics follow pipe.stats() every second)."""
    deadline = time.monotonic() + timeout
    while sum(metric_samples(read_metrics(endpoints), name, model).values()) < want:
        assert time.monotonic() < deadline, f"{name} of {model} did not reach {want}"
        time.sleep(0.25)


def test_load_from_8_clients_every_answer_is_its_own(two_model_server):
    server, references, _ = two_model_server
    ep = server.endpoints

    for probe in ("live", "ready"):
        with urllib.request.urlopen(f"http://{ep.http}/v2/health/{probe}") as response:
            assert response.status == 200
    plan = _load_plan()
    kinds = ["http", "grpc"]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda ix: _ask(kinds[ix[0] % 2], ep, ix[1][1], ix[1][2]), enumerate(plan)))
    good = 0
    for (kind, model, request, words), answer in zip(plan, answers):
        if kind == "bad":
            assert isinstance(answer, Exception) and words in str(answer), (request, answer)
            continue
        assert not isinstance(answer, Exception), (request, answer)
        image, seed = answer
        assert seed == request["seed"]
        assert_same_image(image, references[model].exact(request), f"{model} {request}")
        good += 1
    assert good == 32

    samples = metric_samples
    want_done = sum(1 for kind, model, *_ in plan if kind == "good" and model == "digits")
    want_rejected = sum(1 for kind, model, *_ in plan if kind == "bad" and model == "digits")
    deadline = time.monotonic() + 10  # samg's metrics follow pipe.stats() every second
    while True:
        metrics = read_metrics(ep)
        done = sum(samples(metrics, "samg_requests_done_total").values())
        if done >= want_done or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert done == want_done
    assert sum(samples(metrics, "samg_requests_rejected_total").values()) == want_rejected
    calls = {int(labels.split('batch_size="')[1].split('"')[0]): n
             for labels, n in samples(metrics, "samg_denoiser_calls_total").items()}
    assert calls and max(calls) > 1, calls  # concurrent requests shared denoiser calls
    assert 'nv_inference_request_success{model="sdxl"' in metrics  # Triton's own metrics are there too


def test_wrong_types_and_shapes_are_refused_naming_the_input(two_model_server):
    import tritonclient.http as http

    server, references, _ = two_model_server
    client = http.InferenceServerClient(server.endpoints.http)

    def tensor(name, data, datatype):
        t = http.InferInput(name, list(data.shape), datatype)
        t.set_data_from_numpy(data)
        return t

    prompt = tensor("prompt", np.array([b"a handwritten 1"], dtype=object), "BYTES")
    cases = [
        ([tensor("prompt", np.array([b"a", b"b"], dtype=object), "BYTES")], "prompt"),
        ([prompt, tensor("guidance_scale", np.array([5.0]), "FP64")], "guidance_scale"),
        ([prompt, tensor("seed", np.array([[1]], np.int64), "INT64")], "seed"),
        ([prompt, tensor("steps", np.array([4], np.int32), "INT32")], "steps"),
    ]
    try:
        for inputs, name in cases:
            with pytest.raises(Exception) as err:
                client.infer("digits", inputs)
            assert name in str(err.value), str(err.value)
        image, seed = _ask("http", server.endpoints, "digits", dict(prompt="a handwritten 1", seed=4, num_inference_steps=5))
        assert_same_image(image, references["digits"].exact(dict(prompt="a handwritten 1", seed=4, num_inference_steps=5)),
                          "after the refusals")
    finally:
        client.close()


def test_matches_samg_generate_with_the_same_flags(two_model_server, digits_export, tmp_path):
    from PIL import Image

    server, references, _ = two_model_server
    request = dict(prompt="a handwritten 5", guidance="samg", guidance_scale=6.0, guidance_min=2.5,
                   num_inference_steps=7, seed=123456789)
    image, _ = _ask("http", server.endpoints, "digits", request)
    out = tmp_path / "five.png"
    done = subprocess.run([sys.executable, "-m", "samg", "generate", str(digits_export), "--prompt", request["prompt"],
                           "--guidance", "samg", "--w-max", "6", "--w-min", "2.5", "--steps", "7", "--seed", "123456789",
                           "--quiet", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    generated = np.asarray(Image.open(out).convert("RGB"))
    exact = references["digits"].exact(request)  # both against the exact floats, ties aware (numpy 1.26 in the server)
    assert_same_image(generated, exact, "samg generate")
    assert_same_image(image, exact, "samg serve")


def test_busy_past_max_queue_then_cancelled_requests_stop(two_model_server):
    """BUSY_MODEL has 2 workers and no queue: with two long requests running, a third is answered
    'server busy' (UNAVAILABLE) at once; the long ones, cancelled by their gRPC client, stop."""
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    from samg.serve.client import infer_inputs

    server, _, _ = two_model_server
    ep = server.endpoints
    client = grpc.InferenceServerClient(ep.grpc)
    errors = queue.Queue()
    try:
        calls = [client.async_infer(BUSY_MODEL, infer_inputs(grpc, prompt=f"a handwritten {i}", num_inference_steps=1000,
                                                             seed=i), callback=lambda result, error: errors.put(error))
                 for i in range(2)]
        wait_for_metric(ep, "samg_requests_in_flight", BUSY_MODEL, 2)
        with pytest.raises(InferenceServerException) as err:
            client.infer(BUSY_MODEL, infer_inputs(grpc, prompt="a handwritten 3", num_inference_steps=4),
                         client_timeout=REQUEST_TIMEOUT_S)
        assert "server busy: 0 requests already wait for a worker, 1 more would pass max_queue=0" in str(err.value)
        assert "UNAVAILABLE" in str(err.value.status())
        http_answer = _ask("http", ep, BUSY_MODEL, dict(prompt="a handwritten 3", num_inference_steps=4))
        assert "server busy" in str(http_answer) and http_answer.status() == "503", (http_answer, http_answer.status())
        for call in calls:
            call.cancel()
        for _ in calls:
            assert "CANCELLED" in str(errors.get(timeout=REQUEST_TIMEOUT_S).status())  # the client's side
        wait_for_metric(ep, "samg_requests_cancelled_total", BUSY_MODEL, 2, timeout=30)  # the server stopped them
    finally:
        client.close()
    metrics = read_metrics(ep)
    assert sum(metric_samples(metrics, "samg_requests_busy_total", BUSY_MODEL).values()) == 2
    assert sum(metric_samples(metrics, "samg_requests_done_total", BUSY_MODEL).values()) == 0


@pytest.mark.slow
def test_kill_mid_load_then_restart(triton, digits_export, tmp_path):
    """`samg serve --repository-only` output served by tritonserver; killed (SIGKILL, as a crash)
    while 16 requests are in flight: every client gets an error or its own image, never another's;
    a new server on the same ports serves new requests."""
    done = _samg(digits_export, "--repository-only", "--copy-export", "--out", tmp_path / "repo", "--quiet")
    assert done.returncode == 0, done.stderr
    reference = Reference(digits_export)
    server = _start(triton, tmp_path / "repo", tmp_path / "first.log")
    endpoints = server.endpoints
    requests = [dict(prompt=f"a handwritten {i % 10}", guidance=("samg", "cfg")[i % 2], guidance_scale=4.0 + i % 3,
                     num_inference_steps=20, seed=1000 + i) for i in range(16)]
    answered = threading.Event()

    def ask(ir):
        i, r = ir
        answer = _ask(("http", "grpc")[i % 2], endpoints, "samg", r)
        if not isinstance(answer, Exception):
            answered.set()
        return answer

    try:
        with ThreadPoolExecutor(8) as pool:
            futures = pool.map(ask, enumerate(requests))
            answered.wait(REQUEST_TIMEOUT_S)  # some answered, the rest in flight or queued
            server.kill()
            answers = list(futures)
    finally:
        server.kill()  # the test's own TritonServer: kill() takes its whole process group
    errors = [a for a in answers if isinstance(a, Exception)]
    assert errors and len(errors) < len(answers), "expected some answers before the kill and errors after it"
    for r, answer in zip(requests, answers):
        if not isinstance(answer, Exception):
            assert_same_image(answer[0], reference.exact(r), str(r))
    assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))

    from samg.serve.server import TritonServer

    restarted = TritonServer(triton, tmp_path / "repo", endpoints, tmp_path / "second.log").start()
    try:
        restarted.wait_ready(MODEL_LOAD_TIMEOUT_S)
        for i, r in enumerate(requests[:3]):
            image, seed = _ask(("http", "grpc")[i % 2], endpoints, "samg", r)
            assert seed == r["seed"]
            assert_same_image(image, reference.exact(r), str(r))
    finally:
        restarted.stop()
    # what serving added (the copied export's verified-stamp, model.py's bytecode) is samg's to replace
    done = _samg(digits_export, "--repository-only", "--copy-export", "--out", tmp_path / "repo", "--quiet")
    assert done.returncode == 0, done.stderr


def _start_samg_serve(export_dir, endpoints, tmp_path):
    """`samg serve` on `endpoints`, its work folder under tmp_path; (process, queue of its stderr
    lines, None at the end), read on a thread so no wait on it is unbounded."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # samg's work folder lands here, to be checked
    proc = subprocess.Popen([sys.executable, "-m", "samg", "serve", str(export_dir), "--http-port",
                             str(endpoints.http_port), "--grpc-port", str(endpoints.grpc_port), "--metrics-port",
                             str(endpoints.metrics_port), "--ready-timeout", str(MODEL_LOAD_TIMEOUT_S)],
                            stderr=subprocess.PIPE, text=True, env=env)
    lines = queue.Queue()

    def read():
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def _wait_ready_line(lines, endpoints) -> list[str]:
    seen, deadline = [], time.monotonic() + MODEL_LOAD_TIMEOUT_S + 30
    while not any("ready:" in line for line in seen):
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, seen
        seen.append(line)
    assert any("ready:" in line and f"127.0.0.1:{endpoints.http_port}" in line for line in seen), seen
    return seen


def _stop(proc) -> None:
    """Ctrl-C, then SIGKILL only if it did not stop (samg takes its tritonserver along either way)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _rest(lines) -> str:
    out = []
    while (line := lines.get(timeout=EXIT_WAIT_S)) is not None:
        out.append(line)
    return "".join(out)


@pytest.mark.slow
def test_samg_serve_answers_and_stops_on_ctrl_c(triton, digits_export, tmp_path):
    """The acceptance command: `samg serve DIR` answers a tritonclient request with `image`; Ctrl-C
    (SIGINT) stops tritonserver and removes samg's work folder."""
    ep = _endpoints()
    proc, lines = _start_samg_serve(digits_export, ep, tmp_path)
    try:
        _wait_ready_line(lines, ep)
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("samg-serve-")]
        image, seed = _ask("http", ep, "samg", dict(prompt="a handwritten 2", seed=9, num_inference_steps=4))
        assert image.shape == (16, 16, 3) and seed == 9
        for _ in range(8):  # no seed sent: the one drawn comes back (an INT64; half of them once did not fit)
            image, seed = _ask("grpc", ep, "samg", dict(prompt="a handwritten 2", num_inference_steps=1))
            assert image.shape == (16, 16, 3) and 0 <= seed < 2**63
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    finally:
        _stop(proc)
    assert proc.returncode == 0
    assert "stopped" in _rest(lines)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("samg-serve-")]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by whoever inherited it, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_samg_serve_killed_outright_leaves_no_server_behind(triton, digits_export, tmp_path):
    """SIGKILL to `samg serve` (as the OOM killer or a CI timeout would) while a request samples:
    tritonserver dies with it, its model process (the Python backend stub) exits once the server is
    gone (no samg thread stays blocked on it), the ports are free."""
    import tritonclient.grpc as grpc

    from samg.serve.client import infer_inputs

    ep = _endpoints()
    proc, lines = _start_samg_serve(digits_export, ep, tmp_path)
    client = None
    try:
        _wait_ready_line(lines, ep)
        _ask("grpc", ep, "samg", dict(prompt="a handwritten 2", seed=9, num_inference_steps=4))
        client = grpc.InferenceServerClient(ep.grpc)
        client.async_infer("samg", infer_inputs(grpc, prompt="a handwritten 3", num_inference_steps=1000),
                           callback=lambda result, error: None)
        wait_for_metric(ep, "samg_requests_in_flight", "samg", 1)  # sampling, and the metrics thread has run
        servers = [pid for pid in _children(proc.pid) if "tritonserver" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(servers) == 1, servers
        stubs = _children(servers[0])
        assert stubs, "no Python backend stub found"
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + EXIT_WAIT_S
        while any(_alive(pid) for pid in servers + stubs) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in servers + stubs if _alive(pid)]
        assert all(_port_free(port) for port in (ep.http_port, ep.grpc_port, ep.metrics_port))
    finally:
        _stop(proc)
        if client is not None:
            client.close()
        # what a SIGKILL leaves (documented): samg's work folder and the server's shared memory
        for leftover in tmp_path.glob("samg-serve-*"):
            shutil.rmtree(leftover)
        for region in Path("/dev/shm").glob(f"samg_serve_{proc.pid}_*"):
            region.unlink()


@pytest.mark.slow
def test_the_printed_manual_command_serves_the_repository(triton, digits_export, tmp_path):
    """The line `samg serve --repository-only` prints runs as printed (plus loopback ports), with no
    import path from this process: it carries SAMG_SERVE_PATH itself."""
    from samg.serve.server import PATH_ENV

    done = _samg(digits_export, "--repository-only", "--out", tmp_path / "repo")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    line = lines[lines.index(next(l for l in lines if l.endswith("serve it with"))) + 1].strip()
    if triton.source != "PATH":
        assert f"{PATH_ENV}=" in line
    ep = _endpoints()
    ports = " ".join(f"--{kind}-address=127.0.0.1 --{kind}-port={port}" for kind, port in
                     (("http", ep.http_port), ("grpc", ep.grpc_port), ("metrics", ep.metrics_port)))
    env = {k: v for k, v in os.environ.items() if k not in (PATH_ENV, "PYTHONPATH")}
    with open(tmp_path / "manual.log", "w") as log:
        proc = subprocess.Popen(["bash", "-c", f"{line} {ports}"], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + MODEL_LOAD_TIMEOUT_S
        while not _ready(ep):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "manual.log").read_text()[-3000:]
            time.sleep(0.2)
        request = dict(prompt="a handwritten 6", seed=11, num_inference_steps=4)
        image, seed = _ask("http", ep, "samg", request)
        assert seed == 11
        assert_same_image(image, Reference(digits_export).exact(request), "manual command")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def _ready(endpoints) -> bool:
    try:
        with urllib.request.urlopen(f"http://{endpoints.http}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
