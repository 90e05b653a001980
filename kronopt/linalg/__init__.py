"""Linear algebra apart from optimizer plumbing."""
