from tests.processes import server_factory

__all__ = ["server_factory"]
