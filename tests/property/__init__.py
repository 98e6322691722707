"""Property-based tests: generated trees go through backup and restore and come back."""
