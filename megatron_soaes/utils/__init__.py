"""Small facts used everywhere, each written once: dtype names and atomic file writes."""
