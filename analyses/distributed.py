"""Data-parallel runs: one process per rank under ``torchrun``, examples sharded, statistics reduced.

``torchrun --nproc-per-node N -m headscope score ...`` starts N copies of the CLI; each finds its
rank in the environment (``init_from_env``) and runs the same analysis on the same example list.
The examples still to do are dealt out in rounds of ``b`` (the run's batch size, ``base.batch_plan``;
the smallest any rank chose, ``Ranks.agree``) per rank: in round ``j`` rank ``r`` processes examples
``start + (j * N + r) * b`` up to ``b`` further (``start``: examples a resumed run already has),
with one ``process_batch`` call. After each round

- every rank learns whether any rank failed (``all_gather_object``), so all stop together;
- rank 0 gathers the round's example records (``gather_object``) and appends them to
  ``examples.jsonl`` in example order, so the file reads as a single-process run's;
- each rank's own ``Aggregator`` (the statistics of the examples it processed) is gathered onto
  rank 0 and merged there (Chan's parallel update of count, mean and m2: the single-process result
  up to float64 rounding), and rank 0 checkpoints the resumed state merged with it.

Only rank 0 touches the run folder. Because records and state are committed round by round, the
finished examples are always the first ones of the list: the checkpoint has the single-process
format, so ``--resume`` works with any number of ranks, one included, and a rank killed mid-round
costs only that round's examples, which the resumed run redoes. ``run.json["shards"]`` records
each segment's start and world size, which gives the rank of every finished example.

Failure modes: a rank that dies makes the others' next collective raise; they stop with a
HeadscopeError and rank 0 leaves the run ``partial`` (torchrun then stops the rest). Ranks that
build different example lists (another ``--data`` file on another host) are refused at the start.
Analyses whose examples depend on earlier ones (``Analysis.sequential``) refuse to run sharded.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass


from headscope.errors import HeadscopeError

from .base import Aggregator, commit_round, evened, example_record, processed


def init_from_env(device: str = "cpu") -> "Ranks | None":
    """The process group of a torchrun launch (``WORLD_SIZE`` > 1 in the environment), else None.

    gloo for CPU runs, NCCL when ``device`` is CUDA (each rank then uses ``cuda:LOCAL_RANK``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    import torch.distributed as dist
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # long enough for the slowest single example (a long retrieval decode) of another rank
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return Ranks(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, backend=backend)


@dataclass(frozen=True)
class Ranks:
    """This process's place in an initialised ``torch.distributed`` group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    def device(self, device: str) -> str:
        """This rank's torch device: plain ``cuda`` means ``cuda:LOCAL_RANK``, one GPU per process."""
        return f"cuda:{self.local_rank}" if device == "cuda" else device

    def describe(self) -> dict:
        return {"world_size": self.world_size, "backend": self.backend,
                "sharding": "round-robin by batches: example start + i was processed by rank "
                            "(i // per_forward) % world_size (per_forward: run.json batching, same start)"}

    def close(self) -> None:
        from torch import distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------------ the two roles
    def agree(self, plan: dict, n_examples: int) -> dict:
        """The batch plan every rank uses: the one with the smallest ``batch_size`` (auto may pick
        another size where a rank has less free memory; the rounds need one size). An auto size
        is ``evened`` over the ranks' rounds of the ``n_examples``, so every rank gets work."""
        from torch import distributed as dist
        plans = [None] * self.world_size
        self._call(dist.all_gather_object, plans, plan)
        plan = min(plans, key=lambda p: p["batch_size"])
        if plan["requested"] == "auto" and plan["per_forward"] > 1:
            size = evened(n_examples, plan["per_forward"], self.world_size)
            plan = {**plan, "batch_size": size, "per_forward": size}
        return plan

    def lead(self, analysis, ctx, todo: list, agg: Aggregator, done: list, run, *, per: int, bar,
             on_progress) -> Aggregator:
        """Rank 0: process its share, write each round's records in order and checkpoint the merged
        state; returns the merged Aggregator (``agg`` holds the resumed examples' statistics)."""
        total = len(done) + len(todo)
        self._start([key for _, key in todo], len(done))
        merged = agg
        for chunk, records, reduced in self._rounds(analysis, ctx, todo, per):
            merged = Aggregator()
            merged.merge(agg)
            merged.merge(reduced)
            commit_round(run, merged, chunk, records, done, bar=bar, on_progress=on_progress, total=total)
        return merged

    def follow(self, analysis, ctx, examples: list, planned: list[tuple[str, str]], *, per: int) -> None:
        """Ranks > 0: process their share of the examples rank 0 has not finished; write nothing."""
        n_done = self._start(planned, None)
        for _ in self._rounds(analysis, ctx, list(zip(examples, planned))[n_done:], per):
            pass

    # ------------------------------------------------------------------------ collectives
    def _start(self, planned: list[tuple[str, str]], n_done: int | None) -> int:
        """Check that every rank plans the same examples ((digest, id) pairs); rank 0's count of
        finished ones to all. On rank 0 ``planned`` holds only those still to do, so every rank
        hashes the tail after rank 0's count."""
        from torch import distributed as dist
        box = [n_done]
        self._call(dist.broadcast_object_list, box, src=0)
        n_done = box[0]
        tail = planned if self.rank == 0 else planned[n_done:]
        mine = hashlib.sha256(json.dumps([list(k) for k in tail]).encode()).hexdigest()
        hashes = [None] * self.world_size
        self._call(dist.all_gather_object, hashes, mine)
        if len(set(hashes)) > 1:
            bad = [r for r, h in enumerate(hashes) if h != hashes[0]]
            raise HeadscopeError(f"ranks {bad} build other examples than rank 0 (--data, --limit and the options "
                                 f"must be the same on every host)")
        return n_done

    def _rounds(self, analysis, ctx, todo: list, per: int):
        """Process ``todo`` in rounds of ``per`` examples per rank (rank r takes the round's r-th
        slice of ``per``). Yields, on rank 0, (the round's (example, (digest, id)) pairs, their
        records in order, the statistics summed over every rank's examples so far); elsewhere None."""
        from torch import distributed as dist
        own = Aggregator()   # the examples this rank processed
        for start in range(0, len(todo), self.world_size * per):
            chunk = todo[start:start + self.world_size * per]
            mine = [ex for ex, _ in chunk[self.rank * per:(self.rank + 1) * per]]
            outs, fail, error = [], None, None
            if mine:
                try:
                    outs = processed(analysis, ctx, mine)
                except Exception as e:  # noqa: BLE001 - told to every rank below, then re-raised here
                    error = analysis.user_error(e) if isinstance(e, HeadscopeError) else e
                    where = mine[0].id if len(mine) == 1 else f"{mine[0].id}..{mine[-1].id}"
                    fail = (isinstance(e, HeadscopeError), f"{where}: {error}" if isinstance(e, HeadscopeError)
                            else f"{type(e).__name__}: {e}")
            fails = [None] * self.world_size
            self._call(dist.all_gather_object, fails, fail)
            if error is not None:
                raise error
            for r, f in enumerate(fails):
                if f is not None:
                    user, msg = f
                    raise (HeadscopeError if user else RuntimeError)(f"rank {r}: {msg}")
            for res in outs:
                own.add_output(res)
            records = [example_record(ex, res) for ex, res in zip(mine, outs)]
            every = [None] * self.world_size if self.rank == 0 else None
            self._call(dist.gather_object, records, every, dst=0)
            reduced = self._reduce(own)
            yield (chunk, [rec for recs in every for rec in recs], reduced) if self.rank == 0 else None

    def _reduce(self, agg: Aggregator) -> Aggregator | None:
        """Every rank's statistics onto rank 0 (None elsewhere): one ``gather_object`` of each rank's
        (n, mean, m2) per statistic, folded in rank order with ``Aggregator.merge`` (Chan's parallel
        update: the single-process mean and std up to float64 rounding). Mismatched shapes raise."""
        from torch import distributed as dist
        every = [None] * self.world_size if self.rank == 0 else None
        self._call(dist.gather_object, agg.state(), every, dst=0)
        if self.rank != 0:
            return None
        out = Aggregator()
        for state in every:
            out.merge(Aggregator.from_state(state))
        return out

    def _call(self, fn, *args, **kwargs):
        """A collective; a peer that died (its sockets close, or the timeout passes) becomes a
        one-line HeadscopeError, so rank 0 saves the run as partial for --resume."""
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise HeadscopeError(f"rank {self.rank}: lost contact with another rank ({first})") from None
