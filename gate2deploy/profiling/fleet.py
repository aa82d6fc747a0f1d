"""Fleet profiling: the measurements of a profile run on the nodes of a Ray cluster, one LUT
per device class (`gate2deploy profile ... --ray ADDRESS [--device-class NAME]`).

Device classes. A node offers a class by a Ray custom resource `device:<class>` with capacity
1 (`ray start --address HEAD --resources '{"device:epyc-avx512": 1}'`). Every measurement job
asks for one unit of its class' resource and no CPU, so Ray places it only on nodes of that
class and runs at most one measurement at a time per node: a job never shares its node with
another measurement. A node offering more than one unit would run several at once; that is
warned about. Without --device-class every class the cluster offers is profiled.

Jobs. The driver (the machine running `gate2deploy profile`) builds the layer table and the
calibration models ("compile on any node": here, the driver); the jobs only time: one job
per LUT entry (a one-layer model built on the node from its key) and one per calibration
model (timed three times in the job, the fastest kept: the local profile's twice-before,
once-after spread, kept within one job). A first job per class reports the node's machine
and runtime, which the LUT records (device identity, profiling/device.py) and `--resume`
checks. Entries of one class measured on several nodes of it merge into one LUT; the nodes
and how many entries each measured are listed under the LUT's "fleet" key, and nodes of one
class that are not the same device (CPU model, ISA tiers, GPU) are warned about and listed.

Outputs. `-o OUT` gets one folder per class, OUT/<class>/, each holding what a local profile
writes (lut.json, Gator's files, report) and, while running, its lut.partial.json.

Failures. A node lost mid-run: Ray re-runs its unfinished job (on another node of the class,
or on the node when it rejoins); finished entries are kept (they are saved to the partial
file every few seconds and whenever the run stops). When no live node offers a class for
NODE_GRACE_S seconds, the run stops with one line and `--resume` continues it later. An
unreachable address, a class no node offers, Ray not installed: one line, exit 2, nothing
written (all checked before any file is made).
"""
from __future__ import annotations

import re
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import UserError, first_line
from ..fileio import write_text
from .lut import dumps, new_lut, parse_key
from .measure import Settings, machine_info, make_backend

RESOURCE_PREFIX = "device:"
CLASS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # also a folder name under -o
CONNECT_TIMEOUT_S = 5.0
POLL_S = 1.0
NODE_GRACE_S = 30.0  # how long a class may have no live node before the run stops
SYSTEM_RETRIES = 3  # resubmissions of a job whose node or worker died (beyond Ray's own retries)
WHOLE_REPEATS = 3


def _after_result(device_class: str, job: tuple) -> None:
    """Called after every finished job (a seam for the tests that kill a node mid-run)."""


class Fleet:
    def __init__(self, ray, address: str, classes: list[str], target: str):
        self.ray, self.address, self.classes, self.target = ray, address, classes, target

    # -----------------------------------------------------------------------------------
    # Connecting
    # -----------------------------------------------------------------------------------
    @classmethod
    def connect(cls, address: str, asked, target: str) -> "Fleet":
        try:
            import ray
        except ImportError:
            raise UserError("--ray needs Ray on this machine: pip install 'gate2deploy[ray]'") from None
        wanted = _class_list(asked)
        _probe(address)
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False, ignore_reinit_error=True)
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError...
            first = first_line(exc)
            raise UserError(f"--ray {address}: cannot connect to a Ray cluster there ({first})") from None
        fleet = cls(ray, address, [], target)
        try:
            offered = fleet.offered()
            if not offered:
                raise UserError(f"--ray {address}: no node offers a device class; start each node with "
                                f"--resources '{{\"{RESOURCE_PREFIX}<class>\": 1}}'")
            for name in wanted:
                if name not in offered:
                    raise UserError(f"--device-class {name}: no node of the cluster at {address} offers resource "
                                    f"{RESOURCE_PREFIX}{name} (offered: {', '.join(sorted(offered))})")
            fleet.classes = wanted or sorted(offered)
            for name in fleet.classes:
                if not CLASS_NAME.match(name):
                    raise UserError(f"device class {name!r}: use letters, digits, '.', '_' and '-' only "
                                    "(it names the class' output folder)")
                shared = [n for n, units in offered[name].items() if units != 1]
                if shared:
                    print(f"warning: {len(shared)} node(s) offer {units_text(offered[name], shared)} of "
                          f"{RESOURCE_PREFIX}{name}; measurements share those nodes and may disturb each other "
                          "(give each node 1)", file=sys.stderr)
        except BaseException:
            fleet.close()
            raise
        return fleet

    def offered(self) -> dict[str, dict[str, float]]:
        """Device class -> {node id: units} over the live nodes."""
        out: dict[str, dict[str, float]] = {}
        for node in self.ray.nodes():
            if not node.get("Alive"):
                continue
            for res, units in node.get("Resources", {}).items():
                if res.startswith(RESOURCE_PREFIX) and units > 0:
                    out.setdefault(res[len(RESOURCE_PREFIX):], {})[node["NodeID"]] = units
        return out

    def close(self) -> None:
        self.ray.shutdown()

    # -----------------------------------------------------------------------------------
    # Measuring
    # -----------------------------------------------------------------------------------
    def measure(self, plan, out: Path, options, model_info: dict) -> dict[str, dict]:
        """Every class' LUT with its entries and whole-model timings complete (ready for
        runner.finish); partial files are kept under out/<class>/ until then."""
        from .runner import PARTIAL, _progress, _resume

        ray = self.ray
        settings = asdict(options.settings)
        whole_settings = asdict(plan.whole_settings)
        job_fn = ray.remote(_job)

        def submit(device_class: str, job: tuple):
            kind, name = job
            payload = name if kind != "whole" else model_refs[name]
            return job_fn.options(resources={RESOURCE_PREFIX + device_class: 1}, num_cpus=0,
                                  max_retries=SYSTEM_RETRIES).remote(
                kind, options.target, options.threads, whole_settings if kind == "whole" else settings, payload)

        # who measures: one identify job per class (machine and runtime for the LUT and --resume)
        first = self._collect({submit(c, ("identify", "")): (c, ("identify", "")) for c in self.classes}, submit,
                              lambda c, job, result: None, lambda: None)
        luts: dict[str, dict] = {}
        resumed: dict[str, int] = {}
        out.mkdir(exist_ok=True)
        for c in self.classes:
            lut = new_lut(options.target, first[c]["machine"], first[c]["runtime"], options.threads, plan.table,
                          plan.settings, model_info)
            lut["fleet"] = {"address": self.address, "device_class": c, "resource": RESOURCE_PREFIX + c, "nodes": {}}
            (out / c).mkdir(exist_ok=True)
            resumed[c] = _resume(out / c / PARTIAL, lut) if options.resume else 0
            luts[c] = lut

        model_refs = {name: ray.put(m.SerializeToString()) for name, m in plan.calibration_models.items()
                      if m is not None}
        pending = {}
        for c, lut in luts.items():
            for name in model_refs:
                if name not in lut.get("whole_models", {}):
                    pending[submit(c, ("whole", name))] = (c, ("whole", name))
            for key in plan.keys:
                if key not in lut["entries"]:
                    pending[submit(c, ("layer", key))] = (c, ("layer", key))
        progress = _progress(list(range(len(pending))), options.progress, "jobs")
        bar = progress if hasattr(progress, "update") else None
        last_save = [time.perf_counter()]

        def save_all() -> None:
            for c, lut in luts.items():
                write_text(out / c / PARTIAL, dumps(lut))
            last_save[0] = time.perf_counter()

        def record(c: str, job: tuple, result: dict) -> None:
            lut = luts[c]
            kind, name = job
            if kind == "layer":
                lut["entries"][name] = result["entry"]
            else:
                lut.setdefault("whole_models", {})[name] = result["whole"]
            _note_node(lut, result)
            if bar is not None:
                bar.update(1)
            _after_result(c, job)
            if time.perf_counter() - last_save[0] > _save_every():
                save_all()

        try:
            self._collect(pending, submit, record, save_all)
        except BaseException:
            save_all()
            raise
        finally:
            if bar is not None:
                bar.close()
            self.close()
        save_all()
        for c, lut in luts.items():
            lut["whole_models_after"] = True
            lut["fleet"]["resumed_entries"] = resumed[c]
        return luts

    def _collect(self, pending: dict, submit, record, save_all) -> dict:
        """Wait for every job in `pending` (ref -> (class, job)), resubmitting those whose node
        died; record(class, job, result) each. Returns {class: last result}."""
        ray = self.ray
        last: dict[str, dict] = {}
        lost_since: dict[str, float] = {}
        failures: dict[tuple, int] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            for ref in ready:
                c, job = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # the job itself raised
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, UserError):  # keeps its kind (TensorRT missing there: exit 3)
                        raise type(cause)(f"device class {c}: {cause}") from None
                    raise
                except ray.exceptions.RayError as exc:  # its node or worker died: run it again
                    failures[(c, job)] = failures.get((c, job), 0) + 1
                    if failures[(c, job)] > SYSTEM_RETRIES:
                        first = first_line(exc)
                        raise UserError(f"device class {c}: job {job[1] or job[0]} failed {SYSTEM_RETRIES + 1} "
                                        f"times ({first}); rerun with --resume") from None
                    pending[submit(c, job)] = (c, job)
                    continue
                last[c] = result
                record(c, job, result)
            if not ready and pending:
                self._check_alive({c for c, _ in pending.values()}, lost_since, save_all)
        return last

    def _check_alive(self, classes: set[str], lost_since: dict[str, float], save_all) -> None:
        offered = self.offered()
        now = time.monotonic()
        for c in classes:
            if c in offered:
                lost_since.pop(c, None)
                continue
            since = lost_since.setdefault(c, now)
            if now - since > NODE_GRACE_S:
                save_all()
                raise UserError(f"device class {c}: no live node offers {RESOURCE_PREFIX}{c} for "
                                f"{NODE_GRACE_S:.0f} s; finished entries are kept, rerun with --resume once one "
                                "has joined")


    # -----------------------------------------------------------------------------------
    # Sweeps: several compiled models timed together on one class
    # -----------------------------------------------------------------------------------
    def one_class(self, flag: str) -> str:
        """The single class a sweep measures on: the one asked for, or the cluster's only one."""
        if len(self.classes) != 1:
            self.close()
            raise UserError(f"{flag} --ray: name the one device class to measure on with --device-class "
                            f"(offered: {', '.join(self.classes)})")
        return self.classes[0]

    def time_models(self, models: dict, input_shape, runs: int) -> tuple[dict, dict, dict]:
        """(median, minimum, machine) of ONNX `models` timed in one job on a node of the class
        (benchmark.latencies_ms: alternating blocks, so the points are compared in one run)."""
        ray = self.ray
        device_class = self.one_class("sweep")
        blobs = {name: m.SerializeToString() for name, m in models.items()}
        job = ray.remote(_sweep_job).options(resources={RESOURCE_PREFIX + device_class: 1}, num_cpus=0,
                                             max_retries=SYSTEM_RETRIES)
        pending = {job.remote(blobs, list(input_shape), runs): (device_class, ("sweep", ""))}
        try:
            result = self._collect(pending, lambda c, j: job.remote(blobs, list(input_shape), runs),
                                   lambda c, j, r: None, lambda: None)[device_class]
        finally:
            self.close()
        machine = {**result["machine"], "node": result["node"], "device_class": device_class}
        return result["median"], result["minimum"], machine


def _save_every() -> float:
    from .runner import SAVE_EVERY_S

    return SAVE_EVERY_S


def _note_node(lut: dict, result: dict) -> None:
    nodes = lut["fleet"]["nodes"]
    node = nodes.setdefault(result["node"], {"hostname": result["machine"].get("hostname"), "jobs": 0})
    node["jobs"] += 1
    mine = {k: lut["machine"].get(k) for k in ("cpu", "isa", "gpu")}
    theirs = {k: result["machine"].get(k) for k in ("cpu", "isa", "gpu")}
    if mine != theirs and result["node"] not in lut["fleet"].setdefault("other_devices", {}):
        lut["fleet"]["other_devices"][result["node"]] = theirs
        print(f"warning: device class {lut['fleet']['device_class']}: node {result['node'][:8]} is another device "
              f"({theirs}) than the class' first node ({mine}); its entries are merged", file=sys.stderr)


def units_text(units: dict[str, float], nodes: list[str]) -> str:
    return ", ".join(f"{units[n]:g}" for n in nodes[:3]) + " units"


def _class_list(asked) -> list[str]:
    if not asked:
        return []
    names = [n.strip() for item in ([asked] if isinstance(asked, str) else asked) for n in str(item).split(",")]
    names = [n[len(RESOURCE_PREFIX):] if n.startswith(RESOURCE_PREFIX) else n for n in names if n]
    return list(dict.fromkeys(names))


def _probe(address: str) -> None:
    """A TCP connection to the head first: Ray's own connect retries for a minute or more."""
    if address in ("auto", "local"):
        return
    hostport = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UserError(f"--ray {address}: give the head's HOST:PORT (e.g. 10.0.0.5:6379), ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise UserError(f"--ray {address}: cannot reach a Ray head there ({exc.strerror or exc})") from None


# ---------------------------------------------------------------------------------------
# On the worker node
# ---------------------------------------------------------------------------------------
def _sweep_job(blobs: dict, input_shape: list, runs: int) -> dict:
    import onnx
    import ray

    from ..benchmark import latencies_ms

    median, minimum = latencies_ms({n: onnx.load_from_string(b) for n, b in blobs.items()}, tuple(input_shape), runs)
    return {"node": ray.get_runtime_context().get_node_id(), "machine": machine_info(), "median": median,
            "minimum": minimum}


_BACKENDS: dict = {}


def _job(kind: str, target: str, threads: int, settings: dict, payload):
    """One measurement on this node: ("identify", ""), ("layer", LUT key) or ("whole", ONNX
    bytes). Returns the node id, its machine, and the entry / timing."""
    import ray

    key = (target, threads, tuple(sorted(settings.items())))
    if key not in _BACKENDS:
        _BACKENDS[key] = make_backend(target, threads, Settings(**settings))
    backend = _BACKENDS[key]
    out = {"node": ray.get_runtime_context().get_node_id(), "machine": machine_info()}
    if kind == "identify":
        out["runtime"] = backend.runtime_info()
    elif kind == "layer":
        measurement, kernel = backend.measure_layer(parse_key(payload))
        out["entry"] = {**measurement.to_json(), "kernel": kernel}
    else:
        import onnx

        model = onnx.load_from_string(payload)
        best = min((backend.measure_whole(model).to_json() for _ in range(WHOLE_REPEATS)), key=lambda m: m["ms"])
        out["whole"] = best
    return out
