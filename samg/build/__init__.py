"""samg.build: TensorRT / TensorRT-RTX engines from an export folder (`samg build`).

loader (importing TensorRT, the RTX wheel's library link, polygraphy, the GPU's compute
capability), profiles (optimization profiles from the typed manifest), plugin (samg::GuidanceCombine
as a Python IPluginV3), engine (parsing, building, the engine cache), cli (`samg build`). The
engine's build record and its verification are the export folder's contract (samg.contract's
EngineRecord). The runner over built engines is samg.runners.tensorrt; it imports the loader and
plugin, never the builder.
"""
