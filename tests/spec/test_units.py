import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowmem.spec.units import decimal_unit_note, format_bytes, parse_bytes

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4

BINARY_UNITS = {"k": KiB, "kib": KiB, "m": MiB, "mib": MiB, "g": GiB, "gib": GiB, "t": TiB, "tib": TiB}
DECIMAL_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
ALL_UNITS = {"": 1, "b": 1, **BINARY_UNITS, **DECIMAL_UNITS}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GiB", 8 * GiB),
        ("512MB", 512 * 10**6),
        ("512 MB", 512 * 10**6),
        ("1.5g", int(1.5 * GiB)),
        ("24GB", 24 * 10**9),
        ("4kib", 4 * KiB),
        ("2T", 2 * TiB),
        (" 3 tb ", 3 * 10**12),
        (".5KiB", 512),
        ("7b", 7),
        ("1024", 1024),
        ("0", 0),
        (1024, 1024),
        (0, 0),
    ],
)
def test_parse_bytes_known_values(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "lots", "GiB", "8 GiBs", "8XB", "-1GiB", "1e9", "1,5g", "8 8GiB", "8GiB!", "0x10"],
)
def test_parse_bytes_rejects_malformed_text_and_quotes_it(text):
    with pytest.raises(ValueError) as err:
        parse_bytes(text)
    assert repr(text) in str(err.value)
    assert "8GiB" in str(err.value)  # shows an example of what is allowed


def test_parse_bytes_rejects_negative_and_bool():
    with pytest.raises(ValueError, match="negative, got -1"):
        parse_bytes(-1)
    # bool is an int subclass: True must not silently mean one byte
    with pytest.raises(ValueError, match="True"):
        parse_bytes(True)


@pytest.mark.parametrize(
    ("n_bytes", "expected"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (8 * GiB, "8.00 GiB"),
        (int(2.25 * MiB), "2.25 MiB"),
        (-2048, "-2.00 KiB"),
        (5 * 1024 * TiB, "5120.00 TiB"),  # TiB is the largest unit
    ],
)
def test_format_bytes_known_values(n_bytes, expected):
    assert format_bytes(n_bytes) == expected


@given(st.integers(min_value=0, max_value=2**60))
def test_format_then_parse_round_trips_within_rounding(n_bytes):
    back = parse_bytes(format_bytes(n_bytes))
    # two decimals of a unit >= 1 KiB is at most 0.5% off; plain bytes are exact
    if n_bytes < 1024:
        assert back == n_bytes
    else:
        assert abs(back - n_bytes) <= 0.005 * n_bytes + 1


@given(
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from(sorted(ALL_UNITS)),
    st.booleans(),
    st.sampled_from(["", " ", "  "]),
)
def test_parse_bytes_integer_counts_in_every_unit(count, unit, upper, space):
    text = f"{count}{space}{unit.upper() if upper else unit}"
    assert parse_bytes(text) == count * ALL_UNITS[unit]


@given(st.integers(min_value=0, max_value=2**53))  # digit strings go through a float: exact up to 2**53
def test_parse_bytes_accepts_plain_ints_and_digit_strings_alike(n_bytes):
    assert parse_bytes(n_bytes) == parse_bytes(str(n_bytes)) == n_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1GB", "'1GB' means 1 x 10^9 bytes (953.67 MiB); write '1GiB' for 1 x 2^30"),
        ("512 mb", "'512 mb' means 512 x 10^6 bytes (488.28 MiB); write '512MiB' for 512 x 2^20"),
    ],
)
def test_decimal_unit_note_says_what_a_decimal_size_means(text, expected):
    assert decimal_unit_note(text) == expected


@pytest.mark.parametrize("text", ["1GiB", "1g", "1024", 4096, "24 TiB"])
def test_decimal_unit_note_is_silent_for_binary_sizes(text):
    assert decimal_unit_note(text) is None
