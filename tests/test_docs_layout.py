"""The README's layout table and its links follow the folders as they are."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _layout_rows() -> dict[str, str]:
    table = README.split("## Layout", 1)[1]
    rows = {}
    for line in table.splitlines():
        found = re.match(r"\| `([^`]+)` \| (.*) \|$", line)
        if found:
            rows[found.group(1)] = found.group(2)
    return rows


def test_every_module_is_named_in_its_folders_layout_row() -> None:
    rows = _layout_rows()
    missing = []
    for folder in ("service", "service/edge", "service/screening", "service/operator",
                   "service/procs", "core", "core/build", "loader"):  # fmt: skip
        row = rows.get(f"{folder}/") or rows.get("core/", "")
        for module in sorted((ROOT / folder).glob("*.py")):
            if module.name == "__init__.py" or (
                folder == "loader" and module.name == "__main__.py"
            ):
                continue
            if f"`{module.name}`" not in row:
                missing.append(f"{folder}/{module.name}")
    assert missing == []


def test_the_readmes_links_to_files_exist() -> None:
    links = re.findall(r"\]\(((?:service|core|loader|docs|bench|devtools)/[^)#]+)", README)
    assert links, "the request-path walk links its modules"
    assert [link for link in links if not (ROOT / link).exists()] == []
    assert "service/screening/screen.py" in links and "service/edge/answers.py" in links
