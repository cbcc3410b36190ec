"""Byte units and how sizes are printed, for every report (plan, compile, checkpoints)."""

GIB = 2**30


def human_bytes(nbytes: float) -> str:
    """Bytes as GiB / MiB / KiB with three significant digits, or whole bytes below 1 KiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes:.0f} B"
