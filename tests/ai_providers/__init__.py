"""Test servers speaking model providers' documented wire formats, on loopback."""
