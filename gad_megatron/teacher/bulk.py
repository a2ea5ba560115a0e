"""Many requests at once: cached answers first, the rest with bounded concurrency and a progress bar."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from gad_megatron.cache import ResponseCache
from gad_megatron.config import TeacherConfig
from gad_megatron.teacher.client import ChatClient
from gad_megatron.teacher.results import Completion, RequestStats
from gad_megatron.teacher.retry import RetryPolicy

log = logging.getLogger(__name__)


def _progress(desc: str, total: int, enabled: bool | None):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            elapsed = task.elapsed or 0.0
            fresh = task.fields.get("fresh", 0)
            return Text(f"{fresh / elapsed:.2f}/s" if elapsed > 0 and fresh else "-/s", style="cyan")

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[green]{task.fields[done]} done[/] [red]{task.fields[failed]} failed[/] "
                   "[dim]{task.fields[cached]} cached[/]"),
        RateColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=(not console.is_terminal) if enabled is None else not enabled,
    )
    task = progress.add_task(desc, total=total, done=0, failed=0, cached=0, fresh=0)
    return progress, task


async def arun_requests(
    cfg: TeacherConfig,
    requests: Sequence[tuple[str, Sequence[Mapping[str, str]]]],
    cache_path: str | Path,
    desc: str = "teacher",
    sampling: Mapping[str, Any] | None = None,
    *,
    policy: RetryPolicy | None = None,
    progress: bool | None = None,
    http_client: Any = None,
) -> tuple[dict[str, Completion], RequestStats]:
    """Answer every ``(key, messages)``: cached answers first, the rest with bounded concurrency.

    Identical requests (same cache key) are sent once. Returns key -> :class:`Completion` for every
    key, and the batch's counters.
    """
    started = time.monotonic()
    ids = [rid for rid, _ in requests]
    if len(set(ids)) != len(ids):
        dup = next(k for k, n in Counter(ids).items() if n > 1)
        raise ValueError(f"duplicate request key '{dup}'")
    client = ChatClient(cfg, policy=policy, http_client=http_client)
    stats = client.stats
    stats.rows = len(requests)
    params = client.sampling(sampling)
    groups: dict[str, list[str]] = {}
    messages_of: dict[str, Sequence[Mapping[str, str]]] = {}
    for rid, messages in requests:
        key = client.cache_key(messages, params)
        groups.setdefault(key, []).append(rid)
        messages_of.setdefault(key, messages)

    results: dict[str, Completion] = {}
    cache = ResponseCache(cache_path)
    bar, task = _progress(desc, len(requests), progress)
    counts = {"done": 0, "failed": 0, "cached": 0, "fresh": 0}
    failures_logged = 0

    def record(key: str, completion: Completion) -> None:
        nonlocal failures_logged
        n = len(groups[key])
        for rid in groups[key]:
            results[rid] = completion
        if completion.ok:
            stats.ok += n
            counts["done"] += n
            stats.flags.update({flag: n for flag in completion.flags})
        else:
            stats.failed += n
            counts["failed"] += n
            stats.errors[completion.error] += n
            if failures_logged < 5:
                failures_logged += 1
                log.warning("%s: request %s failed after %d attempt(s): %s", desc, groups[key][0], completion.attempts, completion.error)
        if completion.cached:
            stats.cached += n
            counts["cached"] += n
        else:
            counts["fresh"] += n
        bar.update(task, advance=n, **counts)

    try:
        with bar:
            for key, value in cache.get_many(groups).items():
                record(key, Completion.from_cache(value))
            todo = iter([key for key in groups if groups[key][0] not in results])

            async def worker() -> None:
                for key in todo:
                    completion = await client.complete(messages_of[key], **(sampling or {}))
                    if completion.ok:
                        cache.put(key, completion.to_cache())  # durable before it counts as done
                    record(key, completion)

            async with asyncio.TaskGroup() as tg:
                for _ in range(cfg.concurrency):
                    tg.create_task(worker())
    finally:
        cache.close()
        await client.aclose()
        stats.wall_s = time.monotonic() - started
    return results, stats


def _run_sync(coro: Any) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from inside an event loop (a notebook, an async reward function): use a fresh loop elsewhere.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def run_requests_with_stats(
    cfg: TeacherConfig,
    requests: Sequence[tuple[str, Sequence[Mapping[str, str]]]],
    cache_path: str | Path,
    desc: str = "teacher",
    sampling: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[dict[str, Completion], RequestStats]:
    """Synchronous :func:`arun_requests`: key -> :class:`Completion` for every request (cached, bounded
    concurrency, resumable), and the batch's counters."""
    return _run_sync(arun_requests(cfg, requests, cache_path, desc, sampling, **kwargs))
