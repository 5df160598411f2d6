"""Bit packing of slab tensors: round trips, exact layout, and dequantization."""

import pytest
import torch

from camera_kernels import packing


@pytest.mark.parametrize("bits", packing.SUPPORTED_BITS)
@pytest.mark.parametrize("k", [1, 31, 32, 33, 96, 130])
def test_pack_unpack_round_trip(bits: int, k: int) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + k)
    q = torch.randint(0, 2**bits, (k, 5), generator=g)
    packed = packing.pack(q, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (packing.packed_rows(k, bits), 5)
    assert torch.equal(packing.unpack(packed, bits, k), q.to(torch.int32))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_power_of_two_widths_use_plain_little_endian_stream(bits: int) -> None:
    # Independent oracle: build each word bit by bit from the documented rule.
    q = torch.randint(0, 2**bits, (32, 3), generator=torch.Generator().manual_seed(bits))
    packed = packing.pack(q, bits)
    per_word = 32 // bits
    for col in range(3):
        for w in range(bits):
            expected = 0
            for i in range(per_word):
                expected |= int(q[w * per_word + i, col]) << (i * bits)
            assert int(packed[w, col]) & 0xFFFFFFFF == expected


def test_three_bits_are_a_two_bit_plane_then_a_one_bit_plane() -> None:
    q = torch.randint(0, 8, (32, 2), generator=torch.Generator().manual_seed(3))
    packed = packing.pack(q, 3)
    low = packing.pack(q & 3, 2)
    high = packing.pack(q >> 2, 1)
    assert torch.equal(packed, torch.cat([low, high]))


def test_pack_rejects_out_of_range_codes() -> None:
    with pytest.raises(ValueError, match="out of range"):
        packing.pack(torch.tensor([[4]]), 2)
    with pytest.raises(ValueError, match="unsupported bit-width 5"):
        packing.bit_parts(5)


def test_unpack_rejects_wrong_row_count() -> None:
    with pytest.raises(ValueError, match="expected 4 rows"):
        packing.unpack(torch.zeros(3, 2, dtype=torch.int32), 2, 64)


def test_dequantize_uses_per_group_scales_with_a_short_last_group() -> None:
    k, n, g = 70, 4, 32  # groups of 32, 32 and a short one of 6
    q = torch.randint(0, 16, (k, n), generator=torch.Generator().manual_seed(0))
    scales = torch.rand(3, n, dtype=torch.float16) + 0.1
    zeros = torch.rand(3, n, dtype=torch.float16) * 15
    out = packing.dequantize(packing.pack(q, 4), scales, zeros, 4, k, g)
    for row in range(k):
        grp = row // g
        ref = (q[row].float() - zeros[grp].float()) * scales[grp].float()
        torch.testing.assert_close(out[row], ref, rtol=0, atol=0)
