"""Ray execution strategy of ``medseg batch --engine ray``: the same per-series work, on a cluster.

The driver (:class:`medseg.batch.runner._Runner`, this process) keeps everything stateful:
discovery, selection, the SQLite manifest (opened by this process only, on its local disk),
claims and their leases, renaming finished outputs into place and recording them.  Ray runs the
stateless per-series work of :mod:`medseg.batch.series`, stage by stage::

    read task (CPU)          series.load_task(): DICOM -> Volume (numpy array + geometry) + source headers,
        |  object store      voxel-level model check; the array travels out-of-band (pickle protocol 5),
        |                    zero-copy on its node
    predictor actor (GPU)    loads the model once; predicts the label volume (unless kept labels are reused)
        |
    write task (CPU)         series.run_task() with that label: every output, independently, into
        |                    OUT/.tmp/<claim id>/<attempt>/ (shared filesystem; a folder per execution, so a
        |                    worker wrongly thought dead cannot disturb its retry)
    driver                   checks the files, writes the marker, renames the folder to its final place and
                             records the series done/partial, in one manifest transaction
                             (Runner.commit_result); removes OUT/.tmp/<claim id>

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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from medseg.batch.runner import _crash_point, _make_predictor
from medseg.batch.series import LoadedSeries, SeriesTask, _reused_labels, load_task, run_task
from medseg.errors import ConfigError, MedsegError, ModelError
from medseg.infer.compat import ChannelSpec

if TYPE_CHECKING:
    from medseg.batch.runner import _Item, _Runner

__all__ = ["RAY_EXTRA", "SeriesWork", "import_ray", "run_on_ray"]

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


@dataclass(frozen=True)
class SeriesWork:
    """What the workers need to know about the run (small and picklable; the same paths on every node).

    Attributes:
        root: Input archive.
        model_dir: Model directory.
        model_id: :func:`~medseg.batch.runner.model_fingerprint` of the model the driver saw.
        specs: The model's input channels (voxel-level check while loading).
        compat_check: Skip series that do not fit the model.
        label_names: ``{value: name}`` of the model's classes.
        seg_type: DICOM SEG encoding.
        infer: Overrides of the model's inference settings.
        folds: nnU-Net folds (``None``: every fold found).
        checkpoint: nnU-Net checkpoint, ``final`` or ``best``.
    """

    root: Path
    model_dir: Path
    model_id: str
    specs: tuple[ChannelSpec, ...]
    compat_check: bool
    label_names: dict[int, str]
    seg_type: Literal["binary", "labelmap"]
    infer: dict[str, Any]
    folds: str | None = None
    checkpoint: Literal["final", "best"] = "final"


# ---------------------------------------------------------------------- stages (run on Ray workers)
def _unexpected(stage: str, exc: BaseException) -> str:
    return str(exc) if isinstance(exc, MedsegError) else f"unexpected {type(exc).__name__} while {stage}: {exc}"


def read_stage(work: SeriesWork, task: SeriesTask) -> tuple[Any, LoadedSeries]:
    """Read task: ``(volume or None, the loaded series without its volume)``.

    Two return values, so that the predictor receives only the volume (out-of-band in the object
    store) and the writer fetches it only when it writes.
    """
    loaded = load_task(work.root, task, specs=work.specs, compat_check=work.compat_check)
    if loaded.error is None and loaded.skip is None:
        try:
            _crash_point("loaded", task.key)
        except Exception as exc:
            loaded.error, loaded.volume = _unexpected("loading", exc), None
    volume, loaded.volume = loaded.volume, None
    return volume, loaded


def _needs_prediction(task: SeriesTask, volume: Any) -> bool:
    """Whether :func:`run_task` will ask for a prediction (outputs to write, no kept labels to reuse)."""
    carried = {
        kind
        for kind, entry in task.carry.items()
        if task.carry_dir is not None
        and entry.get("files")
        and all((task.carry_dir / str(n)).is_file() for n in entry["files"])
    }
    if all(kind in carried for kind in task.outputs):
        return False
    return _reused_labels(task, volume) is None


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
        from medseg.models.adapters import open_model

        adapter = open_model(work.model_dir, folds=work.folds, checkpoint=work.checkpoint)
        found = adapter.fingerprint()
        if found != work.model_id:
            raise ModelError(
                f"{work.model_dir}: the model on this node ({found}) differs from the driver's ({work.model_id})"
            )
        self.predictor = _make_predictor(adapter, device, work.infer)

    def predict(self, task: SeriesTask, volume: Any) -> dict[str, Any]:
        """``{"label": Volume or None (nothing to predict), "timings"}`` or ``{"error"}``."""
        if volume is None or not _needs_prediction(task, volume):
            return {"label": None, "timings": {}}
        try:
            t0 = time.perf_counter()
            label = self.predictor.predict([volume])
            _crash_point("predicted", task.key)
            timings = {k: round(float(v), 4) for k, v in (getattr(self.predictor, "last_timings", {}) or {}).items()}
            timings["infer_s"] = round(time.perf_counter() - t0, 4)
        except Exception as exc:
            return {"error": _unexpected("predicting", exc)}
        return {"label": label, "timings": timings}

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


@dataclass
class _Predicted:
    """The actor's label volume, handed to :func:`run_task` as if it were the predictor."""

    label: Any
    last_timings: dict[str, float]

    def predict(self, channels: Any) -> Any:
        if self.label is None:
            raise MedsegError("the kept labels could not be reused (changed since the claim?): retry the series")
        return self.label


def write_stage(
    work: SeriesWork,
    task: SeriesTask,
    volume: Any,
    loaded: LoadedSeries,
    predicted: dict[str, Any],
    temp_dir: Path,
    report: dict[str, Any],
) -> dict[str, Any]:
    """Write task: every output into ``temp_dir/<attempt>/``.

    Every execution of the task (Ray retries it when its worker dies) writes a folder of its own,
    which must not exist, inside ``temp_dir``, which must (the driver makes it and removes it).

    Returns:
        ``{"loaded", "result", "attempt", "seconds"}``, or ``{"loaded", "error"}``, or ``{"loaded"}``
        alone when loading failed or the series does not fit the model.
    """
    if volume is None:
        return {"loaded": loaded}
    if "error" in predicted:
        return {"loaded": loaded, "error": predicted["error"]}
    attempt = uuid.uuid4().hex
    t0 = time.perf_counter()
    try:
        (temp_dir / attempt).mkdir()
        loaded.volume = volume
        model = _Predicted(predicted["label"], predicted["timings"])
        result = run_task(
            loaded, lambda: model, temp_dir / attempt, label_names=work.label_names, seg_type=work.seg_type,
            report=report,
        )  # fmt: skip
    except Exception as exc:
        return {"loaded": loaded, "error": _unexpected("writing", exc)}
    finally:
        loaded.volume = None
    if "infer_s" in predicted["timings"]:  # measured by the actor; run_task saw only the hand-over
        result.timings["infer_s"] = predicted["timings"]["infer_s"]
    seconds = time.perf_counter() - t0 + float(predicted["timings"].get("infer_s", 0.0))
    return {"loaded": loaded, "result": result, "attempt": attempt, "seconds": seconds}


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
    options = runner.options
    work = SeriesWork(
        root=runner.root,
        model_dir=runner.model_dir,
        model_id=runner.model_id,
        specs=tuple(runner.specs),
        compat_check=options.compat_check,
        label_names=dict(runner.label_names),
        seg_type=options.seg_type,
        infer=dict(options.infer),
        folds=options.folds,
        checkpoint=options.checkpoint,
    )
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
        temp_dir = runner.temp_dir(claim)
        temp_dir.mkdir(parents=True, exist_ok=True)  # the write attempts go inside
        task = runner.task(claim)
        volume, loaded = read.remote(work, task)
        actor = min(range(workers), key=load.__getitem__)  # the least busy predictor
        load[actor] += 1
        predicted = actors[actor].predict.remote(task, volume)
        result = write.remote(work, task, volume, loaded, predicted, temp_dir, runner.report_fields(claim))
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
                if item.adopt is not None:
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
            shutil.rmtree(runner.temp_dir(job.item.claim), ignore_errors=True)
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
    loaded = outcome["loaded"]
    if "result" in outcome:
        folder = runner.temp_dir(item.claim) / outcome["attempt"]
        runner.finish(item, loaded=loaded, result=outcome["result"], folder=folder, seconds=outcome["seconds"])
    else:
        runner.finish(item, loaded=loaded, error=outcome.get("error"))
