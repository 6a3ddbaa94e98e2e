"""One seeded generator for every runtime: standard normals from Philox4x32-10, bit-identical in
Python (this module, numpy only) and C++ (runtime/cpp/src/rng.cc), so a seed means the same
initial noise, hence the same image, in `samg generate` and `samg-run --seed`.

Element i (flat C-order index) of `standard_normal(seed, shape)` depends only on (seed, i):
  key     = (seed mod 2^32, seed div 2^32)
  counter = (i mod 2^32, i div 2^32, 0, 0)
  x0..x3  = Philox4x32-10(counter, key)                       (Salmon et al. 2011, Random123)
  u1      = ((x0 · 2^21 + x1 div 2^11) + 1) · 2^-53           in (0, 1]   (53 random bits)
  u2      =  (x2 · 2^21 + x3 div 2^11)      · 2^-53           in [0, 1)
  z       = sqrt(−2 ln u1) · cos(2π u2)                        (Box–Muller), in float64,
  rounded once to float32.

Bit-identical across CPUs, numpy versions and compilers: ln and cos are not libm's (whose last
bit may differ between CPUs, SIMD paths and library versions) but fixed polynomials evaluated in
a fixed order with +, −, ×, ÷ and sqrt only, all correctly rounded by IEEE 754; frexp and the
range reductions are exact. The C++ side is compiled with -ffp-contract=off so no fused
multiply-add changes a rounding. Accuracy: ~1e-16 relative before the float32 rounding.
"""

from __future__ import annotations

import numpy as np

from samg.errors import SamgError

PHILOX_ROUNDS = 10
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # key increments (Weyl sequence)
_MASK32 = np.uint64(0xFFFFFFFF)
SEED_LIMIT = 2**64  # seeds are 0 <= seed < SEED_LIMIT (two 32-bit key words)
_CHUNK = 1 << 20  # elements per vectorised pass: bounds the temporaries to ~100 MB

# ln(m) = 2 atanh(s) = 2 s (1 + s²/3 + s⁴/5 + ...), s = (m − 1)/(m + 1), |s| <= 0.1716 for
# m in [√½, √2): ten terms leave < 1e-17.
_LOG_TERMS = 11
_LN2 = float.fromhex("0x1.62e42fefa39efp-1")
_HALF_PI = float.fromhex("0x1.921fb54442d18p+0")
_SQRT_HALF = float.fromhex("0x1.6a09e667f3bcdp-1")
# Taylor coefficients 1/n!, correctly rounded, for sin (odd n <= 17) and cos (even n <= 18) on
# [0, π/4]: the first dropped term is below 1e-17 there.
_SIN_COEFFS = tuple(float.fromhex(h) for h in (
    "0x1.0000000000000p+0", "-0x1.5555555555555p-3", "0x1.1111111111111p-7", "-0x1.a01a01a01a01ap-13",
    "0x1.71de3a556c734p-19", "-0x1.ae64567f544e4p-26", "0x1.6124613a86d09p-33", "-0x1.ae7f3e733b81fp-41",
    "0x1.952c77030ad4ap-49"))
_COS_COEFFS = tuple(float.fromhex(h) for h in (
    "0x1.0000000000000p+0", "-0x1.0000000000000p-1", "0x1.5555555555555p-5", "-0x1.6c16c16c16c17p-10",
    "0x1.a01a01a01a01ap-16", "-0x1.27e4fb7789f5cp-22", "0x1.1eed8eff8d898p-29", "-0x1.93974a8c07c9dp-37",
    "0x1.ae7f3e733b81fp-45", "-0x1.6827863b97d97p-53"))


def philox4x32(counter: np.ndarray, key: tuple[int, int], rounds: int = PHILOX_ROUNDS) -> np.ndarray:
    """Philox4x32-`rounds` of `counter` ([N, 4] uint32) under `key` (two uint32): [N, 4] uint32."""
    c = np.asarray(counter, np.uint32).astype(np.uint64)
    c0, c1, c2, c3 = (c[:, j] for j in range(4))
    k0, k1 = np.uint64(key[0] & 0xFFFFFFFF), np.uint64(key[1] & 0xFFFFFFFF)
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    for r in range(rounds):
        if r:  # the key is bumped before every round but the first
            k0 = (k0 + np.uint64(PHILOX_W0)) & _MASK32
            k1 = (k1 + np.uint64(PHILOX_W1)) & _MASK32
        p0, p1 = m0 * c0, m1 * c2  # < 2^64: exact in uint64
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _MASK32
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)


def _log(u: np.ndarray) -> np.ndarray:
    """ln u for u in (0, 1], float64, from + − × ÷ only (frexp and ×2 are exact)."""
    m, e = np.frexp(u)  # u = m · 2^e, m in [0.5, 1)
    low = m < _SQRT_HALF
    m = np.where(low, m * 2.0, m)
    e = np.where(low, e - 1, e).astype(np.float64)
    s = (m - 1.0) / (m + 1.0)
    z = s * s
    series = np.full_like(z, 1.0 / (2 * _LOG_TERMS - 1))
    for k in range(_LOG_TERMS - 2, -1, -1):
        series = series * z + 1.0 / (2 * k + 1)
    return e * _LN2 + 2.0 * s * series


def _poly(x2: np.ndarray, coeffs: tuple[float, ...]) -> np.ndarray:
    acc = np.full_like(x2, coeffs[-1])
    for c in coeffs[-2::-1]:
        acc = acc * x2 + c
    return acc


def _cos_turns(u: np.ndarray) -> np.ndarray:
    """cos(2π u) for u in [0, 1), float64, from + − × only: exact reduction to an octant."""
    t = u * 4.0
    quadrant = np.floor(t)
    f = t - quadrant  # angle within the quadrant, in quarter turns: [0, 1)
    upper = f > 0.5  # cos(π/2·f) = sin(π/2·(1 − f)): keep the argument in [0, π/4]
    phi = np.where(upper, 1.0 - f, f) * _HALF_PI
    phi2 = phi * phi
    sin_phi, cos_phi = phi * _poly(phi2, _SIN_COEFFS), _poly(phi2, _COS_COEFFS)
    cos_f = np.where(upper, sin_phi, cos_phi)  # cos(π/2·f)
    sin_f = np.where(upper, cos_phi, sin_phi)  # sin(π/2·f)
    q = quadrant.astype(np.int64)
    # cos(q·π/2 + θ): q=0 cos θ, q=1 −sin θ, q=2 −cos θ, q=3 sin θ
    return np.select([q == 0, q == 1, q == 2], [cos_f, -sin_f, -cos_f], sin_f)


def _normals(seed: int, start: int, count: int) -> np.ndarray:
    index = np.arange(start, start + count, dtype=np.uint64)
    counter = np.zeros((count, 4), np.uint32)
    counter[:, 0] = index & _MASK32
    counter[:, 1] = index >> np.uint64(32)
    x = philox4x32(counter, (seed & 0xFFFFFFFF, seed >> 32)).astype(np.uint64)
    bits1 = (x[:, 0] << np.uint64(21)) | (x[:, 1] >> np.uint64(11))
    bits2 = (x[:, 2] << np.uint64(21)) | (x[:, 3] >> np.uint64(11))
    u1 = (bits1 + np.uint64(1)).astype(np.float64) * 2.0**-53  # (0, 1]: ln never sees 0
    u2 = bits2.astype(np.float64) * 2.0**-53  # [0, 1)
    return (np.sqrt(-2.0 * _log(u1)) * _cos_turns(u2)).astype(np.float32)


def check_seed(seed) -> int:
    """The seed as an int in [0, SEED_LIMIT), or SamgError."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < SEED_LIMIT:
        raise SamgError(f"seed must be an integer from 0 to 2^64 - 1, got {seed!r}: e.g. --seed 1")
    return int(seed)


def standard_normal(seed: int, shape) -> np.ndarray:
    """float32 standard normals of `shape`, element i from Philox4x32-10 keyed by `seed` at counter i."""
    seed = check_seed(seed)
    shape = tuple(int(d) for d in np.atleast_1d(shape)) if np.ndim(shape) else (int(shape),)
    if any(d < 0 for d in shape):
        raise SamgError(f"noise shape {shape} has a negative size")
    total = int(np.prod(shape, dtype=np.int64)) if shape else 1
    out = np.empty(total, np.float32)
    for start in range(0, total, _CHUNK):
        count = min(_CHUNK, total - start)
        out[start:start + count] = _normals(seed, start, count)
    return out.reshape(shape)
