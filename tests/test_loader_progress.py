"""Progress: a tqdm bar on a terminal, periodic log lines anywhere else."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from core.config import Config
from loader import progress
from loader.sync import SyncOptions, sync_list


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def numbers_config(make_config: Callable[..., Config], folder: Path) -> Config:
    (folder / "list.txt").write_text("".join(f"1516{n:07d}\n" for n in range(70_000)))
    return make_config({"lists": {"big": {"source": "list.txt"}}}, base_dir=folder)


async def test_a_terminal_gets_a_progress_bar(
    redis: Redis,
    make_config: Callable[..., Config],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    config = numbers_config(make_config, tmp_path)
    await sync_list(redis, config, "big", SyncOptions(progress="auto"))
    drawn = terminal.getvalue()
    assert "big:" in drawn and "70,000 rows" in drawn and "100%" in drawn


async def test_elsewhere_progress_is_logged_in_lines(
    redis: Redis,
    make_config: Callable[..., Config],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    config = numbers_config(make_config, tmp_path)
    with caplog.at_level(logging.INFO, logger="loader.progress"):
        await sync_list(redis, config, "big", SyncOptions(progress="auto"))
    lines = [r.getMessage() for r in caplog.records if r.name == "loader.progress"]
    assert lines and all(line.startswith("big: ") for line in lines)
    assert any("% of the source, " in line and " rows read (" in line for line in lines)
