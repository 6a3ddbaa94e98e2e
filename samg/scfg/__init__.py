"""S-CFG (semantic-aware CFG, Shen et al. CVPR 2024): torch reference, attention capture, ONNX op, export.

`samg.scfg.reference` holds the pure combine (`scfg_combine`); `samg.scfg.capture` the attention
processors; `samg.scfg.op` the `samg::SemanticCombine` ONNX op; `samg.scfg.export` the guided
denoiser wrapper for `samg export --guidance scfg`. Importing this package is cheap (no torch).
"""
