"""The one tie-safe comparison of an S-CFG output with the torch reference (`tie_safe_check`).

S-CFG's masks are arg-maxes over normalized attention maps that can be equal to float rounding
(samg-digits: top-2 gaps down to 0), so two correct implementations may decide a near-tie differently,
and one moved location changes the region rates everywhere. Comparing outputs directly is then flaky,
and accepting anything "S-CFG-like" where the reference is tied is vacuous. Instead the graph under test
reports its own mask decisions (`mask_probe`: the SemanticCombine node's `token_mask` and `fore_mask`
as extra graph outputs) and the check is, with the reference's maps, u and c:

  (a) the graph's masks are a valid arg-max of the reference's maps: every token the graph puts at a
      location has a normalized map within `DECIDED_MARGIN` (relative) of the reference's largest there,
      at least one token is chosen, and the foreground choice (non-start-of-text map vs start-of-text
      map) is within the margin of the larger one. Where the reference is decided (one choice within
      the margin) this forces exactly the reference's choice;
  (b) the reference combine given the graph's masks (`samg.scfg.reference.combine_with_masks`: rates,
      clamps, blur, u + w·rate·Δ) equals the graph's output to a float tolerance at every location.

Token columns with identical maps (several `<pad>` tokens, say) are one choice: a location where only
they are within the margin is decided. `decided_fraction` reports where (a) leaves no freedom.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

from samg.errors import check, require

# Relative top-2 gap of the normalized maps above which float rounding cannot change a mask. The maps
# are sums of positive terms (softmax, S·S, S·A over <= ~100 entries each, token sums, means), so two
# float32 implementations of the same maps differ by ~n·2^-24 ~ 1e-5 relative at worst, whatever the
# summation order or instruction set (measured on samg-digits, ORT vs torch: 2.4e-7). A gap above 1e-4
# cannot close; one below may be decided either way.
DECIDED_MARGIN = 1e-4
# The graph's mask decisions, as outputs of the probe graph (`mask_probe`)
PROBE_TOKEN_MASK = "probe_token_mask"  # [B, T, h, w] 0/1, the SemanticCombine body's `token_mask`
PROBE_FORE_MASK = "probe_fore_mask"  # [B, 1, h, w] 0/1, its `fore_mask`
_BODY_MASKS = ("token_mask", "fore_mask")  # the tensors of that name inside the function body
PROBE_SUFFIX = "MaskProbe"  # the probe's copy of the function body is SemanticCombine + this


class TieSafeCheck(NamedTuple):
    error: float  # max |got - reference given the graph's masks| / max(1, max|reference|) per sample; inf if (a) fails
    invalid_locations: int  # mask locations where the graph's choice is not within the margin of the reference's max
    decided_fraction: float  # share of mask locations where the reference's tokens and foreground are both decided


def _token_groups(cond):
    """`[B, T]` int: per sample, one id per set of token columns whose maps are identical over (h, w)."""
    import numpy as np

    groups = np.empty(cond.shape[:2], np.int64)
    for b in range(cond.shape[0]):
        _, groups[b] = np.unique(cond[b].reshape(cond.shape[1], -1), axis=0, return_inverse=True)
    return groups


def mask_decisions(token_maps, fore_maps, token_mask, fore_mask, *, corrected: bool = False,
                   margin: float | None = None):
    """`(invalid [B, h, w], decided [B, h, w])` bool: (a) of the module doc at every mask location.

    `token_maps [2B, T, h, w]`, `fore_maps [2B, 2, h, w]`: the reference's `semantic_maps` (unconditional
    half first); `token_mask [B, T, h, w]`, `fore_mask [B, 1, h, w]`: the decisions under test (0/1).
    """
    import numpy as np

    margin = DECIDED_MARGIN if margin is None else margin
    token_maps, fore_maps = (np.asarray(m, np.float64) for m in (token_maps, fore_maps))
    token_mask, fore_mask = (np.asarray(m, np.float32) for m in (token_mask, fore_mask))
    batch = token_maps.shape[0] // 2
    cond = token_maps[batch:]
    fore = fore_maps[batch:] if corrected else fore_maps[:batch]  # the code's quirk: unconditional half
    check(token_mask.shape == cond.shape and fore_mask.shape == (batch, 1, *cond.shape[2:]),
          f"S-CFG check: masks {token_mask.shape} and {fore_mask.shape} do not fit maps {cond.shape}: "
          "pass the SemanticCombine node's token_mask [B, T, h, w] and fore_mask [B, 1, h, w]")
    binary = np.isin(token_mask, (0.0, 1.0)).all(axis=1) & np.isin(fore_mask[:, 0], (0.0, 1.0))
    top = cond.max(axis=1, keepdims=True)
    near = (top - cond) <= margin * np.abs(top)  # [B, T, h, w]: the winner and every token within the margin
    chosen = token_mask > 0.5
    token_ok = chosen.any(axis=1) & ~(chosen & ~near).any(axis=1)
    groups = _token_groups(cond)[:, :, None, None]
    near_group_lo = np.where(near, groups, groups.max() + 1).min(axis=1)
    near_group_hi = np.where(near, groups, -1).max(axis=1)
    token_decided = near_group_lo == near_group_hi  # only one set of identical columns is within the margin
    start, rest = fore[:, 0], fore[:, 1]
    fore_top = np.maximum(start, rest)
    picked = np.where(fore_mask[:, 0] > 0.5, rest, start)  # foreground: the non-start tokens' map won
    fore_ok = (fore_top - picked) <= margin * np.abs(fore_top)
    fore_decided = np.abs(start - rest) > margin * np.abs(fore_top)
    return ~(binary & token_ok & fore_ok), token_decided & fore_decided


def tie_safe_check(u, c, scale, token_maps, fore_maps, token_mask, fore_mask, got, *, corrected: bool = False,
                   margin: float | None = None) -> TieSafeCheck:
    """Check an S-CFG output `got` `[B, C, H, W]` and the masks it was computed with against the reference.

    The one comparison every S-CFG check uses (export validation, tests, benchmarks); see the module doc.
    `u`, `c`: the reference's two predictions; `scale`: w as a float, `[B]` or `[B, K]` (column 0);
    `token_maps`, `fore_maps`: the reference's `semantic_maps`; `token_mask`, `fore_mask`: the decisions
    of the implementation that produced `got` (for an ONNX graph: the `mask_probe` outputs).
    """
    import numpy as np
    import torch

    from samg.scfg.reference import combine_with_masks

    invalid, decided = mask_decisions(token_maps, fore_maps, token_mask, fore_mask, corrected=corrected, margin=margin)
    as_tensor = lambda a: torch.as_tensor(np.asarray(a, np.float32))  # noqa: E731
    want = combine_with_masks(as_tensor(u), as_tensor(c), as_tensor(token_mask), as_tensor(fore_mask),
                              as_tensor(scale)).numpy()
    got = np.asarray(got, np.float32)
    check(got.shape == want.shape, f"S-CFG check: output {got.shape} does not match the reference {want.shape}")
    norm = np.maximum(1.0, np.abs(want).reshape(len(want), -1).max(axis=1))
    error = float((np.abs(got - want).reshape(len(want), -1).max(axis=1) / norm).max()) if got.size else 0.0
    if invalid.any() or not np.isfinite(error):
        error = math.inf
    return TieSafeCheck(error, int(invalid.sum()), float(decided.mean()))


def mask_probe(model):
    """A copy of an ONNX model with one SemanticCombine node (body attached) whose mask decisions are
    extra graph outputs `PROBE_TOKEN_MASK`, `PROBE_FORE_MASK`; `guided` is unchanged (same body)."""
    onnx = require("onnx", "to read an S-CFG graph's masks")
    from samg.scfg.op import DOMAIN, OP_TYPE

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    nodes = [n for n in probe.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]
    bodies = [f for f in probe.functions if f.domain == DOMAIN and f.name == OP_TYPE]
    check(len(nodes) == 1 and len(bodies) == 1,
          f"the graph has {len(nodes)} {DOMAIN}::{OP_TYPE} nodes and {len(bodies)} function bodies, expected 1 "
          "of each: pass a model exported with --guidance scfg")
    made = {out for node in bodies[0].node for out in node.output}
    check(all(name in made for name in _BODY_MASKS),
          f"the {OP_TYPE} body has no {' / '.join(_BODY_MASKS)} tensors: update samg.scfg.compare._BODY_MASKS")
    body = probe.functions.add()
    body.CopyFrom(bodies[0])
    body.name = OP_TYPE + PROBE_SUFFIX
    body.output.extend(_BODY_MASKS)
    nodes[0].op_type = body.name
    nodes[0].output.extend((PROBE_TOKEN_MASK, PROBE_FORE_MASK))
    for name in (PROBE_TOKEN_MASK, PROBE_FORE_MASK):
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return probe


def probe_session(path, session_options=None, providers=("CPUExecutionProvider",)):
    """An ONNX Runtime session over `mask_probe` of the graph at `path` (its outputs: the graph's own
    and the two mask outputs). Weights in external files are read in place: the probe graph is then
    written next to the model for the session's creation only and removed."""
    onnx = require("onnx", "to read an S-CFG graph's masks")
    ort = require("onnxruntime", "to run an S-CFG graph")
    path = Path(path)
    probe = mask_probe(onnx.load(str(path), load_external_data=False))
    options = session_options or ort.SessionOptions()
    if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in probe.graph.initializer):
        return ort.InferenceSession(probe.SerializeToString(), options, providers=list(providers))
    temp = path.parent / f".{path.stem}.mask-probe-{os.getpid()}.onnx"
    try:
        onnx.save_model(probe, str(temp))
        return ort.InferenceSession(str(temp), options, providers=list(providers))
    finally:
        temp.unlink(missing_ok=True)


def run_probe(session, feeds) -> dict:
    """Every output of a `probe_session` by name."""
    return dict(zip((o.name for o in session.get_outputs()), session.run(None, feeds)))
