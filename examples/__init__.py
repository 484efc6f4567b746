"""Example applications built on shoal (installed as `shoal_examples`)."""
