"""The walk of ``--recipe vipnet``: chromatic aberration (27) from a second list, in list
order, until ``walk_count`` references have all five levels.

Which references succeed is known only once the search has run, so the walk runs
chunks (``Plan.chunk_task``) in rounds: each round submits enough chunks to reach
the target at the success rate seen so far (never fewer than the workers), then
counts the successes in the completed *prefix* of chunks.  Once the prefix holds
the target, the chunk holding the last success needed is cut right after it
(made again from its rows up to that one: its stats record the cut), and the
chunks beyond it -- made speculatively -- are deleted.  The set kept is therefore
the first ``walk_count`` successes in list order, whatever the worker count or
round sizes, and a re-run reuses every completed chunk (resume by content, as for
any shard).
"""

from __future__ import annotations

import glob
import itertools
import math
import os
from typing import Callable, Iterable, Iterator

from .outdir import STATS_DIR, remove_shard
from .plan import Plan, ShardTask
from .task import planned_names, read_stats


class Walk:
    """The state of one walk: the latest result of each chunk, and what to run next."""

    def __init__(self, plan: Plan, workers: int):
        self.plan, self.workers = plan, workers
        self.results: dict[int, dict] = {}  # chunk -> its latest result
        self.rounds = self.chunks_run = 0

    # ------------------------------------------------------------------ what is known
    def _full(self, chunk: int) -> bool:
        """Whether the chunk's latest result is complete over all of its rows."""
        result = self.results.get(chunk)
        return result is not None and result["status"] == "complete" \
            and result["rows"][1] == self.plan.chunk_rows(chunk)[1]

    def scan(self) -> tuple[str, int, int | None, int]:
        """Walk the completed prefix of chunks: ``(state, chunk, row, found)`` with state
        ``"found"`` (the target's last success is ``row`` of ``chunk``), ``"need"`` (chunk
        ``chunk`` must run, whole), ``"failed"`` (it failed) or ``"exhausted"`` (the list
        ended first); ``found`` counts the successes before that point."""
        target, found = self.plan.settings.walk_count, 0
        for chunk in range(self.plan.n_chunks):
            result = self.results.get(chunk)
            if result is None:
                return "need", chunk, None, found
            if result["status"] != "complete":
                return "failed", chunk, None, found
            for row in result["successes"]:
                found += 1
                if found == target:
                    return "found", chunk, row, found
            if not self._full(chunk):  # cut short by an earlier walk: its later rows unknown
                return "need", chunk, None, found
        return "exhausted", self.plan.n_chunks, None, found

    def _success_rate(self) -> float:
        rows = successes = 0
        for result in self.results.values():
            if result["status"] == "complete":
                rows += result["rows"][1] - result["rows"][0]
                successes += len(result["successes"])
        return max(successes, 1) / rows if rows else 1.0

    # ------------------------------------------------------------------ what to run
    def _recorded_cut(self, chunk: int) -> int | None:
        """The row a complete record of this chunk says an earlier walk cut it at, if any:
        running that cut again resumes it instead of remaking the whole chunk."""
        stats = read_stats(self.plan.settings.out_dir, self.plan.shard_name(
            self.plan.n_shards + chunk))
        rows = stats.get("rows") if stats and stats.get("status") == "complete" else None
        first, stop = self.plan.chunk_rows(chunk)
        if isinstance(rows, list) and len(rows) == 2 and rows[0] == first \
                and type(rows[1]) is int and first < rows[1] < stop:
            return rows[1]
        return None

    def _recorded(self) -> set[int]:
        """The chunks that have a stats record (of any status) in ``--out``."""
        names = glob.glob(os.path.join(self.plan.settings.out_dir, STATS_DIR, "shard-*.json"))
        digits = (os.path.basename(n)[len("shard-"):-len(".json")] for n in names)
        return {int(d) - self.plan.n_shards for d in digits
                if d.isdigit() and self.plan.n_shards <= int(d) < self.plan.n_shards
                + self.plan.n_chunks}

    def first_round(self) -> list[ShardTask]:
        """Chunks for the target at a 100 % success rate, or as far as a previous run got
        (each at the cut its record holds, if any)."""
        plan = self.plan
        wanted = math.ceil(plan.settings.walk_count / plan.settings.groups_per_shard)
        count = min(max(wanted, self.workers, max(self._recorded(), default=-1) + 1),
                    plan.n_chunks)
        self.rounds += 1
        return [plan.chunk_task(k, self._recorded_cut(k)) for k in range(count)]

    def next_round(self) -> list[ShardTask]:
        """Whole chunks from the first one the prefix needs, as many as the success rate
        says the target needs (at least one per worker); [] once the walk is decided."""
        state, chunk, _, found = self.scan()
        if state != "need":
            return []
        plan, per_chunk = self.plan, self.plan.settings.groups_per_shard
        rows_needed = (plan.settings.walk_count - found) / self._success_rate()
        count = max(math.ceil(rows_needed / per_chunk), self.workers)
        todo = [k for k in range(chunk, plan.n_chunks) if not self._full(k)][:count]
        self.rounds += 1
        return [plan.chunk_task(k) for k in todo]

    def absorb(self, result: dict) -> None:
        self.results[result["index"] - self.plan.n_shards] = result
        self.chunks_run += not result.get("resumed")

    # ------------------------------------------------------------------ the outcome
    def cut(self) -> ShardTask | None:
        """The last chunk needed, cut after the target's last success, if it is not so yet."""
        state, chunk, row, _ = self.scan()
        if state != "found" or self.results[chunk]["rows"][1] == row + 1:
            return None
        return self.plan.chunk_task(chunk, row + 1)

    def kept(self) -> int:
        """How many chunks the walk keeps (the prefix, up to the last one needed)."""
        state, chunk, _, _ = self.scan()
        return chunk + 1 if state == "found" else chunk

    def drop_beyond(self) -> int:
        """Once the walk is decided, delete the chunks after the last one needed, which
        earlier rounds (or runs) made speculatively; returns how many.  After a failed
        chunk nothing is decided, and they stay for the next run."""
        if self.scan()[0] not in ("found", "exhausted"):
            return 0
        plan, kept = self.plan, self.kept()
        beyond = sorted(k for k in self._recorded() | set(self.results) if k >= kept)
        for chunk in beyond:
            task = plan.chunk_task(chunk)
            remove_shard(plan.settings.out_dir, task.name, planned_names(task))
            self.results.pop(chunk, None)
        return len(beyond)

    def manifest_results(self) -> list[dict]:
        """The kept chunks' results, and a failed chunk's that stopped the walk."""
        state, chunk, _, _ = self.scan()
        return [self.results[k] for k in range(self.kept() + (state == "failed"))]

    def summary(self) -> dict:
        """The walk's outcome for the manifest: a function of the inputs only."""
        state, chunk, row, found = self.scan()
        kept = [self.results[k] for k in range(self.kept())]
        return {"type": self.plan.settings.walk_type, "wanted": self.plan.settings.walk_count,
                "found": found,
                "rows_walked": row + 1 if state == "found" else
                sum(r["rows"][1] - r["rows"][0] for r in kept),
                "chunks": len(kept), "complete": state in ("found", "exhausted"),
                "samples_planned": sum(r["planned"] for r in kept)}


def run_walk(walk: Walk, run: Callable[[Iterable[ShardTask]], Iterator[dict]],
             first: Iterable[ShardTask], on_round: Callable[[list[ShardTask]], None],
             on_result: Callable[[dict], None]) -> list[dict]:
    """Run the walk to its end with ``run`` (``distribute.task_runner``); the first round
    also runs ``first`` (the job's other tasks, after the chunks).  Returns the results
    of ``first``; the walk's are in ``walk``."""
    others = []
    chunks = walk.first_round()
    on_round(chunks)
    for result in run(itertools.chain(chunks, first)):
        on_result(result)
        if result["index"] >= walk.plan.n_shards:
            walk.absorb(result)
        else:
            others.append(result)
    while chunks := walk.next_round():
        on_round(chunks)
        for result in run(chunks):
            on_result(result)
            walk.absorb(result)
    cut = walk.cut()
    if cut is not None:
        on_round([cut])
        for result in run([cut]):
            on_result(result)
            walk.absorb(result)
    return others
