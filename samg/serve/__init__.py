"""`samg serve`: an export on NVIDIA Triton Inference Server (KServe v2 / Open Inference Protocol).

- protocol.py      the `samg` model's input and output tensors, and the request parser
- repository.py    the Triton model repository (config.pbtxt, 1/model.py) and a KServe InferenceService
- triton_model.py  the Python-backend model: samg.load once, requests through the continuous-batching engine
- install.py       where tritonserver is; `samg serve --install-triton` puts NVIDIA's there
- server.py        run tritonserver: command, environment, readiness, clean stop
- cli.py           `samg serve`

docs/serving.md is the user's guide. Standard library and numpy at import time.
"""
