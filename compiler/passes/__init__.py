"""Graph-to-graph passes."""
