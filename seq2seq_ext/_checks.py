"""Argument checks shared across the package's modules (a leaf module: it imports none of them)."""
import numbers

__all__ = ["check_int"]


def check_int(name, value, minimum=1):
    """``value`` as an int (a Python or numpy integer) of at least ``minimum`` (None: any),
    else a TypeError or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(value)
