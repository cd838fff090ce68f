"""Cost of federation: a Flower round vs the same local work back to back in one process.

* Simulation (Flower's simulation engine, Ray): per-round time from ``metrics.jsonl``
  (``round_seconds`` of the train phase, and the time between consecutive rounds, which also
  holds an evaluate phase where the config asks for one) for rounds after the first, vs
  ``train_round`` + ``validation_loss`` (what a train handler runs) of every site in turn in
  this process with 1 torch thread. Sites run
  one at a time (``client-resources-num-cpus=2`` on 2 cores) so both sides do the same work
  on the same core; the default (one CPU per site, two sites at once) is measured too.
  The fixed start-up/shutdown cost is the run's wall time minus its rounds.
* Deployment (a SuperLink and real ``flower-supernode`` processes on 127.0.0.1): time per
  round beyond the sites' own compute, plain (``--insecure``) and as in production (TLS with
  the certificates of ``fedsynth provision`` and SuperNode authentication with registered
  keys), for 1.1M- and 10M-parameter models. With each, what a fresh ``flwr-clientapp`` process
  costs: its imports (``clientapp_import``) and a train task's path up to training phase by phase
  (``fresh_train_task``, bench/fresh_task.py), with and without the site's epsilon cache.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from collections.abc import Iterator
from pathlib import Path

import torch

from bench.perf_common import TreeMemorySampler
from bench.perf_sites import PARAMS_10M, SMALL, TINY_32, Federation, fresh_site_copy, make_federation
from client.epsilon_cache import CACHE_FILE
from client.site_data import load_site_slices
from client.ledger import PrivacyLedger, reserve_within_budget
from client.policy import load_site_policy, privacy_ceiling
from client.training import plan_steps, split_patients, train_round, validation_loss
from common import keys
from common.model import build_unet, count_parameters, trainable_state
from server import kits
from server.local_federation import (SUPEREXEC_POLL_ENV, flower_env, flower_executable, free_port, local_superlink,
                                     local_supernode, run_status, save_run_log, stop_process_tree,
                                     stop_processes_with_env, submit_run, wait_for_port)
from server.provision import ProvisionRequest, provision
from server.remote_run import CONNECTION as REMOTE_CONNECTION, RemoteSuperLink
from server.simulation import PROJECT_ROOT, completed_rounds, follow_run


def _rows(fed: Federation) -> list[dict]:
    return [json.loads(line) for line in fed.cfg.federation.metrics_file.read_text().splitlines()]


def round_times(fed: Federation) -> dict:
    """Per round (after the first): train-phase seconds and wall seconds since the previous round."""
    train = sorted((r["round"], r["time"], r["round_seconds"]) for r in _rows(fed)
                   if r.get("phase") == "train" and r.get("kind") == "aggregate")
    return {"round_seconds": [s for rnd, _, s in train if rnd > 1],
            "round_wall_s": [t - prev for (_, prev, _), (_, t, _) in zip(train, train[1:])],
            "first_round_seconds": train[0][2] if train else float("nan"),
            "rounds": len(train)}


def in_process_round(fed: Federation, workdir: Path) -> dict[str, list[float]]:
    """Each site's round of work in this process, 1 thread, from the initial weights: per site the
    wall and CPU seconds of ``train_round`` and of ``validation_loss`` (the evaluate phase)."""
    torch.set_num_threads(1)
    torch.manual_seed(fed.cfg.training.seed)
    weights = trainable_state(build_unet(fed.cfg.model))
    out: dict[str, list[float]] = {"train_s": [], "train_cpu_s": [], "eval_s": [], "eval_cpu_s": []}
    for path in fed.site_paths:
        site = fresh_site_copy(path, workdir / f"inproc-{time.monotonic_ns()}")
        slices = load_site_slices(site.data_dir, fed.cfg.model.classes, fed.cfg.data)  # a site caches them across rounds
        # As in rounds after the first, the ledger already holds a round: the budget check then
        # composes two histories (spent, spent + planned) instead of one.
        train_patients = len(split_patients(slices, site.val_fraction)[0])
        PrivacyLedger.open(site.state_dir, fed.cfg.privacy.accountant).reserve(plan_steps(fed.cfg, train_patients))
        wall, cpu = time.perf_counter(), time.process_time()
        result = train_round(fed.cfg, site, slices, weights, server_round=2)
        out["train_s"].append(time.perf_counter() - wall)
        out["train_cpu_s"].append(time.process_time() - cpu)
        wall, cpu = time.perf_counter(), time.process_time()
        validation_loss(fed.cfg, slices, result.arrays, site.val_fraction)
        out["eval_s"].append(time.perf_counter() - wall)
        out["eval_cpu_s"].append(time.process_time() - cpu)
    return out


def simulate(fed: Federation, workdir: Path, cpus_per_site: int, timeout_s: float = 900.0,
             sampler: TreeMemorySampler | None = None) -> float:
    """server.simulation.run_simulation with a chosen ``client-resources-num-cpus``; returns wall seconds."""
    run_config = {keys.RUN_CONFIG_PATH: str(fed.config_path.resolve()),
                  keys.RUN_SIM_SITES: ",".join(str(p.resolve()) for p in fed.site_paths)}
    start = time.perf_counter()
    with sampler or nullcontext(), local_superlink(workdir / "flower") as link:
        run_id = submit_run(link, PROJECT_ROOT, run_config, num_supernodes=len(fed.site_paths), cpus_per_site=cpus_per_site)
        status = follow_run(run_id, lambda: str(run_status(link, run_id).get("status", "")), fed.cfg, timeout_s, False)
        save_run_log(link, run_id, workdir / "run.log")
    if status != "finished:completed":
        raise RuntimeError(f"simulation ended as {status}; see {workdir / 'run.log'}")
    return time.perf_counter() - start


def simulation_overhead(root: Path, rounds: int, local_steps: int, parallel_too: bool) -> dict:
    training = {"local_steps": local_steps, "batch_size": 8}
    fed = make_federation(root / "seq", 3, model=TINY_32, image_size=32, training=training,
                          federation={"num_rounds": rounds}, patients_per_class=16)
    baseline = root / "baseline"
    before = in_process_round(fed, baseline)
    tree = TreeMemorySampler(period_s=0.25, flwr_home=root / "seq" / "work" / "flower" / "flwr-home")
    wall = simulate(fed, root / "seq" / "work", cpus_per_site=2, sampler=tree)
    after = in_process_round(fed, baseline)  # before and after: follows the machine's load over the run
    times = round_times(fed)

    def mean_sum(key: str) -> float:
        return (sum(before[key]) + sum(after[key])) / 2

    train_only = mean_sum("train_s")
    # A train reply carries the validation loss of the trained model: the site's work in the train phase
    with_eval = train_only + mean_sum("eval_s")
    baseline_cpu = mean_sum("train_cpu_s") + mean_sum("eval_cpu_s")
    per_round = statistics.median(times["round_seconds"])
    per_round_wall = statistics.median(times["round_wall_s"])
    # CPU seconds of the whole process tree (SuperLink, ServerApp, Ray, the sites) per train phase:
    # unlike wall time, not inflated when other people's jobs take the cores.
    ends = [r["time"] for r in _rows(fed) if r.get("phase") == "train" and r.get("kind") == "aggregate" and r["round"] > 1]
    tree_cpu = [tree.cpu_at(end) - tree.cpu_at(end - secs) for end, secs in zip(sorted(ends), times["round_seconds"])]
    out = {
        "sites": 3, "rounds": rounds, "local_steps": local_steps, "params": count_parameters(build_unet(fed.cfg.model)),
        "in_process_train_s": train_only, "in_process_train_eval_s": with_eval,
        "sim_round_seconds": times["round_seconds"], "sim_round_wall_s": times["round_wall_s"],
        "sim_first_round_s": times["first_round_seconds"], "sim_total_s": wall,
        "startup_shutdown_s": wall - times["first_round_seconds"] - sum(times["round_wall_s"]),
        "overhead_ratio": per_round / with_eval,
        "overhead_ratio_with_evaluate": per_round_wall / with_eval,
        "in_process_train_cpu_s": baseline_cpu, "sim_round_tree_cpu_s": tree_cpu,
        "overhead_ratio_cpu": statistics.median(tree_cpu) / baseline_cpu if tree_cpu else float("nan"),
        "in_process_train_s_before_after": [sum(before["train_s"]), sum(after["train_s"])],
        "state_dirs": [str(path.parent / "state") for path in fed.site_paths],
    }
    if parallel_too:
        par = make_federation(root / "par", 3, model=TINY_32, image_size=32, training=training,
                              federation={"num_rounds": rounds}, patients_per_class=16)
        out["parallel_total_s"] = simulate(par, root / "par" / "work", cpus_per_site=1)
        par_times = round_times(par)
        out["parallel_round_seconds"] = par_times["round_seconds"]
        out["parallel_ratio"] = statistics.median(par_times["round_seconds"]) / with_eval
    return out


# Each status query starts the flwr CLI (about a CPU-second): rarely, so that it does not take
# the cores from the sites being measured. Round times come from metrics.jsonl, not from it.
STATUS_POLL_S = 10.0


@contextmanager
def _secure_superlink(root: Path, layout: kits.Layout, sites: list[str]) -> Iterator[RemoteSuperLink]:
    """A SuperLink as ``start-superlink.sh`` starts it (TLS, only registered SuperNodes), the sites' keys registered."""
    flwr_home = root / "flwr-home"
    port = free_port()
    server = layout.server_dir
    cmd = [flower_executable("flower-superlink"), "--ssl-ca-certfile", str(server / kits.CA_CERT),
           "--ssl-certfile", str(server / kits.SERVER_CERT),
           "--ssl-keyfile", str(server / kits.SERVER_KEY), "--enable-supernode-auth", "--isolation", "subprocess",
           "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "superlink.log", "ab") as handle:
        proc = subprocess.Popen(cmd, cwd=root, env={**flower_env(flwr_home), **SUPEREXEC_POLL_ENV}, stdout=handle,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(proc, f"127.0.0.1:{port}", 60.0, root / "superlink.log")
        link = RemoteSuperLink(f"127.0.0.1:{port}", server / kits.CA_CERT, flwr_home)
        for site in sites:
            reg = link.flwr("supernode", "register", str(layout.registered_key(site)), REMOTE_CONNECTION, "--name", site)
            if reg.returncode != 0:
                raise RuntimeError(f"registering {site} failed: {reg.stdout}{reg.stderr}")
        yield link
    finally:
        sessions = stop_process_tree(proc)
        stop_processes_with_env("FLWR_HOME", str(flwr_home), sessions=sessions)


def deployment_overhead(root: Path, rounds: int, model: dict, secure: bool = False, timeout_s: float = 900.0) -> dict:
    """Real SuperLink + 2 SuperNodes on loopback; 1 local step of batch 4 at 16 px, so transfer dominates.

    ``secure``: TLS and SuperNode authentication, with the kits of ``fedsynth provision``.
    """
    fed = make_federation(root, 2, model=model, image_size=16, training={"local_steps": 1, "batch_size": 4},
                          federation={"num_rounds": rounds}, patients_per_class=8)
    start = time.perf_counter()
    if secure:
        names = [path.parent.name for path in fed.site_paths]
        layout = provision(ProvisionRequest(out=root / "kits", sites=tuple(names), server_host="127.0.0.1")).layout
        with _secure_superlink(root / "flower", layout, names) as remote, ExitStack() as nodes:
            for path in fed.site_paths:
                auth = (layout.ca_cert, layout.site_key(path.parent.name))
                nodes.enter_context(local_supernode(remote.address, path, root / f"{path.parent.name}.log", auth))
            run_id = remote.submit(PROJECT_ROOT, {keys.RUN_CONFIG_PATH: str(fed.config_path)})
            status = follow_run(run_id, lambda: remote.status(run_id), fed.cfg, timeout_s, False, poll_s=STATUS_POLL_S)
    else:
        with local_superlink(root / "flower", simulation=False) as link, ExitStack() as nodes:
            for path in fed.site_paths:
                nodes.enter_context(local_supernode(link.address, path, root / f"{path.parent.name}.log"))
            run_id = submit_run(link, PROJECT_ROOT, {keys.RUN_CONFIG_PATH: str(fed.config_path)}, num_supernodes=None)
            status = follow_run(run_id, lambda: str(run_status(link, run_id).get("status", "")), fed.cfg, timeout_s, False,
                                poll_s=STATUS_POLL_S)
            save_run_log(link, run_id, root / "run.log")
    if status != "finished:completed":
        raise RuntimeError(f"deployment run ended as {status} after {completed_rounds(fed.cfg.federation.metrics_file)} rounds")
    wall = time.perf_counter() - start
    times = round_times(fed)
    work = in_process_round(fed, root / "baseline")
    site_compute = max(t + e for t, e in zip(work["train_s"], work["eval_s"]))
    per_round = statistics.median(times["round_wall_s"])
    return {"sites": 2, "rounds": rounds, "params": count_parameters(build_unet(fed.cfg.model)), "tls_node_auth": secure,
            "evaluate_every": fed.cfg.federation.evaluate_every,
            "round_wall_s": times["round_wall_s"], "round_seconds": times["round_seconds"],
            "site_compute_s": site_compute, "beyond_training_s": per_round - site_compute, "total_s": wall,
            "timeline": timeline(fed), "clientapp_import": clientapp_import_seconds(),
            "fresh_train_task": fresh_train_task_seconds(fed, root / "baseline")}


def timeline(fed: Federation) -> dict:
    """Where a deployment round goes, from the server's metrics and the sites' audit logs (handler start times).

    ``dispatch_to_handler_s``: from the server finishing the previous phase to a site's handler
    starting (SuperNode poll, a fresh ``flwr-clientapp`` process, its imports, the download);
    ``handler_to_aggregate_s``: from the later site's handler start to the server's aggregate
    (the site's compute, the upload, the ServerApp's poll, checks, FedAvg, checkpoint).
    """
    server = sorted((r["time"], r["phase"], r["round"]) for r in _rows(fed) if r.get("kind") == "aggregate")
    starts: dict[tuple[str, int], list[float]] = {}
    for path in fed.site_paths:
        for row in map(json.loads, (path.parent / "state" / "audit.jsonl").read_text().splitlines()):
            starts.setdefault((row["message_type"], row["server_round"]), []).append(row["time"])
    dispatch, handle = {"train": [], "evaluate": []}, {"train": [], "evaluate": []}
    for (t_prev, _, _), (t_done, phase, rnd) in zip(server, server[1:]):
        if (phase, rnd) in starts and rnd > 1:
            dispatch[phase].append(min(starts[(phase, rnd)]) - t_prev)
            handle[phase].append(t_done - max(starts[(phase, rnd)]))
    return {f"{kind}_{phase}_s": statistics.median(v) if v else float("nan")
            for kind, d in (("dispatch_to_handler", dispatch), ("handler_to_aggregate", handle)) for phase, v in d.items()}


def _fresh_import(statement: str) -> dict:
    start = time.perf_counter()
    before = os.times()
    subprocess.run([sys.executable, "-c", statement], cwd=PROJECT_ROOT, check=True)
    after = os.times()
    return {"wall_s": time.perf_counter() - start,
            "cpu_s": (after.children_user - before.children_user) + (after.children_system - before.children_system)}


def clientapp_import_seconds() -> dict:
    """What every message costs a real SuperNode in imports: a fresh process loading the ClientApp module
    (before any handler runs), and what a train task then imports (torch, MONAI, Opacus: in the handler)."""
    return {**_fresh_import("import client.client_app"),
            "train_task": _fresh_import("import client.client_app, client.site_data, client.training, opacus"),
            "evaluate_task": _fresh_import("import client.client_app, client.site_data, client.training")}


def fresh_train_task_seconds(fed: Federation, workdir: Path, repeats: int = 1) -> dict:
    """A train task's path up to training (bench/fresh_task.py) in fresh processes, as in round 2 of a deployment.

    The site's ledger holds round 1. ``warm``: the epsilon cache as round 1's process left it (its
    "after" stored), as a deployed site has it; ``cold``: no cache file, as before the cache (both
    epsilons composed). Per phase the median CPU seconds of the task's process; ``process_cpu_s``
    is the whole process (interpreter start included), from the OS.
    """
    root = workdir / f"fresh-task-{time.monotonic_ns()}"
    site = fresh_site_copy(fed.site_paths[0], root)
    site_yaml = root / site.site_id / "site.yaml"
    slices = load_site_slices(site.data_dir, fed.cfg.model.classes, fed.cfg.data)
    planned = plan_steps(fed.cfg, len(split_patients(slices, site.val_fraction)[0]))
    policy = load_site_policy(site.policy_file) if site.policy_file else None
    reserve_within_budget(site.state_dir, fed.cfg.privacy.accountant, privacy_ceiling(site, policy, fed.cfg), planned,
                          private=True, server_round=1)
    cache = Path(site.state_dir) / CACHE_FILE
    round_one = cache.read_bytes()
    runs: dict[str, list[dict]] = {"cold": [], "warm": []}
    for _ in range(repeats):
        for mode in runs:  # alternated: both follow the machine's load alike
            if mode == "warm":
                cache.write_bytes(round_one)
            else:
                cache.unlink(missing_ok=True)
            before = os.times()
            proc = subprocess.run([sys.executable, "-m", "bench.fresh_task", str(fed.config_path), str(site_yaml)],
                                  cwd=PROJECT_ROOT, check=True, capture_output=True, text=True)
            after = os.times()
            phases = {name: phase["cpu_s"] for name, phase in json.loads(proc.stdout.splitlines()[-1]).items()}
            phases["process_cpu_s"] = (after.children_user - before.children_user) + (after.children_system - before.children_system)
            runs[mode].append(phases)
    return {mode: {name: statistics.median(r[name] for r in rows) for name in rows[0]} for mode, rows in runs.items()}


def run(quick: bool, workdir: Path) -> dict:
    sim = simulation_overhead(workdir / "simulation", rounds=3 if quick else 6, local_steps=10, parallel_too=not quick)
    if not quick:  # the overhead is per message: more local work per round dilutes it
        sim["longer_rounds"] = simulation_overhead(workdir / "simulation-40", rounds=4, local_steps=40, parallel_too=False)
        sim["longer_rounds"].pop("state_dirs")
    rounds = 3 if quick else 5
    deploy = deployment_overhead(workdir / "deployment", rounds=rounds, model=SMALL)
    secure = deployment_overhead(workdir / "deployment-10m-tls", rounds=rounds, model=PARAMS_10M, secure=True)
    return {"simulation": sim, "deployment": deploy, "deployment_10m_tls_auth": secure,
            "federation_overhead_ratio": sim["overhead_ratio"], "federation_overhead_ratio_cpu": sim["overhead_ratio_cpu"],
            "deployment_beyond_training_s": deploy["beyond_training_s"],
            "deployment_beyond_training_s_10m_tls_auth": secure["beyond_training_s"]}
