"""samg.rng: Philox4x32-10 standard normals, bit-identical in Python and C++.

Independent expectations: Random123's published known-answer vectors for Philox4x32-10; the
normal distribution's moments and CDF (KS statistic); Box–Muller written out with the standard
library's log/cos (the module's own polynomials must agree to float rounding); and the C++
generator (runtime/cpp/src/rng.cc, through the samg-noise tool) bit for bit.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from samg import rng
from samg.errors import SamgError

# Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter[4], key[2] -> output[4].
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox4x32_10_matches_random123_known_answers(counter, key, expected):
    out = rng.philox4x32(np.array([counter], np.uint32), key)
    assert tuple(int(v) for v in out[0]) == expected


def test_normals_follow_box_muller_with_the_standard_library():
    # z_i = sqrt(-2 ln u1) cos(2 pi u2) from the documented bit recipe, with math.log / math.cos.
    seed, n = 12345, 2000
    counter = np.zeros((n, 4), np.uint32)
    counter[:, 0] = np.arange(n)
    words = rng.philox4x32(counter, (seed & 0xFFFFFFFF, seed >> 32))
    expected = []
    for x0, x1, x2, x3 in words.tolist():
        u1 = (((x0 << 21) | (x1 >> 11)) + 1) / 2.0**53
        u2 = ((x2 << 21) | (x3 >> 11)) / 2.0**53
        expected.append(math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2))
    expected = np.array(expected)
    actual = rng.standard_normal(seed, (n,))
    assert actual.dtype == np.float32
    # float32 rounding of the same value: half an ulp of float32, plus the float64 polynomial error
    np.testing.assert_allclose(actual, expected, rtol=2**-23, atol=1e-12)


def test_a_million_normals_have_normal_moments_and_cdf():
    n = 1_000_000
    z = rng.standard_normal(7, (n,)).astype(np.float64)
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se
    assert abs(np.mean(z**3)) < 5 * math.sqrt(15) * se  # skewness, sd sqrt(15/n)
    assert abs(np.mean(z**4) - 3) < 5 * math.sqrt(96) * se  # kurtosis, sd sqrt(96/n)
    # Kolmogorov-Smirnov against the normal CDF; 1.95/sqrt(n) is the 0.1 % critical value.
    z.sort()
    cdf = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    i = np.arange(1, n + 1)
    ks = max(np.max(i / n - cdf), np.max(cdf - (i - 1) / n))
    assert ks < 1.95 * se
    # tails reach where 1e6 normals reach (|z| > 4.5 has probability 6.8e-6)
    assert 4.5 < np.abs(z).max() < 8.6


def test_an_element_depends_only_on_seed_and_index():
    flat = rng.standard_normal(3, (24,))
    np.testing.assert_array_equal(rng.standard_normal(3, (2, 3, 4)).ravel(), flat)
    np.testing.assert_array_equal(rng.standard_normal(3, (5,)), flat[:5])
    assert not np.array_equal(rng.standard_normal(4, (24,)), flat)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, "1", True, None])
def test_bad_seeds_are_refused(seed):
    with pytest.raises(SamgError, match="seed must be an integer from 0 to 2\\^64 - 1"):
        rng.standard_normal(seed, (2,))


@pytest.mark.native
@pytest.mark.parametrize("seed,shape", [(0, (7,)), (1, (2, 4, 8, 8)), (2**64 - 1, (3, 5)), (2**40 + 3, (1, 16, 2, 9, 11))])
def test_cpp_generator_is_bit_identical_to_python(samg_run, tmp_path, seed, shape):
    tool = Path(samg_run).parent / "samg-noise"
    out = tmp_path / "noise.npy"
    result = subprocess.run([str(tool), str(seed), str(out), *map(str, shape)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    cpp = np.load(out)
    assert cpp.dtype == np.float32 and cpp.shape == shape
    np.testing.assert_array_equal(cpp.view(np.uint32), rng.standard_normal(seed, shape).view(np.uint32))
