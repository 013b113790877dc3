"""flashinfer/progress.py: a progress line on a TTY, nothing when piped."""

import io

from flashinfer.progress import Progress


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_tty_shows_counts_and_final_state_then_clears():
    tty = FakeTTY()
    p = Progress("calibrating", unit="layers", stream=tty, min_interval_s=3600)
    p(1, 16)  # first call draws
    p(2, 16)  # throttled
    p(16, 16)  # the final state always draws
    p.close()
    out = tty.getvalue()
    assert "1/16 layers" in out and "2/16" not in out and "16/16 layers" in out and "100.0%" in out
    assert out.endswith("\r\033[K")


def test_bytes_unit_and_piped_output_is_silent():
    tty = FakeTTY()
    Progress("converting", total=2_000_000, stream=tty)(1_000_000)
    assert "50.0%" in tty.getvalue() and "1.0 MB" in tty.getvalue()
    piped = io.StringIO()
    p = Progress("converting", stream=piped)
    p(5, 10)
    p.close()
    assert piped.getvalue() == ""
