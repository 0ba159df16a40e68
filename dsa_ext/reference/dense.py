"""Dense masked DSA step (placeholder until it lands)."""
__all__ = []
