"""Data transforms shared by training, evaluation and inference."""
