"""The daemon fixtures of the integration suite, shared with the monitoring tests."""

from tests.integration.test_daemon import notify_socket, start_daemon

__all__ = ["notify_socket", "start_daemon"]
