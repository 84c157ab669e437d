"""Fitness of many adapters on a pool of workers: one per GPU (or CPU process), each holding the base model once.

Evolution spends nearly all of its time scoring adapters of one base model, and the adapters are
independent, so the work spreads over devices with no communication but the adapters going out and the
scores coming back. A worker is an :class:`~lmforge.evolve.fitness.AdapterEvaluator` built once from an
:class:`EvaluatorSpec` (the base model loaded on the worker's device, one PEFT adapter attached); every
job copies an adapter into that model in place and scores it. :class:`FitnessPool` hands the jobs to
whichever worker is free (a slow worker never holds the others up) and returns the results in the order
of its input, whatever order the workers finish in.

Backends (``backend=``):

* ``"local"``: one evaluator in this process (by default the one the caller already has); no extra
  processes. This is the default of ``lmforge evolve`` and what the others are checked against.
* ``"processes"``: one ``torch.multiprocessing`` process per device (``spawn``, so CUDA works), talking
  over a pipe each; no Ray needed.
* ``"ray"``: one Ray actor per device (``num_gpus=1`` each on GPUs, ``num_cpus=1`` on the CPU). If Ray is
  not initialised, the pool starts a local cluster with enough CPUs and shuts it down on :meth:`close`;
  in an initialised Ray session (a real cluster) it only adds its actors. Ray's ``local_mode`` no longer
  exists (Ray >= 2.4x refuses it), so on CPUs the actors are real processes of a local cluster.
  Install with ``pip install ray`` (the optional extra ``lmforge[ray]``).

Adapters travel as data, never as files: each is packed into one byte buffer plus its keys, dtypes and
shapes (:func:`pack_adapter`), pickled down the worker's pipe, or put once into Ray's object store
(``ray.put``) and read from there by the actor. Unpacking gives back the same bits, so the content hash
and the scores are those of the original adapter.

Same results as in-process: a worker runs the very code of ``AdapterEvaluator`` on the same model files,
and an evaluation depends only on the adapter and the examples, so on CPUs (with the same number of torch
threads) every backend gives bit-identical fitness; on GPUs each device computes as a single GPU would.

Errors: an exception in a worker comes back as :class:`PoolWorkerError`, naming the individual (its index
in the list given), the worker and its device, carrying the worker's traceback, with the original
exception as ``__cause__`` when it can be pickled; the other workers finish their jobs first, so the pool
stays usable. A worker that dies (killed, out of memory) raises the same error naming the individual it
held, and closes the pool. :meth:`FitnessPool.close` (or leaving a ``with`` block) ends every worker.

:class:`PoolFitnessCache` is a :class:`~lmforge.evolve.population.FitnessCache` whose ``score`` sends all
adapters it has not seen to the pool in one batch, so evolution's generations run in parallel with the
same scores, cache contents and call counts as the one-at-a-time cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import signal
import time
import traceback
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from lmforge.agent.grading import EXTRACTION_RULES
from lmforge.evolve.fitness import FITNESS_MODES, AdapterEvaluator, AnswerExample
from lmforge.evolve.population import Adapter, FitnessCache, Individual, check_scores

POOL_BACKENDS = ("local", "processes", "ray")
JOB_KINDS = ("fitness", "answers")
# Packed tensors start on multiples of this many bytes, so any dtype can be viewed in place.
PACK_ALIGNMENT = 64
# How often a waiting pool checks that its worker processes are still alive.
LIVENESS_POLL_SECONDS = 1.0


class PoolWorkerError(RuntimeError):
    """A job failed in a worker (or its worker died). ``individual``: index of the adapter in the call's
    list (None for start-up failures); ``worker`` / ``device``: where; ``remote_traceback``: the worker's."""

    def __init__(self, message: str, *, individual: int | None, worker: int, device: str,
                 remote_traceback: str = ""):
        super().__init__(message)
        self.individual = individual
        self.worker = worker
        self.device = device
        self.remote_traceback = remote_traceback


# ---------------------------------------------------------------------------------------------
# What a worker is made of.


@dataclasses.dataclass(frozen=True)
class EvaluatorSpec:
    """How a worker builds its evaluator; plain data, so it pickles to processes and Ray actors.

    adapter_folder: a PEFT LoRA folder of the base model. It fixes the adapter's structure (rank, alpha,
        target modules); its weights are overwritten by every job. An expert folder is the natural choice.
    model / dtype: the base model, as :func:`lmforge.models.loading.load_model` takes them (None: the
        embedded model; dtype "auto": the checkpoint's).
    batch_size / max_new_tokens / answer_rules: the evaluator's settings (see AdapterEvaluator).
    """

    adapter_folder: str
    model: str | None = None
    dtype: str = "auto"
    batch_size: int = 16
    max_new_tokens: int = 20
    answer_rules: tuple[str, ...] = EXTRACTION_RULES

    def __post_init__(self) -> None:
        if not isinstance(self.adapter_folder, (str, os.PathLike)):
            raise TypeError(f"adapter_folder must be a PEFT folder path, got {type(self.adapter_folder).__name__}")
        object.__setattr__(self, "adapter_folder", os.fspath(self.adapter_folder))
        if self.model is not None:
            if not isinstance(self.model, (str, os.PathLike)):
                raise TypeError(f"model must be a path, a hub id or None, got {type(self.model).__name__}")
            object.__setattr__(self, "model", os.fspath(self.model))
        if not isinstance(self.dtype, str):
            raise TypeError(f"dtype must be a dtype name such as 'auto' or 'bfloat16', got {self.dtype!r}")
        for name in ("batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.answer_rules, str) or any(r not in EXTRACTION_RULES for r in self.answer_rules):
            raise ValueError(f"answer_rules must be rules from {EXTRACTION_RULES}, got {self.answer_rules!r}")
        object.__setattr__(self, "answer_rules", tuple(self.answer_rules))


def build_evaluator(spec: EvaluatorSpec, device: str) -> AdapterEvaluator:
    """Load the spec's base model on ``device`` with its adapter folder attached, as an AdapterEvaluator."""
    from lmforge.models.loading import load_model

    model, tokenizer = load_model(spec.model, dtype=spec.dtype, device=device, lora=spec.adapter_folder)
    return AdapterEvaluator(model, tokenizer, batch_size=spec.batch_size, max_new_tokens=spec.max_new_tokens,
                            answer_rules=spec.answer_rules)


def pool_devices(device: str, workers: int | None = None) -> list[str]:
    """One device per worker: "cuda" -> cuda:0 .. cuda:N-1 (N = workers, default every visible GPU);
    "cuda:K" -> that GPU (one worker); "cpu" -> ``workers`` CPU workers (default 1)."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu', 'cuda' or 'cuda:1', got {type(device).__name__}")
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must be like 'cpu', 'cuda' or 'cuda:0', got {device!r}") from err
    if parsed.type == "cpu":
        return ["cpu"] * (workers or 1)
    if parsed.type != "cuda":
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {device!r}")
    available = torch.cuda.device_count()
    if parsed.index is not None:
        if workers not in (None, 1):
            raise ValueError(f"device {device!r} names one GPU, so workers must be 1, got {workers}; "
                             "pass device='cuda' to use several GPUs")
        return [device]
    count = workers or available
    if count < 1 or count > available:
        raise ValueError(f"workers={count} GPU workers were asked for, but {available} CUDA device(s) are visible")
    return [f"cuda:{i}" for i in range(count)]


def default_threads_per_worker(devices: Sequence[str]) -> int | None:
    """CPU workers share the cores this process may use; GPU workers keep torch's default (None)."""
    if any(not d.startswith("cpu") for d in devices):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // len(devices))


# ---------------------------------------------------------------------------------------------
# Adapters as one byte buffer.


class PackedAdapter(NamedTuple):
    """An adapter as one uint8 buffer; ``entries`` are (key, dtype name, shape, byte offset) in key order."""

    entries: tuple[tuple[str, str, tuple[int, ...], int], ...]
    buffer: np.ndarray


def pack_adapter(adapter: Mapping[str, torch.Tensor], label: str = "adapter") -> PackedAdapter:
    """The adapter's tensors (moved to the CPU) copied into one aligned byte buffer, bit for bit."""
    if not isinstance(adapter, Mapping) or not adapter:
        raise TypeError(f"{label} must be a non-empty mapping of LoRA keys to tensors, got {type(adapter).__name__}")
    tensors, entries, size = [], [], 0
    for key, tensor in adapter.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{label} must map str keys to torch.Tensor, got {key!r}: {type(tensor).__name__}")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        entries.append((key, str(flat.dtype).removeprefix("torch."), tuple(tensor.shape), size))
        tensors.append(flat)
        size += -(-flat.numel() * flat.element_size() // PACK_ALIGNMENT) * PACK_ALIGNMENT
    buffer = np.zeros(size, dtype=np.uint8)
    for (_, _, _, offset), flat in zip(entries, tensors):
        raw = flat.view(torch.uint8).numpy()
        buffer[offset:offset + raw.size] = raw
    return PackedAdapter(tuple(entries), buffer)


def unpack_adapter(packed: PackedAdapter) -> Adapter:
    """The adapter :func:`pack_adapter` packed (new CPU tensors; the buffer is copied if it is read-only)."""
    buffer = packed.buffer if packed.buffer.flags.writeable else packed.buffer.copy()
    whole = torch.from_numpy(buffer)
    adapter = {}
    for key, dtype_name, shape, offset in packed.entries:
        dtype = getattr(torch, dtype_name)
        n_bytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        adapter[key] = whole[offset:offset + n_bytes].view(dtype).reshape(shape)
    return adapter


# ---------------------------------------------------------------------------------------------
# One job, as every backend runs it.


def run_job(evaluator: AdapterEvaluator, kind: str, adapter: Mapping[str, torch.Tensor], payload) -> Any:
    """``"fitness"``: payload (tasks, mode) -> {task: fitness}; ``"answers"``: payload examples -> answers."""
    if kind == "fitness":
        tasks, mode = payload
        return {task: evaluator.fitness(adapter, examples, mode) for task, examples in tasks.items()}
    if kind == "answers":
        return evaluator.answers(adapter, payload)
    raise ValueError(f"kind must be one of {JOB_KINDS}, got {kind!r}")


def _describe_error(error: BaseException) -> dict:
    """What a worker sends back about an exception: type, message, traceback, the exception if it pickles."""
    try:
        pickled = pickle.dumps(error)
    except Exception:  # an exception holding unpicklable state: the text still says what happened
        pickled = None
    return {"type": type(error).__name__, "message": str(error),
            "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
            "exception": pickled}


def _start_evaluator(spec: EvaluatorSpec, device: str, threads: int | None) -> AdapterEvaluator:
    if threads is not None:
        torch.set_num_threads(threads)
    if torch.device(device).type == "cuda" and torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))  # kernels, caches and allocations of this worker's GPU
    return build_evaluator(spec, device)


def _process_worker_main(connection, spec: EvaluatorSpec, device: str, threads: int | None) -> None:
    """A worker process: build the evaluator, then answer (job id, kind, packed adapter, payload) messages
    until a None message or the parent's end of the pipe closes."""
    # Ctrl-C reaches the whole process group; the parent decides when workers stop (it closes the pool).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        evaluator = _start_evaluator(spec, device, threads)
    except BaseException as error:
        connection.send(("failed", None, _describe_error(error)))
        return
    connection.send(("ready", None, os.getpid()))
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if message is None:
            return
        job_id, kind, packed, payload = message
        try:
            result = run_job(evaluator, kind, unpack_adapter(packed), payload)
        except Exception as error:
            connection.send(("error", job_id, _describe_error(error)))
        else:
            connection.send(("ok", job_id, result))


class _RayWorker:
    """The Ray actor's body: the same evaluator and jobs as a worker process (wrapped by ray.remote lazily)."""

    def __init__(self, spec: EvaluatorSpec, device: str, threads: int | None):
        self.startup_error = None
        try:
            self.evaluator = _start_evaluator(spec, device, threads)
        except Exception as error:
            self.startup_error = _describe_error(error)

    def ready(self):
        return ("failed", None, self.startup_error) if self.startup_error else ("ready", None, os.getpid())

    def run(self, job_id: int, kind: str, packed: PackedAdapter, payload):
        try:
            return ("ok", job_id, run_job(self.evaluator, kind, unpack_adapter(packed), payload))
        except Exception as error:
            return ("error", job_id, _describe_error(error))


# ---------------------------------------------------------------------------------------------
# Backends: start workers, send a job to a given worker, wait for the next finished job, stop.
# A result is (worker index, status, job id, value); status is "ok", "error" or "died".


class _LocalBackend:
    def __init__(self, evaluator: AdapterEvaluator, device: str):
        self.evaluator = evaluator
        self.devices = [device]
        self.pids = [os.getpid()]
        self.queued: deque = deque()

    def submit(self, worker: int, job_id: int, kind: str, adapter: Mapping[str, torch.Tensor], payload) -> None:
        self.queued.append((worker, job_id, kind, adapter, payload))

    def next_result(self, busy: Mapping[int, int]):
        worker, job_id, kind, adapter, payload = self.queued.popleft()
        try:
            return worker, "ok", job_id, run_job(self.evaluator, kind, adapter, payload)
        except Exception as error:
            return worker, "error", job_id, {**_describe_error(error), "exception_object": error}

    def close(self) -> None:
        self.queued.clear()


class _ProcessBackend:
    def __init__(self, spec: EvaluatorSpec, devices: Sequence[str], threads: int | None, start_timeout: float):
        import torch.multiprocessing as multiprocessing

        context = multiprocessing.get_context("spawn")  # fork would copy CUDA state and torch's thread pools
        self.devices = list(devices)
        self.connections, self.processes = [], []
        try:
            for device in self.devices:
                parent_end, child_end = context.Pipe(duplex=True)
                process = context.Process(target=_process_worker_main, args=(child_end, spec, device, threads),
                                          daemon=True, name=f"lmforge-fitness-{device}")
                process.start()
                child_end.close()  # only the child holds it now, so its death reads as end of file here
                self.connections.append(parent_end)
                self.processes.append(process)
            self.pids = [p.pid for p in self.processes]
            self._wait_ready(start_timeout)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float) -> None:
        from multiprocessing.connection import wait

        waiting = set(range(len(self.connections)))
        deadline = time.monotonic() + timeout
        while waiting:
            ready = wait([self.connections[i] for i in waiting], timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                worker = min(waiting)
                raise PoolWorkerError(f"worker {worker} ({self.devices[worker]}) did not start within {timeout:.0f} s",
                                      individual=None, worker=worker, device=self.devices[worker])
            for connection in ready:
                worker = self.connections.index(connection)
                waiting.discard(worker)
                try:
                    status, _, value = connection.recv()
                except (EOFError, OSError):
                    status, value = "failed", {"type": "died", "message": "the process exited while starting "
                                               f"(exit code {self.processes[worker].exitcode})", "traceback": "",
                                               "exception": None}
                if status == "failed":
                    raise _worker_error(value, f"starting worker {worker}", None, worker, self.devices[worker])

    def submit(self, worker: int, job_id: int, kind: str, adapter: Mapping[str, torch.Tensor], payload) -> None:
        try:
            self.connections[worker].send((job_id, kind, pack_adapter(adapter), payload))
        except (BrokenPipeError, OSError):
            pass  # the worker is dead; next_result reports it for this job

    def next_result(self, busy: Mapping[int, int]):
        from multiprocessing.connection import wait

        by_connection = {self.connections[w]: w for w in busy}
        while True:
            for connection in wait(list(by_connection), timeout=LIVENESS_POLL_SECONDS):
                worker = by_connection[connection]
                try:
                    status, job_id, value = connection.recv()
                except (EOFError, OSError):
                    return worker, "died", busy[worker], self._death(worker)
                return worker, status, job_id, value
            for worker in busy:  # nothing arrived: is every busy worker alive?
                if not self.processes[worker].is_alive() and not self.connections[worker].poll():
                    return worker, "died", busy[worker], self._death(worker)

    def _death(self, worker: int) -> dict:
        process = self.processes[worker]
        process.join(timeout=5)
        return {"type": "WorkerDied", "message": f"the worker process (pid {process.pid}) died with exit code "
                f"{process.exitcode}", "traceback": "", "exception": None}

    def close(self) -> None:
        for connection in self.connections:
            with contextlib.suppress(BrokenPipeError, OSError):  # the worker is gone already
                connection.send(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():  # stuck in a job: stop it
                process.terminate()
                process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        for connection in self.connections:
            connection.close()
        self.connections, self.processes = [], []


class _RayBackend:
    def __init__(self, spec: EvaluatorSpec, devices: Sequence[str], threads: int | None, start_timeout: float):
        try:
            import ray
        except ImportError as err:
            raise ImportError("backend='ray' needs Ray: pip install ray (or lmforge[ray])") from err
        self.ray = ray
        self.devices = list(devices)
        self.actors = []
        self.started_ray = False
        on_gpu = any(d.startswith("cuda") for d in self.devices)
        if not ray.is_initialized():
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            ray.init(num_cpus=max(cores, len(self.devices)), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            self.started_ray = True
        try:
            actor_class = ray.remote(_RayWorker)
            for device in self.devices:
                # Ray gives each GPU actor one GPU as its only visible device, so it sees it as "cuda".
                options = {"num_gpus": 1, "num_cpus": 1} if on_gpu else {"num_cpus": 1}
                self.actors.append(actor_class.options(**options).remote(spec, "cuda" if on_gpu else device,
                                                                         threads))
            answers = self._get([actor.ready.remote() for actor in self.actors], start_timeout, "start")
            for worker, (status, _, value) in enumerate(answers):
                if status == "failed":
                    raise _worker_error(value, f"starting worker {worker}", None, worker, self.devices[worker])
            self.pids = [value for _, _, value in answers]
            self.in_flight: dict = {}
            self.payload_refs: dict = {}
        except BaseException:
            self.close()
            raise

    def _get(self, refs, timeout: float, what: str):
        ray = self.ray
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError as err:
            raise PoolWorkerError(f"Ray workers did not {what} within {timeout:.0f} s (are {len(self.devices)} "
                                  f"{'GPUs' if 'cuda' in self.devices[0] else 'CPUs'} free in the cluster?)",
                                  individual=None, worker=0, device=self.devices[0]) from err
        except ray.exceptions.RayActorError as err:
            raise PoolWorkerError(f"a Ray worker died while starting: {err}", individual=None, worker=0,
                                  device=self.devices[0]) from err

    def put_payload(self, payload):
        """Ship a call's shared payload (examples) to the object store once; jobs pass the reference."""
        return self.ray.put(payload)

    def submit(self, worker: int, job_id: int, kind: str, adapter: Mapping[str, torch.Tensor], payload) -> None:
        packed = self.ray.put(pack_adapter(adapter))
        self.in_flight[self.actors[worker].run.remote(job_id, kind, packed, payload)] = (worker, job_id)

    def next_result(self, busy: Mapping[int, int]):
        ray = self.ray
        (ref,), _ = ray.wait(list(self.in_flight), num_returns=1)
        worker, job_id = self.in_flight.pop(ref)
        try:
            status, _, value = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as err:
            return worker, "died", job_id, {"type": "WorkerDied", "message": f"the Ray actor died: {err}",
                                            "traceback": "", "exception": None}
        return worker, status, job_id, value

    def close(self) -> None:
        ray = self.ray
        for actor in self.actors:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(actor)
        self.actors = []
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
        self.started_ray = False


def _worker_error(value: dict, what: str, individual: int | None, worker: int, device: str) -> PoolWorkerError:
    """A PoolWorkerError from a worker's error record; the original exception becomes its __cause__."""
    message = f"{what} failed on worker {worker} ({device}): {value['type']}: {value['message']}"
    if value.get("traceback"):
        message += f"\n--- worker traceback ---\n{value['traceback'].rstrip()}"
    error = PoolWorkerError(message, individual=individual, worker=worker, device=device,
                            remote_traceback=value.get("traceback", ""))
    cause = value.get("exception_object")
    if cause is None and value.get("exception") is not None:
        try:
            cause = pickle.loads(value["exception"])
        except Exception:  # its class may not import here; the message already says what happened
            cause = None
    error.__cause__ = cause
    return error


# ---------------------------------------------------------------------------------------------
# The pool.


class FitnessPool:
    """Scores adapters on a pool of workers, each holding the base model once (state across calls: the workers).

    Args:
        spec: how each worker builds its evaluator (needed by "processes" and "ray", and by "local"
            when no ``evaluator`` is given).
        backend: "local", "processes" or "ray" (see the module docstring).
        devices: one device per worker (see :func:`pool_devices`); default ["cpu"]. "local" takes one.
        evaluator: for "local", an existing in-process AdapterEvaluator to use (nothing is loaded).
        threads_per_worker: torch CPU threads in each worker (default: this process's cores / CPU
            workers; untouched on GPUs). For "local" this process's own count, changed only when given.
        progress: a tqdm bar over adapters in each call.
        start_timeout: seconds to wait for every worker to load its model.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, spec: EvaluatorSpec | None = None, *, backend: str = "local",
                 devices: Sequence[str] | None = None, evaluator: AdapterEvaluator | None = None,
                 threads_per_worker: int | None = None, progress: bool = False, start_timeout: float = 900.0):
        if backend not in POOL_BACKENDS:
            raise ValueError(f"backend must be one of {POOL_BACKENDS}, got {backend!r}")
        if spec is not None and not isinstance(spec, EvaluatorSpec):
            raise TypeError(f"spec must be an EvaluatorSpec, got {type(spec).__name__}")
        if evaluator is not None and not isinstance(evaluator, AdapterEvaluator):
            raise TypeError(f"evaluator must be an AdapterEvaluator, got {type(evaluator).__name__}")
        if evaluator is not None and backend != "local":
            raise ValueError(f"evaluator= is for backend='local' only; backend {backend!r} builds its workers "
                             "from spec")
        if evaluator is None and spec is None:
            raise ValueError("give spec (how workers load the model), or evaluator= for backend='local'")
        if isinstance(devices, str):
            raise TypeError(f"devices must be a list of devices, one per worker, got the string {devices!r}")
        devices = [str(d) for d in devices] if devices is not None else ["cpu"]
        if not devices:
            raise ValueError("devices must name at least one device")
        if backend == "local" and len(devices) != 1:
            raise ValueError(f"backend='local' runs one in-process worker; got {len(devices)} devices {devices} "
                             "(use backend='processes' or 'ray' for several)")
        if threads_per_worker is not None and (isinstance(threads_per_worker, bool)
                                               or not isinstance(threads_per_worker, int) or threads_per_worker < 1):
            raise ValueError(f"threads_per_worker must be a positive int or None, got {threads_per_worker!r}")
        self.backend_name = backend
        self.progress = progress
        self._backend = None
        if backend == "local":
            # In-process: the thread count is this process's own, changed only when asked.
            if evaluator is None:
                evaluator = _start_evaluator(spec, devices[0], threads_per_worker)
            device = str(next(evaluator.model.parameters()).device)
            self._backend = _LocalBackend(evaluator, device)
        elif backend == "processes":
            threads = threads_per_worker or default_threads_per_worker(devices)
            self._backend = _ProcessBackend(spec, devices, threads, start_timeout)
        else:
            threads = threads_per_worker or default_threads_per_worker(devices)
            self._backend = _RayBackend(spec, devices, threads, start_timeout)
        self._devices = list(self._backend.devices)
        self._pids = list(self._backend.pids)

    # --- information ---------------------------------------------------------------------------

    @property
    def devices(self) -> list[str]:
        """The device of each worker."""
        return list(self._devices)

    @property
    def n_workers(self) -> int:
        return len(self._devices)

    @property
    def worker_pids(self) -> list[int]:
        """Process id of each worker (this process for "local"); kept after :meth:`close`."""
        return list(self._pids)

    @property
    def closed(self) -> bool:
        return self._backend is None

    # --- work ----------------------------------------------------------------------------------

    def fitness(self, adapters: Sequence[Mapping[str, torch.Tensor]],
                tasks: Mapping[str, Sequence[AnswerExample]], mode: str, *, progress: bool | None = None,
                ) -> list[dict[str, float]]:
        """``{task: fitness}`` of each adapter on ``tasks`` (validation examples per task), in input order."""
        if mode not in FITNESS_MODES:
            raise ValueError(f"mode must be one of {FITNESS_MODES}, got {mode!r}")
        if not isinstance(tasks, Mapping) or not tasks:
            raise TypeError("tasks must be a non-empty mapping of task name to examples")
        tasks = {task: _checked_examples(examples, f"tasks[{task!r}]") for task, examples in tasks.items()}
        return self._map("fitness", adapters, (tasks, mode), progress)

    def answers(self, adapters: Sequence[Mapping[str, torch.Tensor]], examples: Sequence[AnswerExample], *,
                progress: bool | None = None) -> list[list[str | None]]:
        """Per adapter, the answers extracted from its greedy replies to ``examples`` (None: no answer)."""
        return self._map("answers", adapters, _checked_examples(examples, "examples"), progress)

    def _map(self, kind: str, adapters: Sequence[Mapping[str, torch.Tensor]], payload, progress: bool | None):
        if self._backend is None:
            raise RuntimeError("the FitnessPool is closed")
        if isinstance(adapters, Mapping) or not isinstance(adapters, Sequence):
            raise TypeError(f"adapters must be a list of adapter state dicts, got {type(adapters).__name__}")
        for index, adapter in enumerate(adapters):
            if not isinstance(adapter, Mapping) or not adapter:
                raise TypeError(f"adapters[{index}] must be a non-empty mapping of LoRA keys to tensors, "
                                f"got {type(adapter).__name__}")
            for key, tensor in adapter.items():
                if not isinstance(tensor, torch.Tensor):
                    raise TypeError(f"adapters[{index}][{key!r}] must be a torch.Tensor, got {type(tensor).__name__}")
        if not adapters:
            return []
        backend = self._backend
        if isinstance(backend, _RayBackend):
            payload = backend.put_payload(payload)
        results: list = [None] * len(adapters)
        pending = deque(range(len(adapters)))
        busy: dict[int, int] = {}  # worker -> index of the adapter it is scoring
        failure = None
        show = self.progress if progress is None else progress
        try:
            with tqdm(total=len(adapters), desc=kind, unit="adapter", leave=False, disable=not show) as bar:
                for worker in range(self.n_workers):
                    if pending:
                        busy[worker] = pending.popleft()
                        backend.submit(worker, busy[worker], kind, adapters[busy[worker]], payload)
                while busy:
                    worker, status, job_id, value = backend.next_result(busy)
                    if busy.pop(worker) != job_id:
                        raise RuntimeError(f"worker {worker} answered job {job_id}, which it was not given")
                    if status == "ok":
                        results[job_id] = value
                        bar.update()
                    elif failure is None:  # let the busy workers finish, so no stale answer reaches a later call
                        failure = (status, worker, job_id, value)
                        pending.clear()
                        if status == "died":
                            break
                    if pending and failure is None:
                        busy[worker] = pending.popleft()
                        backend.submit(worker, busy[worker], kind, adapters[busy[worker]], payload)
        except BaseException:
            # Interrupted (Ctrl-C) or broken with jobs still out: their answers would reach the next call.
            if busy:
                self.close()
            raise
        if failure is not None:
            status, worker, job_id, value = failure
            what = "fitness" if kind == "fitness" else "answers"
            error = _worker_error(value, f"{what} of individual {job_id} (of {len(adapters)})", job_id, worker,
                                  self.devices[worker])
            if status == "died":
                self.close()
            raise error
        return results

    # --- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every worker (idempotent). A Ray cluster the pool started is shut down."""
        if self._backend is not None:
            backend, self._backend = self._backend, None
            backend.close()

    def __enter__(self) -> FitnessPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _checked_examples(examples, label: str) -> list[AnswerExample]:
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence) or not examples:
        raise TypeError(f"{label} must be a non-empty list of AnswerExample")
    for example in examples:
        if not isinstance(example, AnswerExample):
            raise TypeError(f"{label} must hold AnswerExample records, got {type(example).__name__}")
    return list(examples)


# ---------------------------------------------------------------------------------------------
# Evolution's cache, batched through a pool.


class PoolFitnessCache(FitnessCache):
    """A FitnessCache whose :meth:`score` sends every adapter it has not seen to ``pool`` in one call.

    Scores, the cache's contents and its ``calls`` / ``hits`` counts are exactly those of the plain
    FitnessCache scoring the same individuals one at a time with the same evaluator (the first individual
    of a new content hash is a call, later ones with the same hash are hits).
    """

    def __init__(self, pool: FitnessPool, tasks: Mapping[str, Sequence[AnswerExample]], mode: str):
        if not isinstance(pool, FitnessPool):
            raise TypeError(f"pool must be a FitnessPool, got {type(pool).__name__}")
        if mode not in FITNESS_MODES:
            raise ValueError(f"mode must be one of {FITNESS_MODES}, got {mode!r}")
        if not isinstance(tasks, Mapping) or not tasks:
            raise TypeError("tasks must be a non-empty mapping of task name to examples")
        self.pool = pool
        self.tasks = dict(tasks)
        self.mode = mode
        super().__init__(self._score_one)

    def _score_one(self, individual: Individual) -> dict[str, float]:
        return self.pool.fitness([individual.adapter], self.tasks, self.mode)[0]

    def score(self, individuals, *, progress: bool = False) -> None:
        """Set the validation scores of every individual whose scores are missing or stale (one pool call)."""
        pending = [ind for ind in individuals if not ind.has_current_scores()]
        hashes = [ind.content_hash() for ind in pending]
        new: dict[str, Individual] = {}  # first individual of each unseen hash, in order
        for individual, content_hash in zip(pending, hashes):
            if content_hash not in self.scores_by_hash and content_hash not in new:
                new[content_hash] = individual
        scored = {}
        if new:
            results = self.pool.fitness([ind.adapter for ind in new.values()], self.tasks, self.mode,
                                        progress=progress)
            scored = {h: check_scores(scores, f"fitness of individual uid {new[h].uid}")
                      for h, scores in zip(new, results)}
        for individual, content_hash in zip(pending, hashes):
            if content_hash in self.scores_by_hash:
                self.hits += 1
            else:
                self.scores_by_hash[content_hash] = scored[content_hash]
                self.calls += 1
            individual.set_val_scores(self.scores_by_hash[content_hash], content_hash)
