"""Reading two-line element sets (TLEs) from files, with checksums.

Files may hold 2-line sets (``1 ...`` / ``2 ...``) or 3-line sets with a
title line before them (as CelesTrak writes them; a leading ``0 `` on the
title is dropped). Blank lines are skipped. Every set is checked for line
length, line numbers, the modulo-10 checksum of each line and a matching
catalog number on both lines, then parsed by `sgp4`; any failure raises
:class:`TleError` naming the file, the line number, the problem and the fix.

Format reference: CelesTrak, "NORAD Two-Line Element Set Format"
(https://celestrak.org/columns/v04n03/). Alpha-5 catalog numbers (a
letter in the first column) are accepted; they are lowercased in names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sgp4.api import WGS72, Satrec

from topology.errors import TleError

TLE_LINE_LENGTH = 69


@dataclass(frozen=True)
class TleRecord:
    """One element set as read from a file."""

    title: str  # "" for 2-line sets
    catalog_number: str  # columns 3-7 of both lines, e.g. "25544" or "a1234"
    line1: str
    line2: str
    line_number: int  # 1-based line of `line1` in the file


def tle_checksum(line: str) -> int:
    """The TLE checksum of the first 68 columns: digits summed, '-' counts 1."""
    total = 0
    for char in line[:68]:
        if char.isdigit():
            total += int(char)
        elif char == "-":
            total += 1
    return total % 10


def read_tle_file(path: str | Path) -> list[TleRecord]:
    """Read and check every element set in `path`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii", errors="strict")
    except OSError as exc:
        raise TleError(
            f"{path}: cannot read the TLE file ({exc.strerror}); check the "
            "shell's tle_file path (relative paths start at the scenario file)"
        ) from None
    except UnicodeDecodeError as exc:
        raise TleError(
            f"{path}: not an ASCII text file (byte {exc.start}); TLE files are "
            "plain ASCII"
        ) from None
    return parse_tle_text(text, str(path))


def parse_tle_text(text: str, source: str = "<text>") -> list[TleRecord]:
    """Parse TLE text; `source` names the origin in error messages."""
    lines = [(n, line.rstrip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    records: list[TleRecord] = []
    seen: dict[str, int] = {}
    i = 0

    while i < len(lines):
        number, line = lines[i]
        title = ""
        if not line.startswith("1 "):
            title = line[2:].strip() if line.startswith("0 ") else line.strip()
            i += 1
            if i >= len(lines):
                raise TleError(
                    f"{source}:{number}: title {title!r} is not followed by an "
                    "element set; remove it or add the two element lines"
                )
            number, line = lines[i]
            if not line.startswith("1 "):
                raise TleError(
                    f"{source}:{number}: expected line 1 of an element set "
                    f"(starting '1 ') after title {title!r}, got {line[:20]!r}; "
                    "each set is an optional title, then a line 1, then a line 2"
                )
        if i + 1 >= len(lines):
            raise TleError(
                f"{source}:{number}: line 1 has no line 2 after it; the file "
                "looks truncated"
            )
        number2, line2 = lines[i + 1]
        _check_line(line, 1, number, source)
        _check_line(line2, 2, number2, source)

        catalog = line[2:7].strip()
        if line2[2:7].strip() != catalog:
            raise TleError(
                f"{source}:{number2}: catalog number {line2[2:7].strip()!r} does "
                f"not match {catalog!r} on line 1 (line {number}); the two lines "
                "come from different element sets"
            )
        key = catalog.lower()
        if key in seen:
            raise TleError(
                f"{source}:{number}: catalog number {catalog} already appeared "
                f"at line {seen[key]}; keep one element set per satellite"
            )
        seen[key] = number

        try:
            sat = Satrec.twoline2rv(line, line2, WGS72)
        except (ValueError, IndexError) as exc:
            raise TleError(
                f"{source}:{number}: sgp4 cannot parse this element set ({exc}); "
                "check the column layout against the TLE format"
            ) from None
        if sat.error:
            raise TleError(
                f"{source}:{number}: sgp4 rejects the elements of {catalog} "
                f"(error {sat.error}); check eccentricity and mean motion"
            )
        records.append(TleRecord(title, key, line, line2, number))
        i += 2

    if not records:
        raise TleError(f"{source}: no element sets found; is this a TLE file?")
    return records


def _check_line(line: str, expected: int, number: int, source: str) -> None:
    if not line.startswith(f"{expected} "):
        raise TleError(
            f"{source}:{number}: expected line {expected} of an element set "
            f"(starting '{expected} '), got {line[:20]!r}"
        )
    if len(line) != TLE_LINE_LENGTH:
        raise TleError(
            f"{source}:{number}: line {expected} has {len(line)} characters, "
            f"expected {TLE_LINE_LENGTH}; the line was cut or wrapped"
        )
    if not line[68].isdigit():
        raise TleError(
            f"{source}:{number}: the last column should be a checksum digit, "
            f"got {line[68]!r}"
        )
    got = int(line[68])
    want = tle_checksum(line)
    if got != want:
        raise TleError(
            f"{source}:{number}: bad checksum: expected {want} got {got}; the "
            "line was altered or mistyped, fetch the element set again (or fix "
            "the last digit if you edited it on purpose)"
        )
