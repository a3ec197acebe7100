"""What every Handbook section ends with or cites, written once for the study and frontier reports: paths relative
to the repository, and a section's figure followed by its hand-written notes (``<study>.md`` next to the file)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def rel(path: Path) -> Path:
    """``path`` relative to the repository where it lies inside it (links in HANDBOOK.md), else as given."""
    return path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path


def figure_and_notes(title: str, png: Path | None, section_file: Path) -> list[str]:
    """Markdown lines: the plot (when one was drawn), then the notes file next to ``section_file``, if any."""
    out = ["", f"![{title}]({rel(png)})"] if png else []
    notes = section_file.with_suffix(".md")
    if notes.exists():
        out += ["", notes.read_text().strip()]
    return out
