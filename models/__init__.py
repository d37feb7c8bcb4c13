"""neural_arch."""
