"""samg.build: TensorRT / TensorRT-RTX engines from an export folder (`samg build`).

loader (importing TensorRT, the RTX wheel's library link, polygraphy), record (the engine's build
record and its verification, shared with samg.runners.tensorrt), profiles (optimization profiles
from the manifest), plugin (samg::GuidanceCombine as a Python IPluginV3), engine (parsing,
building, the engine cache), cli (`samg build`). The runner over built engines is
samg.runners.tensorrt; it imports the loader, record and plugin, never the builder.
"""
