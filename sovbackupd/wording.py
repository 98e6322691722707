"""Wording shared by the messages an operator reads."""


def plural(count: int, noun: str) -> str:
    """Return *count* with *noun*, singular for exactly one: "1 file", "0 files", "2 files"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
