"""Differential tests: the same scenario against tox-bootstrapd 0.2.18 and our relay."""
