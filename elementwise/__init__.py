"""Side-aware elementwise kernels (see docs/elementwise.md)."""
