"""Base images: fetched from a URL or a file, checked, and cached as storage pool volumes."""
