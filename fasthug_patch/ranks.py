"""Ranks of a multi-process job that load the same checkpoint share the reading.

Under torchrun (or any job with an initialised ``torch.distributed`` process group) every
rank calls from_pretrained on the same files. Without help each rank reads the whole
checkpoint: N times the disk traffic. Ranks on one host share a page cache, so the reading
is split instead: the ranks of a host agree on the load, each fills a disjoint 1/N of the
files' bytes into the page cache with the engine's parallel reads, they wait for each
other, and every rank then maps all of it zero-copy. The kernel's page cache is the
exchange: one copy of the checkpoint in host memory however many ranks map it, and no byte
sent through a socket. Ranks on other hosts do the same among themselves (each host reads
the checkpoint once from its own disk or network file system).

Coordination uses the job's own key-value store (the process group's, or the torchrun
agent's) for a few small keys per load, each wait bounded:
1. join: each rank posts its host and the files' fingerprint, then waits up to
   FASTHUG_DIST_JOIN_S (default 10 s) for every rank of the job to post the same;
2. decide: the first rank to finish waiting sets the load's decision with compare_set,
   "share" if all joined with one fingerprint, else "solo"; every rank follows the stored
   decision, so no two ranks can disagree (a rank that arrives late reads "solo" and reads
   everything itself, as the others did);
3. done: after its part, each rank posts "ok" or its error; each waits up to
   FASTHUG_DIST_TIMEOUT_S (default 600 s) for the others of its host. A peer's error or
   a timeout raises DistributedLoadError on every rank that waits: no rank goes on with
   bytes that were never read, and none waits forever.

FASTHUG_DIST=0 turns all of this off (every rank reads everything, as before).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import threading
from dataclasses import dataclass
from datetime import timedelta

from fasthug_patch import settings
from fasthug_patch.errors import DistributedLoadError

SHARE, SOLO = "share", "solo"
NOT_A_JOB = "not a multi-process job"  # peer_group's reason when there is nothing to share with
_occurrences: dict[tuple, itertools.count] = {}
_occurrences_lock = threading.Lock()
_agent_store = None
_agent_store_lock = threading.Lock()


@dataclass
class Share:
    """This rank's part in one shared load: ``index`` of ``count`` ranks on this host."""

    group: PeerGroup
    prefix: str
    index: int
    count: int
    peers: list[int]  # global ranks on this host, in order; peers[index] is this rank
    posted: bool = False

    def post_done(self, error: BaseException | None = None) -> None:
        """Tell the others this rank's part is read (or failed). Once."""
        if self.posted:
            return
        self.posted = True
        value = "ok" if error is None else f"error: {type(error).__name__}: {error}"
        self.group.store.set(f"{self.prefix}/done/{self.group.rank}", value)

    def wait_for_peers(self) -> None:
        """Block until every rank of this host has read its part; raise DistributedLoadError
        for a peer's failure or a timeout."""
        store, timeout = self.group.store, self.group.timeout
        keys = [f"{self.prefix}/done/{rank}" for rank in self.peers]
        try:
            store.wait(keys, timedelta(seconds=timeout))
        except Exception:  # noqa: BLE001 - the store's timeout error type varies by torch version
            missing = [rank for rank, key in zip(self.peers, keys) if not store.check([key])]
            raise DistributedLoadError(
                f"rank(s) {missing} did not finish reading their part of the checkpoint within {timeout:g} s "
                f"({settings.DIST_TIMEOUT_VAR}); rank {self.group.rank} stops rather than load weights never read"
            ) from None
        for rank, key in zip(self.peers, keys):
            value = _text(store, key)
            if value != "ok":
                raise DistributedLoadError(
                    f"rank {rank} failed to read its part of the checkpoint ({value[len('error: '):]}); "
                    f"rank {self.group.rank} stops too"
                )


@dataclass
class PeerGroup:
    """The job's ranks as seen by this process, and the store they share."""

    store: object
    rank: int
    world: int
    host: str
    join_timeout: float
    timeout: float
    run_id: str = ""

    def agree(self, fingerprint: str) -> tuple[Share | None, str]:
        """Join the load of ``fingerprint``; return this rank's Share, or None and why not."""
        digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        with _occurrences_lock:
            # The n-th load of these files by this rank meets the n-th of every other rank.
            occurrence = next(_occurrences.setdefault((self.run_id, self.rank, digest), itertools.count()))
        prefix = f"fasthug/{self.run_id}/{digest}/{occurrence}"
        store, decision_key = self.store, f"{prefix}/decision"
        store.set(f"{prefix}/join/{self.rank}", f"{self.host}\n{fingerprint}")
        keys = [f"{prefix}/join/{rank}" for rank in range(self.world)]
        if store.check([decision_key]) and _text(store, decision_key) == SOLO:
            # Late: the others gave up waiting (e.g. rank 0 loaded first, alone) and read alone.
            return None, "the other ranks already loaded these files, each alone"
        try:
            store.wait(keys, timedelta(seconds=self.join_timeout))
            joined = True
        except Exception:  # noqa: BLE001 - a timeout: not every rank is loading these files now
            joined = False
        posted = [_text(store, key) for key in keys] if joined else []
        same = joined and all(value.split("\n", 1)[1] == fingerprint for value in posted)
        # Sets the decision only if no rank has yet; returns whatever now stands.
        decision = store.compare_set(decision_key, "", SHARE if same else SOLO).decode(errors="replace")
        if decision != SHARE:
            why = ("not every rank loaded these files within "
                   f"{self.join_timeout:g} s ({settings.DIST_JOIN_VAR})" if not joined
                   else "ranks load different files" if not same else "another rank decided to read alone")
            return None, why
        if not posted:  # decided "share" by the others; this rank joined in time for them
            posted = [_text(store, key) for key in keys]
        hosts = [value.split("\n", 1)[0] for value in posted]
        peers = [rank for rank in range(self.world) if hosts[rank] == self.host]
        return Share(self, prefix, peers.index(self.rank), len(peers), peers), ""


def _text(store, key: str) -> str:
    return store.get(key).decode(errors="replace")


def peer_group() -> tuple[PeerGroup | None, str]:
    """The job this process is a rank of, or None and why the reading is not shared."""
    if settings.dist_sharing() is False:
        return None, f"{settings.DIST_VAR}=0"
    world = _int_env("WORLD_SIZE")
    try:
        import torch.distributed as dist

        initialised = dist.is_available() and dist.is_initialized()
    except Exception:  # noqa: BLE001
        initialised = False
    if initialised:
        world, rank = dist.get_world_size(), dist.get_rank()
        store = _default_store()
    else:
        rank = _int_env("RANK")
        store = _agent_store_client() if world and world > 1 and rank is not None else None
    if not world or world < 2:
        return None, NOT_A_JOB
    if store is None:
        return None, "no store to coordinate through (neither an initialised process group nor torchrun's agent store)"
    host = os.environ.get("FASTHUG_DIST_HOST") or socket.gethostname()
    run_id = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return PeerGroup(store, rank, world, host, settings.dist_join_seconds(), settings.dist_timeout_seconds(),
                     run_id), ""


def _int_env(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def _default_store():
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()  # the store init_process_group rendezvoused through
    except Exception:  # noqa: BLE001 - private in torch; without it there is no sharing
        return None


def _agent_store_client():
    """A client of the store torchrun's agent serves at MASTER_ADDR:MASTER_PORT (the one
    ``init_process_group("env://")`` would use), when torchrun says workers may use it."""
    global _agent_store
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    with _agent_store_lock:
        if _agent_store is None:
            try:
                from torch.distributed import TCPStore

                _agent_store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), None, False,
                                        timedelta(seconds=settings.dist_join_seconds()))
            except Exception:  # noqa: BLE001
                return None
        return _agent_store


def owned_chunks(chunks: list[tuple[str, int, int]], index: int, count: int) -> set[tuple[str, int]]:
    """The chunks (file, chunk index, length), in file order, that rank ``index`` of
    ``count`` reads: those starting in its 1/count of the bytes of all files together.
    Every chunk has exactly one owner."""
    total = sum(length for _, _, length in chunks)
    begin, end = total * index // count, total * (index + 1) // count
    owned, offset = set(), 0
    for name, chunk, length in chunks:
        if begin <= offset < end:
            owned.add((name, chunk))
        offset += length
    return owned


def fingerprint(files: list[tuple[str, int]]) -> str:
    """What ranks compare to know they load the same bytes: each file's path, size and
    modification time."""
    parts = []
    for name, size in files:
        try:
            mtime = os.stat(name).st_mtime_ns
        except OSError:
            mtime = 0
        parts.append(f"{os.path.realpath(name)}:{size}:{mtime}")
    return "|".join(parts)
