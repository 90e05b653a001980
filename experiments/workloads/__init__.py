"""Data, models and training loops shared by the experiments."""
