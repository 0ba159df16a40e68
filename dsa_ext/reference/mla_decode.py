"""Reference (oracle) for the mla_decode op family (placeholder until it lands)."""
__all__ = []
