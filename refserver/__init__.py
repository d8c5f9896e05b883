"""The reference session server: the executable specification of docs/contract.md."""

from .server import RunningServer, ServerConfig, serve

__all__ = ["RunningServer", "ServerConfig", "serve"]
