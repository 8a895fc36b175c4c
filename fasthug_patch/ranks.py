"""Ranks of a multi-process job that load the same checkpoint share the reading.

Under torchrun (or any job with an initialised ``torch.distributed`` process group) every
rank calls from_pretrained on the same files. Without help each rank reads the whole
checkpoint: N times the disk traffic. Ranks on one host share a page cache, so the reading
is split instead: the ranks of a host read disjoint chunks of the files' bytes into the page
cache with the engine's parallel reads, and every rank maps all of it zero-copy once each
chunk is read. The kernel's page cache is the exchange: one copy of the checkpoint in host
memory however many ranks map it, and no byte sent through a socket. Ranks on other hosts
do the same among themselves (each host reads the checkpoint once from its own disk or
network file system).

Coordination uses the job's own key-value store (the process group's, or the torchrun
agent's), a few small keys per chunk of the engine's fill, and no rank waits to start:
1. claim: the chunks, in file order, are split by bytes into one home range per rank of
   the host. Each rank's reader threads claim chunks with an atomic counter per range
   (``store.add``): its own range first, then the others' ranges. Every chunk is claimed
   once. Ranks of a job start loading at different moments (imports race on a busy host):
   the first to start reads on into the others' ranges until they arrive, a rank that never
   loads these files costs nothing (the others read its range), and one that comes after
   the reading is over reads nothing.
2. done: the reader of a chunk posts "ok" or its error under the chunk's key, and every
   rank waits for each chunk's key, in file order, before handing out that chunk's bytes.
   A peer's error, or no word within FASTHUG_DIST_TIMEOUT_S (default 600 s), raises
   DistributedLoadError on every rank that waits: no rank goes on with bytes that were
   never read, and none waits forever.
Keys are scoped by the run, the host, the files' fingerprint (paths, sizes, modification
times) and how many times this rank has loaded them: ranks on other hosts, or loading
other files, never meet.

FASTHUG_DIST=0 turns all of this off (every rank reads everything, as before).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

from fasthug_patch import settings
from fasthug_patch.errors import DistributedLoadError

NOT_A_JOB = "not a multi-process job"  # peer_group's reason when there is nothing to share with
OK = "ok"
# How long a client of torchrun's agent store waits to connect.
STORE_CONNECT_SECONDS = 30.0
# A wait for a chunk polls the store first after this long, then backs off up to the max
# (a 16 MiB chunk takes ~10 ms to read at the reference disk's speed).
POLL_FIRST_SECONDS = 0.001
POLL_MAX_SECONDS = 0.02
_occurrences: dict[tuple, itertools.count] = {}
_occurrences_lock = threading.Lock()
_agent_store = None
_agent_store_lock = threading.Lock()


@dataclass
class Share:
    """One load shared by the ranks on this host: the chunks of its files (lengths, in file
    order), the home range of each of ``slots`` ranks, and this rank's ``slot``."""

    group: PeerGroup
    prefix: str
    lengths: list[int]
    slot: int
    slots: int
    claimed: int = 0  # chunks this rank claimed
    stopped: bool = False  # the load ended: waits return at once
    _ranges: list[tuple[int, int]] = field(default_factory=list)
    _order: list[int] = field(default_factory=list)  # ranges to claim from, own first
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._ranges = home_ranges(self.lengths, self.slots)
        self._order = [(self.slot + step) % self.slots for step in range(self.slots)]

    def claim(self) -> int | None:
        """The next chunk this rank reads (an index into ``lengths``), or None when every
        chunk has been claimed by some rank. Thread-safe."""
        store = self.group.store
        while True:
            with self._lock:
                if not self._order:
                    return None
                current = self._order[0]
            first, end = self._ranges[current]
            chunk = first + store.add(f"{self.prefix}/next/{current}", 1) - 1
            if chunk < end:
                store.set(f"{self.prefix}/owner/{chunk}", str(self.group.rank))
                with self._lock:
                    self.claimed += 1
                return chunk
            with self._lock:  # this range is all claimed: on to the next
                if self._order and self._order[0] == current:
                    self._order.pop(0)

    def post(self, chunk: int, error: BaseException | None = None) -> None:
        """Tell the other ranks that ``chunk`` is read, or why it could not be."""
        value = OK if error is None else f"error: {type(error).__name__}: {error}"
        self.group.store.set(self._done_key(chunk), value)

    def wait(self, chunk: int, what: str) -> bool:
        """Block until ``chunk`` (``what``: where its bytes lie, for messages) is read by
        whichever rank claimed it. False if the load stopped meanwhile; raises
        DistributedLoadError if its reader failed or did not report in time.

        Polls with ``check`` rather than blocking in the store's ``wait``: a TCPStore
        client runs one request at a time, so a blocked wait would hold up this rank's
        claims and posts behind it (measured: 2 ranks of a 1b load took 6-9 s, not 2)."""
        store, key = self.group.store, self._done_key(chunk)
        deadline = time.monotonic() + self.group.timeout
        pause = POLL_FIRST_SECONDS
        while not store.check([key]):
            if self.stopped:
                return False
            if time.monotonic() > deadline:
                owner_key = f"{self.prefix}/owner/{chunk}"
                who = f"rank {_text(store, owner_key)}" if store.check([owner_key]) else "no rank"
                raise DistributedLoadError(
                    f"{who} claimed {what} and did not finish reading it within {self.group.timeout:g} s "
                    f"({settings.DIST_TIMEOUT_VAR}); rank {self.group.rank} stops rather than load weights "
                    "never read")
            time.sleep(pause)
            pause = min(2 * pause, POLL_MAX_SECONDS)
        value = _text(store, key)
        if value != OK:
            owner = _text(store, f"{self.prefix}/owner/{chunk}")
            raise DistributedLoadError(f"rank {owner} failed to read {what} ({value[len('error: '):]}); "
                                       f"rank {self.group.rank} stops too")
        return True

    def _done_key(self, chunk: int) -> str:
        return f"{self.prefix}/done/{chunk}"


@dataclass
class PeerGroup:
    """The job's ranks as seen by this process, and the store they share. ``slot`` of
    ``slots``: this rank's place among the ranks of its host (LOCAL_RANK and
    LOCAL_WORLD_SIZE as launchers set them; the global rank and world size otherwise,
    where a host's ranks then take the home ranges of absent ones by claiming them)."""

    store: object
    rank: int
    world: int
    host: str
    timeout: float
    run_id: str = ""
    slot: int | None = None
    slots: int | None = None

    def share(self, fingerprint: str, lengths: list[int]) -> Share:
        """This rank's part in loading the files of ``fingerprint``, whose fill chunks have
        ``lengths`` (in file order). Returns at once: nothing waits for the other ranks."""
        digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        with _occurrences_lock:
            # The n-th load of these files by this rank meets the n-th of every other rank.
            occurrence = next(_occurrences.setdefault((self.run_id, self.rank, digest), itertools.count()))
        prefix = f"fasthug/{self.run_id}/{self.host}/{digest}/{occurrence}"
        slots = self.slots if self.slots else self.world
        slot = self.slot if self.slot is not None and self.slot < slots else self.rank % slots
        return Share(self, prefix, list(lengths), slot, slots)


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
    host = settings.dist_host(socket.gethostname())
    run_id = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    local_rank, local_world = _int_env("LOCAL_RANK"), _int_env("LOCAL_WORLD_SIZE")
    return PeerGroup(store, rank, world, host, settings.dist_timeout_seconds(), run_id, local_rank, local_world), ""


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
                                        timedelta(seconds=STORE_CONNECT_SECONDS))
            except Exception:  # noqa: BLE001
                return None
        return _agent_store


def home_ranges(lengths: list[int], slots: int) -> list[tuple[int, int]]:
    """Split chunks of ``lengths`` (in file order) into ``slots`` consecutive ranges
    [first, end) of near-equal bytes: a chunk belongs to the range its first byte falls in.
    Every chunk is in exactly one range; a range may be empty."""
    total = sum(lengths)
    starts, offset = [], 0
    for length in lengths:
        starts.append(offset)
        offset += length
    bounds = [next((i for i, start in enumerate(starts) if start >= total * slot // slots), len(lengths))
              for slot in range(slots)] + [len(lengths)]
    return [(bounds[slot], bounds[slot + 1]) for slot in range(slots)]


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
