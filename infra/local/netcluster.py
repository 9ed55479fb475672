"""A multi-node Ray cluster on this one machine: the head on a bridge, each worker node in a network namespace.

    python infra/local/netcluster.py up [--nodes 3] [--net 0]     # or infra/local/cluster.sh up
    python infra/local/netcluster.py env                          # the driver's environment, as shell lines
    python infra/local/netcluster.py kill n2 | cut n2 | heal n2 | restart n2 | cut s3 | heal s3
    python infra/local/netcluster.py status
    python infra/local/netcluster.py down

The layout (``--net N`` picks the subnet 198.18.N.0/24, inside the benchmarking range 198.18.0.0/15, so no
address of any real network is used and all traffic stays between namespaces of this machine):

- a bridge ``k2cN`` holding 198.18.N.1, the head's address: the Ray head (GCS, dashboard and Jobs API) and
  an MLflow server run on the host, bound to that address only;
- a namespace ``k2cN-s3`` at 198.18.N.2 running the S3 server (moto), so that cutting its link makes S3
  unreachable from every node, the head included;
- worker nodes ``n1``.. in namespaces ``k2cN-n1``.. at 198.18.N.11.., each joined to the bridge by a veth
  pair (``k2cN-v1`` on the bridge, ``k2eth`` inside), each running ``ray start --address=<head>``. Every
  worker node has one unit of the custom resource ``k2node``: a Ray Train worker that asks for it lands
  alone on its node, so a lost node takes exactly the workers on it.

Ray's node health checks are tightened on the head (``--health-check-ms``): a node that stops answering
is declared dead in about ``period x threshold``, not the default half minute.

Everything started is stopped by process id: the head and MLflow by their process groups (and any Ray
process naming the cluster's private temp dir), each namespace by ``ip netns pids``. ``down`` also
deletes the namespaces, links and bridge, and works from the state file alone (``<state>/cluster.json``)
after a crash of whatever called ``up``. Needs root and ``ip`` (iproute2); ``check_available()`` says why not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
INNER_IF = "k2eth"
S3_PORT = 9000
GCS_PORT = 6380
DASHBOARD_PORT = 8265
MLFLOW_PORT = 5000
BUCKET = "k2pipe"
# moto accepts any credentials: these are placeholders, not secrets.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}


class ClusterError(RuntimeError):
    pass


def check_available() -> str | None:
    """None when this machine can build the cluster; else the reason it cannot."""
    if os.geteuid() != 0:
        return f"network namespaces need root (this process runs as uid {os.geteuid()})"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"k2probe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if not (VENV_BIN / "ray").exists():
        return f"{VENV_BIN} has no `ray` command"
    return None


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and out.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed ({out.returncode}): {out.stderr.strip()}")
    return out


@dataclass
class Node:
    name: str
    netns: str
    veth: str
    ip: str
    cpus: int
    pid: int | None = None
    """The session leader (``ray start --block``) of the node's current Ray processes."""
    log: str = ""


@dataclass
class Cluster:
    net: int
    state_dir: str
    nodes: dict[str, Node] = field(default_factory=dict)
    head_pid: int | None = None
    mlflow_pid: int | None = None
    s3_pid: int | None = None
    health_check_ms: tuple[int, int] = (1000, 5)
    """GCS health checks: period (ms) and failed checks before a node is declared dead."""

    # ------------------------------------------------------------------ names and addresses
    @property
    def prefix(self) -> str:
        return f"k2c{self.net}"

    @property
    def bridge(self) -> str:
        return self.prefix

    @property
    def head_ip(self) -> str:
        return f"198.18.{self.net}.1"

    @property
    def s3_ip(self) -> str:
        return f"198.18.{self.net}.2"

    @property
    def s3_netns(self) -> str:
        return f"{self.prefix}-s3"

    @property
    def s3_veth(self) -> str:
        return f"{self.prefix}-vs3"

    @property
    def ray_address(self) -> str:
        return f"{self.head_ip}:{GCS_PORT}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head_ip}:{DASHBOARD_PORT}"

    @property
    def s3_url(self) -> str:
        return f"http://{self.s3_ip}:{S3_PORT}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.head_ip}:{MLFLOW_PORT}"

    @property
    def storage(self) -> str:
        return f"s3://{BUCKET}/k2runs"

    @property
    def temp_dir(self) -> str:
        # Short: Unix socket paths are limited to 107 bytes.
        return f"/tmp/k2c{self.net}-ray"

    def s3_env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL_S3": self.s3_url, "MLFLOW_S3_ENDPOINT_URL": self.s3_url, **S3_CREDENTIALS}

    def env(self) -> dict[str, str]:
        """What a driver on the host needs to use the cluster."""
        return {"RAY_ADDRESS": self.ray_address, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                "K2PIPE_RAY_NODE_IP": self.head_ip, "K2PIPE_STORAGE": self.storage,
                "MLFLOW_TRACKING_URI": self.mlflow_url, "K2PIPE_DASHBOARD": self.dashboard_url, **self.s3_env()}

    # ------------------------------------------------------------------ state
    @property
    def state_file(self) -> Path:
        return Path(self.state_dir) / "cluster.json"

    def save(self) -> None:
        Path(self.state_dir).mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(self.state_file)

    @classmethod
    def load(cls, state_dir: str) -> Cluster:
        path = Path(state_dir) / "cluster.json"
        if not path.exists():
            raise ClusterError(f"no cluster state at {path}; run `up` first")
        raw = json.loads(path.read_text())
        raw["nodes"] = {k: Node(**v) for k, v in raw["nodes"].items()}
        raw["health_check_ms"] = tuple(raw["health_check_ms"])
        return cls(**raw)

    def node(self, name: str) -> Node:
        if name not in self.nodes:
            raise ClusterError(f"no node {name!r}; nodes: {', '.join(self.nodes)} (and 's3' for cut/heal)")
        return self.nodes[name]

    # ------------------------------------------------------------------ building
    def up(self, num_nodes: int = 3, cpus_per_node: int = 1, mlflow: bool = True,
           timeout_s: float = 180.0) -> Cluster:
        """Bridge, S3 namespace, head, MLflow and ``num_nodes`` worker nodes; waits until Ray sees them all."""
        if not 1 <= num_nodes <= 200:
            raise ClusterError(f"--nodes {num_nodes}: expected 1 to 200")
        if sh("ip", "link", "show", self.bridge, check=False).returncode == 0:
            raise ClusterError(f"the bridge {self.bridge} exists: a cluster on --net {self.net} is up "
                               f"(`down --net {self.net}` removes it) or choose another --net")
        for i in range(1, num_nodes + 1):
            name = f"n{i}"
            self.nodes[name] = Node(name, f"{self.prefix}-{name}", f"{self.prefix}-v{i}", f"198.18.{self.net}.{10 + i}",
                                    cpus_per_node, log=str(Path(self.state_dir) / f"{name}.log"))
        self.save()  # from here on, `down` can undo whatever part was made
        try:
            sh("ip", "link", "add", self.bridge, "type", "bridge")
            sh("ip", "addr", "add", f"{self.head_ip}/24", "dev", self.bridge)
            sh("ip", "link", "set", self.bridge, "up")
            self._add_netns(self.s3_netns, self.s3_veth, self.s3_ip)
            for n in self.nodes.values():
                self._add_netns(n.netns, n.veth, n.ip)
            self._start_s3()
            self._start_head()
            if mlflow:
                self._start_mlflow()
            for n in self.nodes.values():  # one at a time: a loaded machine times a raylet out at 30 s
                self.start_node(n.name, timeout_s=timeout_s)
        except BaseException:
            self.save()
            self.down()
            raise
        self.save()
        return self

    def _add_netns(self, netns: str, veth: str, ip: str) -> None:
        sh("ip", "netns", "add", netns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", INNER_IF, "netns", netns)
        sh("ip", "link", "set", veth, "master", self.bridge)
        sh("ip", "link", "set", veth, "up")
        sh("ip", "-n", netns, "addr", "add", f"{ip}/24", "dev", INNER_IF)
        sh("ip", "-n", netns, "link", "set", INNER_IF, "up")
        sh("ip", "-n", netns, "link", "set", "lo", "up")

    def _launch(self, cmd: list[str], log: str, env: dict[str, str], netns: str | None = None) -> int:
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        full_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("AWS_", "MLFLOW_", "RAY_", "K2PIPE_", "GLOO_"))}
        full_env["PATH"] = f"{VENV_BIN}{os.pathsep}{full_env.get('PATH', '')}"
        full_env.update(env)
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=self.state_dir)
        return proc.pid

    def _start_s3(self) -> None:
        log = str(Path(self.state_dir) / "s3.log")
        cmd = [str(VENV_BIN / "python"), "-m", "moto.server", "-H", self.s3_ip, "-p", str(S3_PORT)]
        self.s3_pid = self._launch(cmd, log, {}, netns=self.s3_netns)
        self.save()
        _wait_http(f"{self.s3_url}/", 60, log)
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3_url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket=BUCKET)

    def _ray_env(self) -> dict[str, str]:
        period, threshold = self.health_check_ms
        return {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                "RAY_health_check_period_ms": str(period), "RAY_health_check_timeout_ms": str(period),
                "RAY_health_check_failure_threshold": str(threshold), "RAY_health_check_initial_delay_ms": "1000",
                "MLFLOW_TRACKING_URI": self.mlflow_url, **self.s3_env()}

    def _start_head(self) -> None:
        Path(self.temp_dir).mkdir(parents=True, exist_ok=True)
        log = str(Path(self.state_dir) / "head.log")
        # No Ray Train worker lands on the head: it has no `k2node` (the head is the stable node, as on a
        # real cluster: drivers, the Train controller and the pipeline's stage tasks run there).
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", self.head_ip,
               "--port", str(GCS_PORT), "--dashboard-host", self.head_ip, "--dashboard-port", str(DASHBOARD_PORT),
               "--include-dashboard", "true", "--num-cpus", "2", "--object-store-memory", str(256 << 20),
               "--disable-usage-stats", "--temp-dir", self.temp_dir]
        self.head_pid = self._launch(cmd, log, self._ray_env())
        self.save()
        _wait_http(f"{self.dashboard_url}/api/version", 180, log)

    def _start_mlflow(self) -> None:
        log = str(Path(self.state_dir) / "mlflow.log")
        db = Path(self.state_dir) / "mlflow.db"
        cmd = [str(VENV_BIN / "mlflow"), "server", "--host", self.head_ip, "--port", str(MLFLOW_PORT),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{db}",
               # 198.18/15 is not among the private ranges MLflow admits by default.
               "--allowed-hosts", f"{self.head_ip},{self.head_ip}:{MLFLOW_PORT}",
               "--artifacts-destination", f"s3://{BUCKET}/mlflow"]
        self.mlflow_pid = self._launch(cmd, log, {**self.s3_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        self.save()
        _wait_http(f"{self.mlflow_url}/health", 180, log)

    def start_node(self, name: str, wait: bool = True, timeout_s: float = 120.0, attempts: int = 3) -> None:
        """Start (or restart, after a kill) the Ray processes of worker node ``name``; with ``wait``, until
        Ray lists it alive, trying again when ``ray start`` gives up (it allows a raylet 30 s to register,
        which a loaded machine can miss)."""
        n = self.node(name)
        if self.node_pids(name):
            raise ClusterError(f"node {name} still has processes {self.node_pids(name)}; `kill {name}` first")
        for attempt in range(1, attempts + 1):
            self._start_node_once(n)
            if not wait:
                return
            try:
                self.wait_for_nodes({name}, timeout_s)
                return
            except ClusterError:
                self.kill(name)
                if attempt == attempts:
                    raise

    def _start_node_once(self, n: Node) -> None:
        cmd = [str(VENV_BIN / "ray"), "start", "--block", "--address", self.ray_address, "--node-ip-address", n.ip,
               "--num-cpus", str(n.cpus), "--resources", json.dumps({"k2node": 1}),
               "--object-store-memory", str(128 << 20), "--disable-usage-stats"]
        # GLOO_SOCKET_IFNAME: torch.distributed's gloo binds to the node's own link (the host name resolves to
        # an address that does not exist inside the namespace). Ray's workers inherit the raylet's environment.
        n.pid = self._launch(cmd, n.log, {**self._ray_env(), "GLOO_SOCKET_IFNAME": INNER_IF}, netns=n.netns)
        self.save()

    def wait_for_nodes(self, names: set[str], timeout_s: float) -> None:
        want = {self.nodes[n].ip for n in names}
        deadline = time.monotonic() + timeout_s
        while True:
            alive = {n["NodeManagerAddress"] for n in self.ray_nodes() if n.get("Alive")}
            if want <= alive:
                return
            for name in names:
                pid = self.nodes[name].pid
                if pid is not None and not _alive(pid):
                    raise ClusterError(f"node {name}'s `ray start` exited; see {self.nodes[name].log}")
            if time.monotonic() > deadline:
                raise ClusterError(f"nodes {sorted(want - alive)} did not join within {timeout_s:.0f} s; "
                                   f"logs in {self.state_dir}")
            time.sleep(0.5)

    def ray_nodes(self) -> list[dict]:
        """Ray's view of the nodes, from the dashboard's REST API (no Ray client in this process)."""
        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/nodes?view=summary", timeout=5) as r:
                body = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return []
        out = []
        for s in body.get("data", {}).get("summary", []):
            raylet = s.get("raylet", {})
            out.append({"NodeManagerAddress": raylet.get("nodeManagerAddress") or s.get("ip"),
                        "Alive": raylet.get("state") == "ALIVE", "NodeID": raylet.get("nodeId")})
        return out

    # ------------------------------------------------------------------ faults
    def node_pids(self, name: str) -> list[int]:
        n = self.node(name)
        out = sh("ip", "netns", "pids", n.netns, check=False)
        return [int(p) for p in out.stdout.split()] if out.returncode == 0 else []

    def kill(self, name: str) -> list[int]:
        """SIGKILL every process of worker node ``name`` (as a node that loses power); returns their ids."""
        pids = self.node_pids(name)
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.node_pids(name) and time.monotonic() < deadline:
            time.sleep(0.1)
        return pids

    def _link(self, name: str) -> str:
        return self.s3_veth if name == "s3" else self.node(name).veth

    def cut(self, name: str) -> None:
        """Take the node's link down: its packets are dropped both ways, its processes keep running."""
        sh("ip", "link", "set", self._link(name), "down")

    def heal(self, name: str) -> None:
        sh("ip", "link", "set", self._link(name), "up")

    def link_state(self, name: str) -> str:
        out = sh("ip", "-br", "link", "show", self._link(name), check=False).stdout.split()
        return "down" if len(out) < 2 or out[1] == "DOWN" else "up"

    # ------------------------------------------------------------------ teardown
    def down(self) -> None:
        """Stop every process this cluster started and remove its namespaces, links and bridge."""
        for n in self.nodes.values():
            if sh("ip", "netns", "pids", n.netns, check=False).returncode == 0:
                for pid in self.node_pids(n.name):
                    _signal(pid, signal.SIGKILL)
        for pid in (self.s3_pid,):
            if pid:
                _stop_group(pid)
        out = sh("ip", "netns", "pids", self.s3_netns, check=False)
        for pid in out.stdout.split() if out.returncode == 0 else []:
            _signal(int(pid), signal.SIGKILL)
        for pid in (self.mlflow_pid, self.head_pid):
            if pid:
                _stop_group(pid)
        for pid in pids_mentioning(self.temp_dir):
            _signal(pid, signal.SIGKILL)
        for netns in [n.netns for n in self.nodes.values()] + [self.s3_netns]:
            sh("ip", "netns", "del", netns, check=False)
        for veth in [n.veth for n in self.nodes.values()] + [self.s3_veth, self.bridge]:
            sh("ip", "link", "del", veth, check=False)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.head_pid = self.mlflow_pid = self.s3_pid = None
        for n in self.nodes.values():
            n.pid = None
        if Path(self.state_dir).exists():
            self.save()

    def status(self) -> dict:
        alive = {n["NodeManagerAddress"] for n in self.ray_nodes() if n["Alive"]}
        return {"head": {"address": self.ray_address, "dashboard": self.dashboard_url,
                         "running": bool(self.head_pid and _alive(self.head_pid))},
                "s3": {"url": self.s3_url, "running": bool(self.s3_pid and _alive(self.s3_pid))},
                "mlflow": {"url": self.mlflow_url, "running": bool(self.mlflow_pid and _alive(self.mlflow_pid))},
                "nodes": {n.name: {"ip": n.ip, "processes": len(self.node_pids(n.name)),
                                   "ray": "alive" if n.ip in alive else "dead or absent",
                                   "link": self.link_state(n.name)}
                          for n in self.nodes.values()}}


def free_net(start: int = 0) -> int:
    """The first subnet index from ``start`` whose bridge does not exist (another cluster may hold one)."""
    for net in range(start, 256):
        if sh("ip", "link", "show", f"k2c{net}", check=False).returncode != 0:
            return net
    raise ClusterError(f"every --net from {start} to 255 is in use")


def leftovers(cluster: Cluster) -> list[str]:
    """What of ``cluster`` still exists after ``down``: namespaces, links, processes (empty when clean)."""
    netns = set(sh("ip", "netns", "list", check=False).stdout.split())
    left = [f"netns {n}" for n in [x.netns for x in cluster.nodes.values()] + [cluster.s3_netns] if n in netns]
    for link in [x.veth for x in cluster.nodes.values()] + [cluster.s3_veth, cluster.bridge]:
        if sh("ip", "link", "show", link, check=False).returncode == 0:
            left.append(f"link {link}")
    left += [f"process {pid}" for marker in (cluster.temp_dir, cluster.state_dir)
             for pid in pids_mentioning(marker) if _alive(pid)]
    return left


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _stop_group(pgid: int, grace_s: float = 5.0) -> None:
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            _reap(pgid)
            time.sleep(0.1)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def pids_mentioning(marker: str) -> list[int]:
    """Processes whose command line holds ``marker`` (a private temp dir names exactly one Ray cluster's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _wait_http(url: str, timeout_s: float, log: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                tail = Path(log).read_text(errors="replace")[-3000:] if Path(log).exists() else ""
                raise ClusterError(f"{url} did not answer within {timeout_s:.0f} s; {log}:\n{tail}") from None
            time.sleep(0.5)


def default_state_dir(net: int) -> str:
    return os.environ.get("K2PIPE_CLUSTER_DIR", f"/tmp/k2c{net}-state")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cluster.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["up", "down", "status", "env", "kill", "cut", "heal", "restart"])
    p.add_argument("node", nargs="?", help="a worker node (n1, n2, ...), or s3 for cut/heal")
    p.add_argument("--net", type=int, default=0, help="the subnet 198.18.NET.0/24 and the names k2cNET* (0-255)")
    p.add_argument("--nodes", type=int, default=3, help="worker nodes (up)")
    p.add_argument("--cpus", type=int, default=1, help="logical CPUs of each worker node (up)")
    p.add_argument("--health-check-ms", type=int, default=1000, help="GCS health-check period (up)")
    p.add_argument("--state-dir", default=None, help="state, logs and the MLflow database")
    args = p.parse_args(argv)
    if not 0 <= args.net <= 255:
        p.error(f"--net {args.net}: expected 0 to 255")
    state_dir = args.state_dir or default_state_dir(args.net)
    try:
        if args.command == "up":
            why = check_available()
            if why:
                raise ClusterError(why)
            c = Cluster(args.net, state_dir, health_check_ms=(args.health_check_ms, 5))
            c.up(args.nodes, args.cpus)
            print(json.dumps(c.status(), indent=1))
            print(f"# the driver's environment: eval \"$(cluster.sh env --net {args.net})\"", file=sys.stderr)
            return 0
        c = Cluster.load(state_dir)
        if args.command in ("kill", "cut", "heal", "restart") and not args.node:
            raise ClusterError(f"`{args.command}` needs a node: {', '.join(c.nodes)}"
                               + (" or s3" if args.command in ("cut", "heal") else ""))
        if args.command == "down":
            c.down()
            shutil.rmtree(state_dir, ignore_errors=True)
        elif args.command == "status":
            print(json.dumps(c.status(), indent=1))
        elif args.command == "env":
            for k, v in c.env().items():
                print(f"export {k}={v}")
        elif args.command == "kill":
            print(f"killed {len(c.kill(args.node))} processes of {args.node}")
        elif args.command == "cut":
            c.cut(args.node)
        elif args.command == "heal":
            c.heal(args.node)
        elif args.command == "restart":
            c.start_node(args.node)
        return 0
    except ClusterError as e:
        print(f"cluster.sh: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
