"""search_spaces: declarative study definitions and their validating loader (issue 5 builds it)."""
