"""sovbackupd: the backup daemon for SovereignCore servers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sovbackupd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
