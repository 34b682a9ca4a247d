"""Interoperability tests: real toxcore clients (libtoxcore via ctypes) against our relay."""
