"""Scheme registry: names, fields, MLC's constraints, JSON round trip, and the size arithmetic."""

from __future__ import annotations

import math

import pytest

from mlc_schemes.schemes import SCHEMES, GroupQuantSym, get_scheme, scheme_from_json
from omniquant.errors import UserError

REQUIRED = ["w2a16g128asym", "w3a16g128asym", "w4a16g128asym", "w3a16g64asym", "w4a16g64asym", "w4a16asym",
            "q4f16_1", "q3f16_1"]


def test_required_schemes_registered_with_their_fields():
    assert set(REQUIRED) <= set(SCHEMES)
    for name in REQUIRED:
        s = get_scheme(name)
        assert (s.storage_dtype, s.model_dtype, s.linear_weight_layout) == ("uint32", "float16", "NK")
        assert s.elems_per_word == 32 // s.bits
    w3 = get_scheme("w3a16g128asym")
    assert (w3.bits, w3.group_size, w3.symmetric, w3.stores_zero, w3.fixed_zero) == (3, 128, False, True, None)
    assert w3.elems_per_word == 10 and get_scheme("w2a16g128asym").elems_per_word == 16
    assert get_scheme("w4a16asym").group_size == -1 and get_scheme("w4a16asym").num_groups(576) == 1
    q4, q3 = get_scheme("q4f16_1"), get_scheme("q3f16_1")
    assert (q4.bits, q4.group_size, q4.fixed_zero, q4.qmax, q4.stores_zero) == (4, 32, 7, 14, False)
    assert (q3.bits, q3.group_size, q3.fixed_zero, q3.qmax, q3.stores_zero) == (3, 40, 3, 6, False)


def test_unknown_scheme_error_lists_registered_names():
    with pytest.raises(UserError) as e:
        get_scheme("q4f16_0")
    assert all(name in str(e.value) for name in SCHEMES)


def test_mlc_rejects_groups_that_split_words():
    # MLC's own rule: int3 with group 128 is not a whole number of 10-code words.
    with pytest.raises(ValueError, match="divisible"):
        GroupQuantSym("bad", bits=3, group_size=128)


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_json_round_trip(name):
    assert scheme_from_json(SCHEMES[name].to_json()) == SCHEMES[name]


@pytest.mark.parametrize("name,k", [("w3a16g128asym", 576), ("w3a16g128asym", 1536), ("w4a16g128asym", 576),
                                    ("q3f16_1", 400), ("w4a16asym", 192)])
def test_size_arithmetic(name, k):
    s = get_scheme(name)
    meta = 32 if s.stores_zero else 16
    g = 1 if s.group_size == -1 else math.ceil(k / s.group_size)
    assert s.layout_bits_per_weight(k) == (32 * math.ceil(k * s.bits / (32 - 32 % s.bits)) + meta * g) / k
    if s.group_size != -1:
        assert s.nominal_bits_per_weight() == s.bits + meta / s.group_size
    assert get_scheme("w3a16g128asym").nominal_bits_per_weight() == 3.25
    assert get_scheme("w3a16g128asym").layout_bits_per_weight() == pytest.approx(3.2 + 0.25)
