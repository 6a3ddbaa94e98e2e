"""A few lines of `tritonclient` for the `samg` model: build the inputs, get the image and seed.

    import tritonclient.http as http
    from samg.serve.client import generate
    client = http.InferenceServerClient("127.0.0.1:8000")
    image, seed = generate(client, prompt="a digit 3", seed=7, num_inference_steps=20)

Works with `tritonclient.http` and `tritonclient.grpc` clients alike (the protocol is the same).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from samg.serve.protocol import INPUTS, SEED_OUTPUT, image_output_name

_NUMPY = {"BYTES": np.object_, "FP32": np.float32, "INT32": np.int32, "INT64": np.int64}
_SPECS = {spec.name: spec for spec in INPUTS}


def _module_of(client: Any) -> Any:
    """tritonclient.http or tritonclient.grpc, whichever `client` belongs to."""
    from samg.errors import require

    name = type(client).__module__.split(".")
    return require(".".join(name[:2]), "to call a Triton server")


def infer_inputs(module: Any, batched: bool = False, **request: Any) -> list:
    """InferInput objects of `module` (tritonclient.http or .grpc) for one request: the protocol's
    inputs by name (samg.serve.protocol.INPUTS); shape [1], or [1, 1] for a model with Triton's
    own batching. A value's type is the protocol's, whatever Python type is passed."""
    inputs = []
    for name, value in request.items():
        spec = _SPECS.get(name)
        if spec is None:
            raise KeyError(f"unknown input {name!r}: the inputs are {', '.join(_SPECS)}")
        data = np.array([value.encode("utf-8") if isinstance(value, str) else value], dtype=_NUMPY[spec.datatype])
        if batched:
            data = data.reshape(1, 1)
        tensor = module.InferInput(name, list(data.shape), spec.datatype)
        tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    return inputs


def generate(client: Any, *, model: str = "samg", video: bool = False, batched: bool = False,
             infer_options: dict[str, Any] | None = None, **request: Any) -> tuple[np.ndarray, int]:
    """One request; returns (image uint8 [H, W, 3] (video: [F, H, W, 3]), the seed used).
    `infer_options` go to client.infer (e.g. client_timeout=60 for gRPC; an HTTP client takes its
    network_timeout when made). Errors are tritonclient's InferenceServerException, with the
    server's message."""
    module = _module_of(client)
    output = image_output_name(video)
    outputs = [module.InferRequestedOutput(output), module.InferRequestedOutput(SEED_OUTPUT)]
    result = client.infer(model, infer_inputs(module, batched, **request), outputs=outputs, **(infer_options or {}))
    pixels = result.as_numpy(output)
    seed = result.as_numpy(SEED_OUTPUT).reshape(-1)
    return (pixels[0] if batched else pixels), int(seed[0])
