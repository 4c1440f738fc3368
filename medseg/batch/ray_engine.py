"""Ray execution strategy of ``medseg batch --engine ray``: the same per-series work, on a cluster.

The driver (:class:`medseg.batch.runner._Runner`, this process) keeps everything stateful:
discovery, selection, the SQLite manifest (opened by this process only, on its local disk),
claims and their leases, renaming finished outputs into place and recording them.  Ray runs the
stateless per-series work of :mod:`medseg.batch.runner`, stage by stage::

    read task (CPU)          read_series(): DICOM -> Volume (numpy array + geometry) + source headers
        |  object store      the array travels out-of-band (pickle protocol 5), zero-copy on its node
    predictor actor (GPU)    loads the model once; predict_series() -> label Volume
        |
    write task (CPU)         write_series(): outputs into OUT/.tmp/<claim id>/<attempt>/ (shared filesystem;
        |                    a folder per execution, so a worker wrongly thought dead cannot disturb its retry)
    driver                   checks the files, renames the folder to its final place and marks the series
                             done, in one manifest transaction (Runner.commit); removes OUT/.tmp/<claim id>

Ray provides placement (CPU tasks anywhere, one actor per GPU), data movement, retries and
restarts: read and write tasks are retried by Ray when their worker or node dies
(``max_retries = max_attempts - 1``, which also lets Ray rebuild a lost volume by lineage),
predictor actors restart on another node (``max_restarts=-1``) and re-run the calls they were given
(``max_task_retries = max_attempts - 1``).  When Ray gives up on a series (its worker died
``--max-attempts`` times: out of memory, a crash) the series is failed with that reason; when an
intermediate result was lost with its node and could not be rebuilt, the driver submits the series
again, at most ``--max-attempts`` times in all.  Application errors (a bad series) are returned by
the workers as data, redacted by the driver and recorded; the run goes on.

Backpressure: at most ``workers * (prefetch + 1)`` series are in flight (claimed, read or being
read, predicted, written), so the decoded volumes held by the cluster do not grow with the archive.

A driver killed at any moment leaves ``running`` rows owned by a dead process: the next run with
the same command reclaims them, removes their temporary folders and goes on (Ray ends the tasks and
actors of a driver that disappears).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medseg.batch.manifest import Claim
from medseg.batch.runner import (
    SeriesWork,
    _make_predictor,
    label_names_of,
    model_fingerprint,
    predict_series,
    read_series,
    write_series,
)
from medseg.errors import ConfigError, MedsegError, ModelError

if TYPE_CHECKING:
    from medseg.batch.runner import _Item, _Runner

__all__ = ["RAY_EXTRA", "import_ray", "run_on_ray"]

RAY_EXTRA = "pip install 'medseg[ray]'"
#: Environment variables forwarded to the workers (fault injection for the tests).
_FORWARDED_ENV = ("MEDSEG_BATCH_CRASH_AT", "MEDSEG_BATCH_RAISE_AT", "MEDSEG_BATCH_KILL_AT")
#: Memory a predictor actor reserves (bytes): see ``_drive``.
_PREDICTOR_MEMORY = 64 * 2**20


def import_ray() -> Any:
    """The ``ray`` module, or a :class:`ConfigError` naming the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"--engine ray needs Ray, which is not installed: {RAY_EXTRA}") from exc
    return ray


# ---------------------------------------------------------------------- stages (run on Ray workers)
def _error(stage: str, exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, MedsegError):
        return {"error": str(exc)}
    return {"error": f"unexpected {type(exc).__name__} while {stage}: {exc}"}


def read_stage(work: SeriesWork, claim: Claim) -> tuple[Any, dict[str, Any]]:
    """Read task: ``(volume or None, info)``; ``info`` holds the source headers, ``load_s`` or ``error``.

    Two return values, so that the predictor receives only the volume and the writer fetches the
    volume only when an output needs the image (RTSTRUCT).
    """
    t0 = time.perf_counter()
    try:
        volume, sources = read_series(work, claim)
    except Exception as exc:  # a bad series must not stop the batch: returned as data
        return None, _error("loading", exc)
    return volume, {"sources": sources, "load_s": round(time.perf_counter() - t0, 4)}


class PredictorWorker:
    """Predictor actor: loads the model once, segments the volumes it is given.

    Args:
        work: The run's settings (model path and the fingerprint the driver saw).
        device: Inference device (``None``: ``cuda`` when Ray assigned a GPU, else ``cpu``).
    """

    def __init__(self, work: SeriesWork, device: str | None) -> None:
        import ray
        import torch

        if device is None:
            device = "cuda" if ray.get_gpu_ids() else "cpu"
        if device.startswith("cpu"):
            # Ray sets OMP_NUM_THREADS=1 in a worker that reserves no CPU: a CPU predictor uses the
            # cores its node offers Ray instead (one predictor per node).
            torch.set_num_threads(max(1, _node_cpus(ray)))
        found = model_fingerprint(work.model_dir)
        if found != work.model_id:
            raise ModelError(
                f"{work.model_dir}: the model on this node ({found}) differs from the driver's ({work.model_id})"
            )
        self.predictor = _make_predictor(work.model_dir, device)
        self.names = label_names_of(self.predictor)

    def predict(self, claim: Claim, volume: Any, info: dict[str, Any]) -> dict[str, Any]:
        """``{"label", "names", "timings"}`` or ``{"error"}``."""
        if volume is None:
            return {"error": info.get("error", "not loaded")}
        try:
            if not volume.array.flags.writeable:
                # Zero-copy from the object store is read-only; the predictor normalises a writable
                # array in place (and a read-only one through another, not bit-identical, path):
                # one copy in the input's memory order keeps the outputs equal to a local run.
                volume.array = volume.array.copy(order="K")
            label, timings = predict_series(self.predictor, claim, volume)
        except Exception as exc:
            return _error("predicting", exc)
        return {"label": label, "names": self.names, "timings": {"load_s": info["load_s"], **timings}}

    def where(self) -> str:
        """Node id, device and CPU threads (for the run summary)."""
        import ray
        import torch

        node = ray.get_runtime_context().get_node_id()[:8]
        return f"{node}:{self.predictor.device}:{torch.get_num_threads()} threads"


def _node_cpus(ray: Any) -> int:
    node = ray.get_runtime_context().get_node_id()
    for entry in ray.nodes():
        if entry.get("NodeID") == node:
            return int(entry.get("Resources", {}).get("CPU", 1))
    return int(os.cpu_count() or 1)


def write_stage(
    work: SeriesWork, claim: Claim, volume: Any, info: dict[str, Any], predicted: dict[str, Any]
) -> dict[str, Any]:
    """Write task: outputs into ``OUT/.tmp/<claim id>/<attempt>/``; ``{"marker"}`` or ``{"error"}``.

    Every execution of the task (Ray retries it when its worker dies) writes a folder of its own.
    """
    if "error" in predicted:
        return {"error": predicted["error"]}
    try:
        marker = write_series(
            work,
            claim,
            volume,
            info["sources"],
            predicted["label"],
            predicted["names"],
            predicted["timings"],
            attempt=uuid.uuid4().hex,
        )
    except Exception as exc:
        return _error("writing", exc)
    return {"marker": marker}


# ---------------------------------------------------------------------------- the driver loop
@dataclass
class _InFlight:
    item: _Item
    actor: int
    result: Any
    tries: int


def _cluster_resources(ray: Any) -> tuple[int, float]:
    """Alive nodes and GPUs of the cluster."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = sum(float(n.get("Resources", {}).get("GPU", 0)) for n in nodes)
    return len(nodes), gpus


def _init(ray: Any, address: str | None) -> bool:
    """Connect to (or start) Ray; True when this call initialised it (and should shut it down)."""
    if ray.is_initialized():
        return False
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    try:
        ray.init(
            address=address,
            namespace="medseg-batch",
            runtime_env={"env_vars": env} if env else None,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"--engine ray: cannot connect to the Ray cluster at {address or 'auto'} ({exc})") from exc
    return True


def run_on_ray(runner: _Runner) -> dict[str, Any]:
    """Process the pending series of ``runner``'s manifest on Ray (see the module docstring).

    Returns:
        What the run summary records about the engine (actors, where they run, in-flight bound).
    """
    ray = import_ray()
    options = runner.options
    owns = _init(ray, options.address)
    try:
        return _drive(ray, runner)
    finally:
        if owns:
            ray.shutdown()


def _drive(ray: Any, runner: _Runner) -> dict[str, Any]:
    options, work = runner.options, runner.work
    retries = options.max_attempts - 1
    nodes, cluster_gpus = _cluster_resources(ray)
    gpus = options.gpus_per_worker if options.gpus_per_worker is not None else (1.0 if cluster_gpus else 0.0)
    workers = options.workers or (max(1, int(cluster_gpus // gpus)) if gpus else nodes)
    cpus = options.cpus_per_reader
    read = ray.remote(read_stage).options(num_cpus=cpus, num_returns=2, max_retries=retries)
    write = ray.remote(write_stage).options(num_cpus=cpus, max_retries=retries)
    actor_cls = ray.remote(PredictorWorker).options(
        num_cpus=0,  # on CPU the actor shares its node's cores with the read/write tasks
        num_gpus=gpus,
        # A token reservation: Ray places an actor that reserves nothing without regard to nodes
        # (measured: both CPU predictors on one node), so SPREAD would not spread them.
        memory=_PREDICTOR_MEMORY,
        scheduling_strategy="SPREAD",
        max_restarts=-1,
        max_task_retries=retries,
    )
    actors = [actor_cls.remote(work, options.device) for _ in range(workers)]
    try:  # the predictors load the model before any series is claimed: a bad model fails the run, not each series
        where = sorted(ray.get([a.where.remote() for a in actors]))
    except ray.exceptions.RayActorError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ModelError(f"{work.model_dir}: the Ray predictor could not start: {lines[-1][:500]}") from exc
    load = [0] * workers
    limit = workers * (options.prefetch + 1)
    inflight: dict[Any, _InFlight] = {}

    def submit(item: _Item, tries: int) -> None:
        claim = item.claim
        work.temp_dir(claim).mkdir(parents=True, exist_ok=True)  # the write attempts go inside
        volume, info = read.remote(work, claim)
        actor = min(range(workers), key=load.__getitem__)  # the least busy predictor
        load[actor] += 1
        predicted = actors[actor].predict.remote(claim, volume, info)
        image = volume if "rtstruct" in work.outputs else None
        result = write.remote(work, claim, image, info, predicted)
        inflight[result] = _InFlight(item, actor, result, tries)

    try:
        exhausted = False
        while True:
            while not exhausted and len(inflight) < limit:
                claim = runner._claim()
                if claim is None:
                    exhausted = True
                    break
                item = runner.prepare(claim)
                if item.error is not None or item.adopt is not None:
                    runner.finish(item)
                else:
                    submit(item, 1)
            if not inflight:
                break
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                job = inflight.pop(ref)
                load[job.actor] -= 1
                _collect(ray, runner, job, submit)
    except BaseException:
        for job in inflight.values():
            runner.manifest.release(job.item.claim)
            shutil.rmtree(work.temp_dir(job.item.claim), ignore_errors=True)
        raise
    return {"engine": "ray", "ray_nodes": nodes, "ray_workers": workers, "ray_gpus_per_worker": gpus,
            "ray_in_flight": limit, "ray_predictors": where}  # fmt: skip


def _lost_errors(ray: Any) -> tuple[type[BaseException], ...]:
    """Ray errors meaning "an intermediate result was lost with its node" (not the series' fault)."""
    names = ("ObjectLostError", "OwnerDiedError", "NodeDiedError", "ObjectReconstructionFailedError")
    return tuple(getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n))


def _collect(ray: Any, runner: _Runner, job: _InFlight, submit: Any) -> None:
    """Record the outcome of one series (done, failed, or submitted again after a lost node)."""
    item = job.item
    try:
        outcome = ray.get(job.result)
    except ray.exceptions.RayError as exc:
        # A failed stage fails the stages after it: unwrap to the first failure.
        cause: BaseException = exc
        while isinstance(cause, ray.exceptions.RayTaskError) and isinstance(cause.cause, ray.exceptions.RayError):
            cause = cause.cause
        if isinstance(cause, _lost_errors(ray)):
            if job.tries < runner.options.max_attempts:
                submit(item, job.tries + 1)
                return
            runner.finish(item, error=f"lost with its Ray node {job.tries} time(s) ({type(cause).__name__})")
        elif isinstance(cause, ray.exceptions.RayTaskError):  # an exception the stage did not turn into data
            runner.finish(item, error=f"unexpected error on a Ray worker: {cause.cause!r}")
        else:  # the worker died max_attempts times (Ray's retries are spent)
            runner.finish(
                item,
                error=f"the Ray worker processing this series died {runner.options.max_attempts} time(s)"
                f" (out of memory or a crash?): {type(cause).__name__}",
            )
        return
    if "error" in outcome:
        runner.finish(item, error=outcome["error"], timings=outcome.get("timings"))
    else:
        runner.finish(item, marker=outcome["marker"])
