"""What an operator touches: the ``cluster`` command, configuration, keys
files and the asyncio relay client library. Imports the core and ``worker``;
nothing imports it."""
