"""Byte sizes as people write them ("8GiB", "512 MB", "1.5g") and back."""

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int) -> int:
    """Parse "8GiB" / "512MB" / "1.5g" / 1024 into a byte count.

    Binary units (KiB, MiB, GiB, TiB and the bare K, M, G, T) are powers of 1024; KB, MB, GB, TB are
    powers of 1000, as on spec sheets.
    """
    if isinstance(text, bool):
        raise ValueError(f"expected a size like '8GiB', got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"a size cannot be negative, got {text}")
        return text
    match = _PATTERN.match(text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a size like '8GiB', '512MiB' or '24GB', got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def decimal_unit_note(text: str | int) -> str | None:
    """What a size written in a decimal unit ("1GB", "512 MB") means, for a note; None for other sizes.

    Cards and nvidia-smi count memory in GiB, so a user who writes "24GB" for a 24 GiB card asks for 7% less.
    """
    match = _PATTERN.match(text) if isinstance(text, str) else None
    unit = match.group(2) if match else ""
    if unit.lower() not in ("kb", "mb", "gb", "tb"):
        return None
    power = {"kb": 3, "mb": 6, "gb": 9, "tb": 12}[unit.lower()]
    binary = f"{match.group(1)}{unit[0].upper()}iB"
    return (f"{text.strip()!r} means {match.group(1)} x 10^{power} bytes ({format_bytes(parse_bytes(text))}); "
            f"write {binary!r} for {match.group(1)} x 2^{power // 3 * 10}")


def format_bytes(n_bytes: float) -> str:
    """Format a byte count with a binary unit: 1536 -> '1.50 KiB'."""
    sign = "-" if n_bytes < 0 else ""
    value = abs(float(n_bytes))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{sign}{value:.0f} {unit}" if unit == "B" else f"{sign}{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
