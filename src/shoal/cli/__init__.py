"""The command line: `shoal models list`, `shoal ask`, `shoal demo`, ..."""
