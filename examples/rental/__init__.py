"""The rental assistant on real Inside Airbnb listings (see README.md)."""
