"""The archive pass on a Ray cluster (`iws-engine reprocess --engine ray`): the same inventory, shards, part-file
names, commit rule and resume as the local engine (iws_engine.reprocess); only who runs a shard changes.

Why Ray actors over shards rather than a Ray Data pipeline: exactly-once comes from the shard commit rule (a
part file is whole or absent, its name fixed by the inventory), which lets a rerun, the local engine and Ray share
one output and resume each other. A Ray Data write names its files per block and per run, so resuming would need
Ray Data's job checkpointing, which is reported to hang on small (<= 4 CPU) clusters; and moving decoded float
tensors through the object store costs more than the PNG bytes themselves. Each actor therefore holds one model
(loaded once), decodes on its CPUs in its loader threads and infers on its GPU (`num_gpus=1` with --device cuda)
or CPUs. A dead actor or node costs only its shard: the driver retries it on a surviving actor (bounded), and
starts new actors only when none is left. OUT_DIR must be on storage every node sees (NFS, Lustre, ...).
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Iterator

from iws_engine.reprocess import MAX_ATTEMPTS, OutputError, UsageError, load_worker_classifier, process_shard


class ShardWorker:
    """A Ray actor: one classifier, then any number of shards."""

    def __init__(self, options: dict, threads: int):
        self.clf = load_worker_classifier(options, threads)

    def run(self, out_dir: str, shard: int) -> dict:
        import ray

        # the node that committed the shard: for operators' logs, and so tests can fail a node that holds work
        return dict(process_shard(self.clf, Path(out_dir), shard), node=ray.get_runtime_context().get_node_id())


def run_ray(out_dir: Path, todo: list[int], options: dict, *, address: str | None, processes: int | None,
            device: str, threads: int = 1, max_attempts: int = MAX_ATTEMPTS) -> tuple[Iterator[tuple], int, int]:
    """(events as run_local's, actors, CPU threads per actor). Joins `address` (or the Ray already initialised in this process,
    or starts a local one)."""
    try:
        import ray
    except ImportError:
        raise UsageError("--engine ray needs Ray: pip install 'iws-engine[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    on_gpu = str(device).startswith("cuda")
    resources = ray.cluster_resources()
    if on_gpu:
        if resources.get("GPU", 0) < 1:
            raise UsageError("--device cuda, but the Ray cluster has no GPU")
        n_actors = processes or int(resources["GPU"])
        actor_options = {"num_cpus": threads, "num_gpus": 1}
        options = dict(options, device="cuda")  # Ray sets CUDA_VISIBLE_DEVICES: the actor's GPU is cuda:0
    else:
        n_actors = processes or max(1, int(resources.get("CPU", 1)) // threads)
        actor_options = {"num_cpus": threads}
    n_actors = min(n_actors, max(len(todo), 1))
    return _drive(ray, out_dir, todo, options, threads, n_actors, actor_options, max_attempts), n_actors, threads


def _drive(ray, out_dir, todo, options, threads, n_actors, actor_options, max_attempts) -> Iterator[tuple]:
    from ray.exceptions import RayActorError, RayError, RayTaskError

    if not todo:
        return
    remote = ray.remote(ShardWorker).options(max_restarts=0, **actor_options)
    actors = [remote.remote(options, threads) for _ in range(n_actors)]
    idle = deque(actors)
    pending = deque(todo)
    in_flight: dict = {}  # ObjectRef -> (actor, shard)
    attempts: dict[int, int] = {}
    try:
        while pending or in_flight:
            if not idle and not in_flight:  # every actor died: start as many as the cluster now has room for
                room = int(ray.available_resources().get("CPU", 0)) // max(1, actor_options["num_cpus"])
                fresh = [remote.remote(options, threads) for _ in range(max(1, min(room, n_actors)))]
                actors.extend(fresh)
                idle.extend(fresh)
            while idle and pending:
                actor, shard = idle.popleft(), pending.popleft()
                in_flight[actor.run.remote(str(out_dir), shard)] = (actor, shard)
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=5.0)
            for ref in ready:
                actor, shard = in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except OutputError as e:  # raised in the actor, re-raised here as RayTaskError(OutputError)
                    raise OutputError(str(getattr(e, "cause", e))) from None
                except RayTaskError as e:  # the shard itself failed (not the worker): report it, keep the actor
                    idle.append(actor)
                    yield ("failed", shard, f"{type(e.cause).__name__}: {e.cause}")
                    continue
                except RayError as e:  # the actor, its process or its node died
                    if isinstance(e, RayActorError) and e.actor_init_failed:
                        raise UsageError(f"the model cannot load in a Ray actor: {e}") from None
                    ray.kill(actor, no_restart=True)
                    attempts[shard] = attempts.get(shard, 0) + 1
                    why = f"Ray worker lost ({type(e).__name__})"
                    if attempts[shard] >= max_attempts:
                        yield ("failed", shard, f"{why}; tried {attempts[shard]} times")
                    else:
                        pending.append(shard)
                        yield ("retry", shard, why)
                    continue
                idle.append(actor)
                yield ("done", result)
    finally:
        for actor in actors:
            ray.kill(actor)

