"""sparse_mla op family (placeholder until it lands)."""
__all__ = []
