"""Fixtures of the remote services that the target tests run against."""

from tests.remotes import aws_environment, gcs_emulator, moto_server, sshd

__all__ = ["aws_environment", "gcs_emulator", "moto_server", "sshd"]
