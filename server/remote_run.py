"""Submit a federation to a deployed SuperLink over TLS, follow it, fail loudly when it fails.

``fedsynth run`` is the deployed counterpart of ``fedsynth simulate``: the same app, the
same progress bar, but the SuperLink and the hospitals' SuperNodes are already running
(see deploy/). The ``flwr`` CLI gets a private ``FLWR_HOME`` holding a single connection
(address and CA), so the coordinator's own ``~/.flwr`` is neither read nor changed.

``flwr run`` returns as soon as the run is submitted, and even ``--stream`` exits 0 when
a run fails, so the outcome is read from ``flwr list --run-id``. Asking that every few
seconds would start the CLI (a second of CPU) each time; instead ``flwr log --stream``
writes the run's log to a file as it happens and ends when the run ends, and the status
is asked when it does (and every 30 s in case the stream is lost). Rounds are counted from
``metrics.jsonl``, which the ServerApp writes on the SuperLink host: the bar moves only
where ``federation.output_dir`` is readable (on that host, or a shared folder); elsewhere
only the run's status is shown.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from common import keys
from common.checkpoint import check_output_dir
from common.config import load_federation_config
from common.errors import ConfigError, FederationError
from server.local_federation import flower_env, stop_process_tree
from server.simulation import app_dir, completed_rounds, follow_run, last_error

CONNECTION = "fedsynth"
STATUS_EVERY_S = 30.0
LOST_STREAM_ASK_S = 5.0
UNREACHABLE_S = 300.0
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


@dataclass(frozen=True)
class RemoteRunRequest:
    superlink: str
    ca: Path
    config: Path
    server_config: str = ""
    """The federation YAML's path as the ServerApp on the SuperLink host reads it; default: ``config``'s."""
    app: Path | None = None
    log_file: Path | None = None
    timeout_s: float = 7 * 24 * 3600.0
    progress: bool = True


@dataclass(frozen=True)
class RemoteRunResult:
    run_id: int
    status: str
    seconds: float
    rounds_completed: int
    log_file: Path


class RemoteSuperLink:
    """The ``flwr`` CLI pointed at one deployed SuperLink through a private ``FLWR_HOME``."""

    def __init__(self, address: str, ca: Path, flwr_home: Path) -> None:
        self.address = address
        self.flwr_home = flwr_home
        flwr_home.mkdir(parents=True, exist_ok=True)
        # json.dumps gives a valid TOML basic string for any path, quotes and backslashes included
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f"address = {json.dumps(address)}\nroot-certificates = {json.dumps(str(ca.resolve()))}\n"
        )

    def flwr(self, *args: str, timeout_s: float = 120.0, cwd: Path | None = None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(["flwr", *args], env=flower_env(self.flwr_home), capture_output=True, text=True,
                                  timeout=timeout_s, cwd=cwd)
        except subprocess.TimeoutExpired:
            raise FederationError(f"flwr {args[0]} got no answer from the SuperLink at {self.address} "
                                  f"within {timeout_s:.0f} s") from None

    def _json(self, proc: subprocess.CompletedProcess, what: str) -> dict:
        """The CLI's JSON answer; with ``--format json`` flwr exits 0 on failure too, so ``success`` decides."""
        try:
            payload = json.loads(proc.stdout[proc.stdout.index("{"):])
        except (ValueError, TypeError):
            raise FederationError(f"{what} failed at {self.address} (exit {proc.returncode}):\n"
                                  f"{proc.stdout.strip()}\n{proc.stderr.strip()}") from None
        if not isinstance(payload, dict) or payload.get("success") is False:
            message = payload.get("error-message", payload) if isinstance(payload, dict) else payload
            raise FederationError(f"{what} failed at {self.address}: {message}")
        return payload

    def submit(self, app: Path, run_config: dict[str, str]) -> int:
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        proc = self.flwr("run", str(app), CONNECTION, "--run-config", overrides, "--format", "json",
                         timeout_s=300.0, cwd=app)
        return int(self._json(proc, "flwr run")["run-id"])

    def status(self, run_id: int) -> str:
        proc = self.flwr("list", CONNECTION, "--run-id", str(run_id), "--format", "json")
        runs = self._json(proc, "flwr list").get("runs") or [{}]
        return str(runs[0].get("status", ""))

    def stream_log(self, run_id: int, log_file: Path) -> subprocess.Popen:
        """``flwr log --stream`` into ``log_file``; the SuperLink ends the stream when the run finishes."""
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as handle:
            return subprocess.Popen(["flwr", "log", str(run_id), CONNECTION, "--stream"], env=flower_env(self.flwr_home),
                                    stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)

    def stop(self, run_id: int) -> subprocess.CompletedProcess:
        return self.flwr("stop", str(run_id), CONNECTION)


class RunWatch:
    """A run's status, asked of the SuperLink when its log stream ends, else every ``STATUS_EVERY_S``."""

    def __init__(self, link: RemoteSuperLink, run_id: int, log_file: Path) -> None:
        self.link, self.run_id, self.log_file = link, run_id, log_file
        self.stream = link.stream_log(run_id, log_file)
        self.streamed_at = time.monotonic()
        self.last_status, self.asked_at, self.stream_ended = "", -float("inf"), False
        self.unreachable_since: float | None = None

    def status(self) -> str:
        if not self.stream_ended and self.stream.poll() is not None:
            self.stream_ended, self.asked_at = True, -float("inf")  # most likely the run ended: ask now
        now = time.monotonic()
        if now - self.asked_at < (LOST_STREAM_ASK_S if self.stream_ended else STATUS_EVERY_S):
            return self.last_status
        try:
            self.last_status, self.asked_at, self.unreachable_since = self.link.status(self.run_id), now, None
        except FederationError:
            # a network hiccup must not end hours of following; a SuperLink gone for minutes does
            self.asked_at = now
            self.unreachable_since = self.unreachable_since or now
            if now - self.unreachable_since > UNREACHABLE_S:
                raise
            return self.last_status
        if self.stream_ended and not self.last_status.startswith("finished") and now - self.streamed_at >= STATUS_EVERY_S:
            # the connection dropped mid-run: stream again (the log file then repeats from the top)
            self.stream, self.streamed_at, self.stream_ended = self.link.stream_log(self.run_id, self.log_file), now, False
        return self.last_status

    def close(self) -> None:
        stop_process_tree(self.stream, grace_s=5.0)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """``kill`` ends ``fedsynth run`` as Ctrl-C does: without it the log stream would outlive us."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(link: RemoteSuperLink, run_id: int) -> str:
    """Stop a run we no longer follow: it would otherwise go on with no one able to reach it."""
    try:
        stopped = link.stop(run_id).returncode == 0
    except FederationError:
        stopped = False
    return f"run {run_id} was stopped on the SuperLink" if stopped else f"stop run {run_id} on the SuperLink yourself (flwr stop)"


def check_address(address: str) -> str:
    match = _ADDRESS.match(address)
    if not match or not 1 <= int(match.group(2)) <= 65535:
        raise ConfigError(f"--superlink: expected HOST:PORT (no https://), e.g. superlink.example.org:9093, got {address!r}")
    return address


def check_ca(path: Path) -> Path:
    try:
        x509.load_pem_x509_certificates(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"--ca {path}: file not found (use ca.pem from the server kit)") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"--ca {path}: not a PEM certificate ({err}); use ca.pem from the server kit") from None
    return path


def run_remote(req: RemoteRunRequest) -> RemoteRunResult:
    """Submit ``req.config`` to the SuperLink and wait for the run; raises unless it completes."""
    check_address(req.superlink)
    check_ca(req.ca)
    cfg = load_federation_config(req.config)
    check_output_dir(cfg)  # where the output folder is visible from here, refuse to clobber it in a second
    server_config = req.server_config or str(req.config.resolve())
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="fedsynth-run-") as tmp:
        link = RemoteSuperLink(req.superlink, req.ca, Path(tmp) / "flwr-home")
        app = req.app or app_dir(Path(tmp))
        run_id = link.submit(app, {keys.RUN_CONFIG_PATH: server_config})
        log_file = req.log_file or Path.cwd() / f"fedsynth-run-{run_id}.log"
        watch = RunWatch(link, run_id, log_file)
        try:
            with _sigterm_as_interrupt():
                status = follow_run(run_id, watch.status, cfg, req.timeout_s, req.progress, poll_s=1.0)
        except KeyboardInterrupt:
            raise FederationError(f"interrupted: {_stop(link, run_id)}") from None
        except FederationError as err:  # timed out, or the SuperLink stayed out of reach
            raise FederationError(f"{err}; {_stop(link, run_id)}") from None
        finally:
            watch.close()
    rounds = completed_rounds(cfg.federation.metrics_file)
    if not status.endswith("completed"):
        cause = last_error(log_file)
        raise FederationError(f"run {run_id} ended as '{status}'" + (f": {cause}" if cause else "")
                              + f"; log: {log_file}")
    return RemoteRunResult(run_id, status, time.time() - started, rounds, log_file)

