"""The bench report's profile section: what it says when there is no profile."""

from __future__ import annotations

from bench.report import profile_markdown


def test_a_profile_that_could_not_be_taken_says_why() -> None:
    lines = profile_markdown({"skipped": "py-spy is not installed (pip install py-spy)"})
    assert lines == ["", "Profile: py-spy is not installed (pip install py-spy)"]


def test_a_server_whose_profile_failed_says_why_and_the_other_is_shown() -> None:
    profile = {
        "Clark": {"skipped": "py-spy failed: permission denied"},
        "Bona": {"samples": 10, "self": [("read_peer (links.py:213)", 60.0)], "inclusive": []},
    }
    text = "\n".join(profile_markdown(profile))
    assert "Profile of Clark: py-spy failed: permission denied" in text
    assert "## Profile of Bona under 100 x 16 at Clark (10 py-spy --gil samples)" in text
    assert "read_peer (links.py:213)" in text
