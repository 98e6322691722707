"""The terminal progress bar: drawn on a tty only, cleared at the end."""

from __future__ import annotations

import io

from sovbackupd.progress import WIDTH, ProgressBar


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_bar_draws_progress_on_a_terminal() -> None:
    """On a tty the bar shows the fraction done and the bytes, on one rewritten line."""
    terminal = Terminal()
    bar = ProgressBar(terminal)
    bar.set_total(4096)
    bar(1024)
    drawn = terminal.getvalue()
    assert drawn.startswith("\r[")
    assert "\n" not in drawn
    assert "25%" in drawn
    assert "1.0 KiB" in drawn
    filled = WIDTH // 4
    assert f"[{'#' * filled}{'.' * (WIDTH - filled)}]" in drawn


def test_bar_is_silent_when_not_a_terminal() -> None:
    """Piped to a file or a journal, the bar writes nothing at all."""
    stream = io.StringIO()
    bar = ProgressBar(stream)
    bar.set_total(100)
    bar(50)
    bar(100)
    bar.finish()
    assert stream.getvalue() == ""


def test_bar_clears_its_line_on_finish() -> None:
    """finish() blanks the line and returns the cursor, leaving no bar behind."""
    terminal = Terminal()
    bar = ProgressBar(terminal)
    bar.set_total(100)
    bar(100)
    before = terminal.getvalue()
    bar.finish()
    cleared = terminal.getvalue()[len(before) :]
    assert cleared.startswith("\r")
    assert cleared.endswith("\r")
    assert cleared.strip() == ""
    assert len(cleared) - 2 >= len(before) - 1, "the blanks must cover the whole bar"


def test_finish_without_drawing_writes_nothing() -> None:
    """A bar that never drew has no line to clear."""
    terminal = Terminal()
    ProgressBar(terminal).finish()
    assert terminal.getvalue() == ""


def test_bar_redraws_at_most_every_refresh_interval() -> None:
    """Calls in quick succession draw once, so a fast archive is not slowed by the terminal."""
    terminal = Terminal()
    bar = ProgressBar(terminal)
    bar.set_total(1000)
    for done in range(0, 1000, 10):
        bar(done)
    assert terminal.getvalue().count("\r") == 1


def test_bar_caps_at_full_when_the_estimate_was_low() -> None:
    """More bytes than estimated shows 100%, never more."""
    terminal = Terminal()
    bar = ProgressBar(terminal)
    bar.set_total(100)
    bar(250)
    assert "100%" in terminal.getvalue()
    assert "#" * WIDTH in terminal.getvalue()


def test_bar_without_a_total_shows_bytes_only() -> None:
    """Before the estimate is known the bar stays empty but counts bytes."""
    terminal = Terminal()
    bar = ProgressBar(terminal)
    bar(2048)
    drawn = terminal.getvalue()
    assert "." * WIDTH in drawn
    assert "0%" in drawn
    assert "2.0 KiB" in drawn


def test_bar_always_draws_the_moment_it_reaches_the_total() -> None:
    """The finished state is drawn even within the refresh interval, so a bar ends at 100%."""
    terminal = Terminal()
    bar = ProgressBar(terminal)
    bar.set_total(1000)
    bar(10)
    bar(1000)
    assert terminal.getvalue().count("\r") == 2
    assert terminal.getvalue().endswith(f"[{'#' * WIDTH}] 100% 1000 B")
