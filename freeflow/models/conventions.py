"""Time/velocity conventions of checkpoint families, mapped to the internal one (DESIGN §2).

Internal: t = 0 data, t = 1 noise, velocity n - x. SiT uses t' = 1 - t and v' = x - n ("flipped");
REPA, FreeFlow and our own models use the internal convention; DiT is a DDPM ε-model (no velocity).
"""
FLIPPED_FAMILIES = ("sit",)
INTERNAL_FAMILIES = ("repa", "freeflow", "internal")


def native_time(t, family):
    """Internal time → the time the network of ``family`` expects."""
    return 1 - t if family in FLIPPED_FAMILIES else t


def internal_velocity(v, family):
    """The network's output → velocity in the internal convention (None stays None)."""
    return -v if (v is not None and family in FLIPPED_FAMILIES) else v
