"""`samg serve` on NVIDIA Triton Inference Server (samg.serve): the repository writer, request
parsing, and real tritonserver processes on loopback answering tritonclient requests.

The server tests need `tritonserver` (`samg serve --install-triton`, which `make test` runs once)
and skip, saying so, when it cannot be found. Each server is started on free loopback ports and
stopped (or killed) by its test; the requests are few and short (4 to 20 steps on samg-digits and a
tiny SDXL export).

Expected images come from the independent single-request path, Pipeline.__call__ in this process:
final latents, decoded here through the VAE graph to exact floats. The server's images must equal
them after rounding, or be one level off where the exact value sits within TIE_EPS of x.5: the
server's Python backend runs numpy 1.26 (samg.serve.install), whose float math may differ from
this process's in the last bits (measured: latents within 4e-6, images within one level).
"""

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from samg.errors import SamgError

TIE_EPS = 0.01  # a level flip is allowed only this close to a rounding boundary
MODEL_LOAD_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 120


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
                      "backend": "onnxruntime", "device": "cpu"}
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
        ((tmp_path / "nothing-here",), "nothing-here"),
    ]
    for args, words in cases:
        done = _samg(*args)
        assert done.returncode == 2 and words in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    env = {**os.environ, "SAMG_TRITONSERVER": str(tmp_path / "no-such-binary")}
    done = _samg(digits_export, env=env)
    assert done.returncode == 2 and "SAMG_TRITONSERVER" in done.stderr and "--install-triton" in done.stderr


# -- real servers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def triton():
    from samg.serve.install import TritonNotFound, find_tritonserver

    pytest.importorskip("tritonclient.http")
    pytest.importorskip("tritonclient.grpc")
    try:
        return find_tritonserver()
    except TritonNotFound as exc:
        pytest.skip(f"no tritonserver: {exc}")


def _endpoints():
    from samg.serve.server import Endpoints, free_port

    return Endpoints("127.0.0.1", free_port(), free_port(), free_port())


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


@pytest.fixture(scope="module")
def two_model_server(triton, digits_export, tiny_export, tmp_path_factory):
    from samg.serve.repository import ModelEntry, write_repository

    sdxl = tiny_export("sdxl", "fused")
    root = tmp_path_factory.mktemp("serve")
    repos = [write_repository(root / name, export, models=(ModelEntry(name),))  # models named after their exports
             for name, export in (("digits", digits_export), ("sdxl", sdxl))]
    server = _start(triton, repos, root / "tritonserver.log")  # one server, both repositories
    yield server, {"digits": Reference(digits_export), "sdxl": Reference(sdxl)}, sdxl
    server.stop()
    assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))  # nothing of it left behind


@pytest.mark.slow
def test_load_from_8_clients_every_answer_is_its_own(two_model_server):
    server, references, _ = two_model_server
    ep = server.endpoints
    import urllib.request

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

    def samples(metrics: str, name: str) -> dict[str, float]:
        """{labels: value} of one metric of the digits model."""
        return {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith(name + "{") and 'model="digits"' in line}

    want_done = sum(1 for kind, model, *_ in plan if kind == "good" and model == "digits")
    want_rejected = sum(1 for kind, model, *_ in plan if kind == "bad" and model == "digits")
    deadline = time.monotonic() + 10  # samg's metrics follow pipe.stats() every second
    while True:
        metrics = urllib.request.urlopen(ep.metrics_url).read().decode()
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

    server, _, _ = two_model_server
    request = dict(prompt="a handwritten 5", guidance="samg", guidance_scale=6.0, guidance_min=2.5,
                   num_inference_steps=7, seed=123456789)
    image, _ = _ask("http", server.endpoints, "digits", request)
    out = tmp_path / "five.png"
    done = subprocess.run([sys.executable, "-m", "samg", "generate", str(digits_export), "--prompt", request["prompt"],
                           "--guidance", "samg", "--w-max", "6", "--w-min", "2.5", "--steps", "7", "--seed", "123456789",
                           "--quiet", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    generated = np.asarray(Image.open(out).convert("RGB"))
    diff = np.abs(generated.astype(np.int16) - image)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.02  # float last bits only (numpy 1.26 in the server)


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
        server.kill()
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


@pytest.mark.slow
def test_samg_serve_answers_and_stops_on_ctrl_c(triton, digits_export, tmp_path):
    """The acceptance command: `samg serve DIR` answers a tritonclient request with `image`; Ctrl-C
    (SIGINT) stops tritonserver and removes samg's work folder."""
    ep = _endpoints()
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # samg's work folder lands here, to be checked
    proc = subprocess.Popen([sys.executable, "-m", "samg", "serve", str(digits_export), "--http-port", str(ep.http_port),
                             "--grpc-port", str(ep.grpc_port), "--metrics-port", str(ep.metrics_port)],
                            stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    try:
        deadline = time.monotonic() + MODEL_LOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "ready:" in line:
                break
        assert any("ready:" in l and f"127.0.0.1:{ep.http_port}" in l for l in lines), lines
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("samg-serve-")]
        image, seed = _ask("http", ep, "samg", dict(prompt="a handwritten 2", seed=9, num_inference_steps=4))
        assert image.shape == (16, 16, 3) and seed == 9
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, lines + [rest]
    assert "stopped" in rest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("samg-serve-")]
