"""Reference (oracle) for the cache op family (placeholder until it lands)."""
__all__ = []
