"""The wire protocol and client, from their single source in `pg2_server`.

The built extension carries copies in `pg2_wire/` (made by build.py); run from source, the
repository's `pg2_server` package is imported instead (its `__init__` imports nothing heavy).
"""
from importlib.util import find_spec

if find_spec(f"{__package__}.pg2_wire") is not None:
    from .pg2_wire import client, protocol
else:
    from pg2_server import client, protocol

__all__ = ["client", "protocol"]
