"""indexer op family (placeholder until it lands)."""
__all__ = []
