"""The kernelbox benchmark driver (run by bench/run, which builds, makes the venv and cleans up).

Workloads, each against kernelbox (the release binary on loopback, real Docker engine and kernel images)
and, in the same run, against Jupyter Kernel Gateway (on the host, loopback) and a direct ZeroMQ client:

  1. session start -> first execute done: cold (kernelbox with --pool none) and from the warm pool
     (waiting before each sample until /v1/languages shows the pool full), for every language (python's
     first cell `1+1`, python_scientific's `import pandas`); kernelbox's runtime trees are made first;
  2. execute round trip of `1+1` on a warm session, sequential; the floors are jupyter_client over
     ZeroMQ/TCP to ipykernel in a container of the same kernel image, and to ipykernel on the host;
  3. 8 sessions x 50 executes concurrently (and 64 x 50, errors counted);
  4. density: PSS of every process an idle python session adds (host /proc/<pid>/smaps_rollup) and the
     server's own VmRSS at 0, 50, 200 and 400 sessions (Kernel Gateway: 50 and 200);
  5. burst: python creates at a steady rate for 30 s against the default adaptive pool: hit rate, start.

It also draws the side-by-side figures into bench/benchmarks.png (matplotlib from the bench venv).

Writes the results as JSON (argv[1]) and the tables into bench/BENCHMARKS.md between the result markers.
Everything it starts it records in $KB_BENCH_PIDS so bench/run's trap can stop it.
"""

import datetime
import http.client
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from queue import Empty

import websocket  # websocket-client
from jupyter_client import BlockingKernelClient

ENV = os.environ
REPO = ENV["KB_REPO"]
KB_BIN = ENV["KB_BIN"]
WORK = ENV["KB_WORK"]  # scratch dir (state dir, logs, connection files)
INSTANCE = ENV["KB_INSTANCE"]
PIDS_FILE = ENV["KB_BENCH_PIDS"]
KB_PORT = int(ENV.get("KB_PORT", "18471"))
KG_PORT = int(ENV.get("KG_PORT", "18472"))
FLOOR_LABEL = "kernelbox.bench=1"
IMAGE = ENV.get("KB_IMAGE", "kernelbox/kernel-python:latest")

N_COLD = int(ENV.get("KB_BENCH_COLD", "15"))
N_POOLED = int(ENV.get("KB_BENCH_POOLED", "20"))
POOL = int(ENV.get("KB_BENCH_POOL", "4"))
N_RTT = int(ENV.get("KB_BENCH_RTT", "500"))
DENSITY = [int(x) for x in ENV.get("KB_BENCH_DENSITY", "50,200,400").split(",") if x]
KG_DENSITY = [int(x) for x in ENV.get("KB_BENCH_KG_DENSITY", "50,200").split(",") if x]
N_LANG = int(ENV.get("KB_BENCH_LANG", "6"))  # cold and pooled starts per language other than python
BURST_RATE = float(ENV.get("KB_BENCH_BURST_RATE", "1.0"))  # creates per second
BURST_S = float(ENV.get("KB_BENCH_BURST_S", "30"))
RUNTIMES = ENV.get("KB_RUNTIMES")  # kernelbox's --runtimes-dir, kept across runs (trees are named by content)
# Every language, its image and its first cell (python_scientific's is the import a notebook starts with).
LANGS = [("python", "python", "1+1"), ("python_scientific", "python_scientific", "import pandas"),
         ("javascript", "javascript", "1+1"), ("java", "java", "1+1"), ("bash", "bash", "echo 2")]
FIRST_CELL = {name: code for name, _, code in LANGS}
POOLED_ALL = ",".join([f"python={POOL}"] + [f"{name}=2" for name, _, _ in LANGS if name != "python"])
CREATE_CONCURRENCY = int(ENV.get("KB_BENCH_CREATE_CONCURRENCY", "3"))
N_GV_IDLE = int(ENV.get("KB_BENCH_GVISOR_IDLE", "20"))  # idle sessions per runtime in the gVisor phase
CODE = "1+1"

LOADS = []  # (label, loadavg) along the run


def log(*a):
    print(f"[{datetime.datetime.utcnow():%H:%M:%S}]", *a, file=sys.stderr, flush=True)


def loadavg(label):
    with open("/proc/loadavg") as f:
        v = " ".join(f.read().split()[:3])
    LOADS.append((label, v))
    return v


def record_pid(pid):
    with open(PIDS_FILE, "a") as f:
        f.write(f"{pid}\n")


def pct(xs, p):
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(lat_s, wall_s=None, errors=0, extra=None):
    """Latencies in seconds -> ms figures; throughput = operations per wall second."""
    ms = [x * 1000 for x in lat_s]
    out = {
        "n": len(ms),
        "errors": errors,
        "p50_ms": pct(ms, 0.5),
        "p95_ms": pct(ms, 0.95),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
    }
    wall = wall_s if wall_s is not None else sum(lat_s)
    out["throughput_per_s"] = (len(ms) / wall) if wall else float("nan")
    if extra:
        out.update(extra)
    return out


# ---------------------------------------------------------------- memory on the host


def smaps_rollup(pid):
    vals = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                    vals[parts[0][:-1]] = int(parts[1])
    except OSError:
        return None
    return vals


def proc_name(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return "?"
    if not args:
        # gVisor's ptrace platform runs the application in stub processes with no command line of their own.
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            return "?"
        return "gVisor's ptrace stubs (the application)" if comm == "exe" else comm or "?"
    joined = " ".join(args)
    if "containerd-shim" in args[0]:
        return "containerd-shim-runc-v2"
    if "docker-init" in args[0]:
        return "docker-init"
    if "start-kernel" in joined:
        return "start-kernel"
    if "ipykernel" in joined:
        return "ipykernel"
    return os.path.basename(args[0])


def ppid(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    return 0


def vmrss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def container_pids(cid, init_pid):
    """Every process of the container (its cgroup), with Docker's shim (the init's parent)."""
    pids = []
    for path in (f"/sys/fs/cgroup/pids/docker/{cid}/cgroup.procs", f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/cgroup.procs"):
        try:
            with open(path) as f:
                pids = [int(x) for x in f.read().split()]
            break
        except OSError:
            continue
    if not pids:
        out = subprocess.run(["docker", "top", cid, "-o", "pid"], capture_output=True, text=True).stdout
        pids = [int(x) for x in out.split()[1:] if x.isdigit()]
    shim = ppid(init_pid)
    return pids + [shim]


def session_memory(containers):
    """containers: [(cid, init_pid)] -> per session PSS breakdown (KiB by process kind) and totals."""
    per = []
    for cid, init_pid in containers:
        kinds = {}
        for pid in container_pids(cid, init_pid):
            r = smaps_rollup(pid)
            if r is None:
                continue
            k = proc_name(pid)
            a = kinds.setdefault(k, {"pss": 0, "rss": 0, "pss_anon": 0, "pss_file": 0, "count": 0})
            a["pss"] += r.get("Pss", 0)
            a["rss"] += r.get("Rss", 0)
            a["pss_anon"] += r.get("Pss_Anon", 0)
            a["pss_file"] += r.get("Pss_File", 0)
            a["count"] += 1
        per.append(kinds)
    return per


def mem_report(per):
    """Median per kind over sessions, MiB."""
    kinds = sorted({k for p in per for k in p})
    out = {"sessions": len(per), "kinds": {}}
    for k in kinds:
        vals = [p[k] for p in per if k in p]
        out["kinds"][k] = {
            f: statistics.median(v[f] for v in vals) / 1024 for f in ("pss", "rss", "pss_anon", "pss_file")
        }
        out["kinds"][k]["count"] = statistics.median(v["count"] for v in vals)
    totals = [sum(v["pss"] for v in p.values()) / 1024 for p in per]
    out["total_pss_mib_median"] = statistics.median(totals) if totals else float("nan")
    out["total_pss_mib_p95"] = pct(totals, 0.95) if totals else float("nan")
    return out


# ---------------------------------------------------------------- kernelbox over HTTP


class Http:
    """One keep-alive HTTP/1.1 connection (per thread), TCP_NODELAY."""

    def __init__(self, port):
        self.port = port
        self.conn = None

    def _connect(self):
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def req(self, method, path, body=None):
        for attempt in (0, 1):
            if self.conn is None:
                self._connect()
            try:
                data = None if body is None else json.dumps(body).encode()
                headers = {"content-type": "application/json"} if data is not None else {}
                self.conn.request(method, path, body=data, headers=headers)
                r = self.conn.getresponse()
                raw = r.read()
                return r.status, (json.loads(raw) if raw and raw[:1] in b"{[" else raw)
            except (http.client.HTTPException, ConnectionError, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise

    def close(self):
        if self.conn:
            self.conn.close()


class Kernelbox:
    def __init__(self, pool, trees=True, extra=()):
        self.pool = pool
        self.trees = trees
        self.extra = list(extra)
        self.proc = None
        self.local = threading.local()

    def http(self):
        h = getattr(self.local, "h", None)
        if h is None:
            h = self.local.h = Http(KB_PORT)
        return h

    def start(self):
        state = os.path.join(WORK, "state")
        os.makedirs(state, exist_ok=True)
        pool = self.pool if isinstance(self.pool, str) else (f"python={self.pool}" if self.pool else "none")
        logf = open(os.path.join(WORK, f"kernelbox-{'pool' if self.pool else 'cold'}.log"), "ab")
        args = [
            KB_BIN, "serve", "--listen", f"127.0.0.1:{KB_PORT}", "--instance", INSTANCE, "--state-dir", state,
            # Density creates 400 sessions as fast as the host boots them: more than one key may by default.
            "--create-limit-per-minute", "0", "--max-sessions", "500", "--max-sessions-per-owner", "500",
            "--max-total-memory-mb", "200000",
            "--pool", pool, "--pool-memory-mb", "16384",
        ]
        args += self.extra
        if not self.trees:
            args += ["--runtimes-dir", "none"]
        elif RUNTIMES:
            args += ["--runtimes-dir", RUNTIMES]
        env = dict(ENV, KERNELBOX_LOG="warn")
        self.proc = subprocess.Popen(args, stdout=logf, stderr=logf, env=env)
        record_pid(self.proc.pid)
        deadline = time.time() + 1800  # the service builds missing images first
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kernelbox exited with {self.proc.returncode}; see {logf.name}")
            try:
                st, _ = Http(KB_PORT).req("GET", "/readyz")
                if st == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError("kernelbox did not become ready")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def pool_ready(self, language="python"):
        st, langs = self.http().req("GET", "/v1/languages")
        for l in langs:
            if l["name"] == language:
                return l["pool"]["ready"], l["pool"]["target"]
        return 0, 0

    def wait_pool_full(self, language="python", timeout=300):
        t0 = time.time()
        while time.time() - t0 < timeout:
            ready, target = self.pool_ready(language)
            if ready >= target:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{language} pool did not fill")

    def wait_trees(self, languages=None, timeout=900):
        """Each language's runtime tree ready (made by a first session of the language if need be), so the
        starts measured are those of a service in its steady state. Returns the seconds it took."""
        t0 = time.time()
        for name, image, _ in LANGS:
            if languages and name not in languages:
                continue
            metric = f'kernelbox_runtime_tree_ready{{image="kernelbox/kernel-{image}:latest"}}'
            if self.metrics(metric) == 1:
                continue
            sid = self.create({"language": name})
            self.delete(sid)
            while self.metrics(metric) != 1:
                if time.time() - t0 > timeout:
                    raise RuntimeError(f"no runtime tree for {image}")
                time.sleep(0.5)
        return time.time() - t0

    def metrics(self, name):
        st, raw = self.http().req("GET", "/metrics")
        total = 0.0
        for line in raw.decode().splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def create(self, body=None):
        st, r = self.http().req("POST", "/v1/sessions", body or {"language": "python"})
        if st != 201:
            raise RuntimeError(f"create: {st} {r}")
        return r["id"]

    def execute(self, sid, code=CODE):
        st, r = self.http().req("POST", f"/v1/sessions/{sid}/execute", {"code": code, "timeout_s": 120})
        if st != 200 or r.get("status") != "ok":
            raise RuntimeError(f"execute: {st} {r}")
        return r

    def delete(self, sid):
        self.http().req("DELETE", f"/v1/sessions/{sid}")

    def containers(self, sids):
        ids = subprocess.run(
            ["docker", "ps", "-q", "--no-trunc", "--filter", f"label=kernelbox.instance={INSTANCE}"],
            capture_output=True, text=True, check=True).stdout.split()
        if not ids:
            return []
        out = subprocess.run(["docker", "inspect", "-f", "{{.Id}} {{.State.Pid}} {{.Name}}"] + ids,
                             capture_output=True, text=True, check=True).stdout
        res = []
        for line in out.splitlines():
            cid, pid, name = line.split()
            if any(s in name for s in sids):
                res.append((cid, int(pid)))
        return res

    def server_rss(self):
        return vmrss_mib(self.proc.pid)


# ---------------------------------------------------------------- Jupyter Kernel Gateway


def _msg(code, session):
    return {
        "header": {"msg_id": uuid.uuid4().hex, "msg_type": "execute_request", "username": "bench",
                   "session": session, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "version": "5.3"},
        "parent_header": {}, "metadata": {},
        "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True},
        "channel": "shell", "buffers": [],
    }


class KgSocket:
    """One kernel's /channels WebSocket. quickack: set TCP_QUICKACK before every read (the client ACKs at
    once, so the server's Nagle-delayed second segment is not held for the client's delayed ACK)."""

    def __init__(self, port, kid, quickack, timeout=600):
        self.quickack = quickack
        self.session = uuid.uuid4().hex
        self.ws = websocket.create_connection(
            f"ws://127.0.0.1:{port}/api/kernels/{kid}/channels?session_id={self.session}",
            sockopt=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),), timeout=timeout)

    def execute(self, code=CODE):
        m = _msg(code, self.session)
        mid = m["header"]["msg_id"]
        self.ws.send(json.dumps(m))
        got_reply = got_idle = False
        status = None
        while not (got_reply and got_idle):
            if self.quickack:
                self.ws.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            raw = self.ws.recv()
            if isinstance(raw, bytes):
                continue
            r = json.loads(raw)
            if r.get("parent_header", {}).get("msg_id") != mid:
                continue
            t = r.get("msg_type") or r["header"]["msg_type"]
            if t == "execute_reply":
                got_reply = True
                status = r["content"].get("status")
            elif t == "status" and r["content"].get("execution_state") == "idle":
                got_idle = True
        if status != "ok":
            raise RuntimeError(f"KG execute: {status}")

    def close(self):
        self.ws.close()


class Gateway:
    def __init__(self, venv):
        self.venv = venv
        self.proc = None
        self.local = threading.local()

    def http(self):
        h = getattr(self.local, "h", None)
        if h is None:
            h = self.local.h = Http(KG_PORT)
        return h

    def start(self):
        home = os.path.join(WORK, "kg")
        os.makedirs(home, exist_ok=True)
        env = dict(ENV, JUPYTER_RUNTIME_DIR=os.path.join(home, "runtime"), JUPYTER_DATA_DIR=os.path.join(home, "data"),
                   JUPYTER_CONFIG_DIR=os.path.join(home, "config"), IPYTHONDIR=os.path.join(home, "ipython"),
                   JUPYTER_PLATFORM_DIRS="1")
        env.pop("JUPYTER_PATH", None)
        logf = open(os.path.join(WORK, "kernel-gateway.log"), "ab")
        self.proc = subprocess.Popen(
            [os.path.join(self.venv, "bin", "jupyter-kernelgateway"), "--KernelGatewayApp.ip=127.0.0.1",
             f"--KernelGatewayApp.port={KG_PORT}", "--KernelGatewayApp.port_retries=0",
             "--KernelGatewayApp.log_level=WARN"],
            stdout=logf, stderr=logf, env=env, cwd=home)
        record_pid(self.proc.pid)
        for _ in range(600):
            if self.proc.poll() is not None:
                raise RuntimeError(f"kernel gateway exited with {self.proc.returncode}; see {logf.name}")
            try:
                st, _ = Http(KG_PORT).req("GET", "/api/kernelspecs")
                if st == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("kernel gateway did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def create(self):
        st, r = self.http().req("POST", "/api/kernels", {"name": "python3"})
        if st not in (200, 201):
            raise RuntimeError(f"KG create: {st} {r}")
        return r["id"]

    def delete(self, kid):
        self.http().req("DELETE", f"/api/kernels/{kid}")

    def execute_new(self, kid):
        """Opens the kernel's WebSocket (quick-ACK client), runs CODE once and closes it."""
        s = self.socket(kid, quickack=True)
        try:
            s.execute()
        finally:
            s.close()

    def socket(self, kid, quickack, timeout=600):
        return KgSocket(KG_PORT, kid, quickack, timeout)

    def kernel_pids(self):
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    if ppid(int(d)) == self.proc.pid:
                        out.append(int(d))
                except OSError:
                    pass
        return out

    def server_rss(self):
        return vmrss_mib(self.proc.pid)


# ---------------------------------------------------------------- the ZeroMQ floor


class Floor:
    """ipykernel in a container of the kernel image, on TCP ports published to 127.0.0.1."""

    def __init__(self):
        self.containers = []

    def start(self):
        d = os.path.join(WORK, f"floor-{len(self.containers)}")
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o777)
        ports = []
        socks = []
        for _ in range(5):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
            socks.append(s)
        for s in socks:
            s.close()
        key = uuid.uuid4().hex
        info = dict(shell_port=ports[0], iopub_port=ports[1], stdin_port=ports[2], control_port=ports[3],
                    hb_port=ports[4], transport="tcp", signature_scheme="hmac-sha256", key=key, kernel_name="")
        with open(os.path.join(d, "kernel.json"), "w") as f:
            json.dump(dict(info, ip="0.0.0.0"), f)
        os.chmod(os.path.join(d, "kernel.json"), 0o666)
        with open(os.path.join(d, "client.json"), "w") as f:
            json.dump(dict(info, ip="127.0.0.1"), f)
        args = ["docker", "run", "-d", "--rm", "--label", FLOOR_LABEL, "--label", f"kernelbox.bench.run={INSTANCE}",
                "--init", "--entrypoint", "python", "-v", f"{d}:/conn"]
        for p in ports:
            args += ["-p", f"127.0.0.1:{p}:{p}"]
        args += [IMAGE, "-m", "ipykernel_launcher", "-f", "/conn/kernel.json"]
        t0 = time.perf_counter()
        cid = subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()
        self.containers.append(cid)
        kc = BlockingKernelClient(connection_file=os.path.join(d, "client.json"))
        kc.load_connection_file()
        # No heartbeat channel: while the kernel boots, Docker's port proxy accepts and drops connections, which
        # the heartbeat takes for a dead kernel. wait_for_ready re-sends kernel_info every second instead.
        kc.start_channels(hb=False)
        deadline = time.time() + 120
        while True:
            # kernel_info every 20 ms until iopub carries a status for one (so both the shell and the iopub
            # subscription are connected; a request may be lost while the kernel boots behind Docker's proxy)
            kc.kernel_info()
            try:
                kc.get_iopub_msg(timeout=0.02)
                break
            except Empty:
                if time.time() > deadline:
                    raise
        time.sleep(0.1)
        for get in (kc.get_shell_msg, kc.get_iopub_msg):  # drain what the kernel_info requests left
            while True:
                try:
                    get(timeout=0.05)
                except Empty:
                    break
        floor_execute(kc)
        return kc, cid, time.perf_counter() - t0

    def stop(self, kc=None, cid=None):
        if kc:
            kc.stop_channels()
        for c in [cid] if cid else list(self.containers):
            subprocess.run(["docker", "rm", "-f", c], capture_output=True)
            if c in self.containers:
                self.containers.remove(c)


def floor_execute(kc, code=CODE):
    mid = kc.execute(code)
    got_reply = got_idle = False
    while not (got_reply and got_idle):
        if not got_reply:
            r = kc.get_shell_msg(timeout=60)
            if r["parent_header"].get("msg_id") == mid:
                got_reply = True
                if r["content"]["status"] != "ok":
                    raise RuntimeError("floor execute failed")
        if not got_idle:
            m = kc.get_iopub_msg(timeout=60)
            if (m["parent_header"].get("msg_id") == mid and m["msg_type"] == "status"
                    and m["content"]["execution_state"] == "idle"):
                got_idle = True


# ---------------------------------------------------------------- workloads


def w1_start(create_fn, execute_fn, delete_fn, n, before=None):
    lat, create_part, errors = [], [], 0
    for _ in range(n):
        if before:
            before()
        t0 = time.perf_counter()
        try:
            sid = create_fn()
            t1 = time.perf_counter()
            execute_fn(sid)
            t2 = time.perf_counter()
            lat.append(t2 - t0)
            create_part.append(t1 - t0)
        except Exception as e:  # noqa: BLE001
            log("start error:", str(e)[:200])
            errors += 1
            continue
        delete_fn(sid)
    return summary(lat, errors=errors, extra={"create_p50_ms": pct(create_part, 0.5) * 1000,
                                              "first_execute_p50_ms": pct([a - b for a, b in zip(lat, create_part)], 0.5) * 1000})


def w2_rtt(execute_fn, n, warmup=20):
    for _ in range(warmup):
        execute_fn()
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        a = time.perf_counter()
        execute_fn()
        lat.append(time.perf_counter() - a)
    return summary(lat, wall_s=time.perf_counter() - t0)


def kernel_id(sid):
    """A kernelbox session id as its gateway kernel id (UUID-shaped: the id, then eight zeros)."""
    h = sid + "00000000"
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def mcp_rtt(sid, n, warmup=20):
    """Workload 2 through kernelbox's /mcp: the reference client's `execute` tool on session `sid`."""
    import asyncio

    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def run():
        async with streamable_http_client(f"http://127.0.0.1:{KB_PORT}/mcp") as (read, write, *_):
            async with ClientSession(read, write) as session:
                await session.initialize()

                async def once():
                    r = await session.call_tool("execute", {"session_id": sid, "code": CODE})
                    if getattr(r, "isError", False) or getattr(r, "is_error", False):
                        raise RuntimeError(f"MCP execute: {r}")

                for _ in range(warmup):
                    await once()
                lat = []
                t0 = time.perf_counter()
                for _ in range(n):
                    a = time.perf_counter()
                    await once()
                    lat.append(time.perf_counter() - a)
                return summary(lat, wall_s=time.perf_counter() - t0)

    return asyncio.run(run())


def w3_concurrent(executors, per):
    """executors: one callable per session, each run in its own thread `per` times."""
    lats, errors = [], [0]
    lock = threading.Lock()
    barrier = threading.Barrier(len(executors))

    def run(fn):
        mine = []
        barrier.wait()
        for _ in range(per):
            a = time.perf_counter()
            try:
                fn()
                mine.append(time.perf_counter() - a)
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors[0] += 1
                    if errors[0] <= 3:
                        log("concurrent error:", str(e)[:200])
        with lock:
            lats.extend(mine)

    threads = [threading.Thread(target=run, args=(f,)) for f in executors]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return summary(lats, wall_s=wall, errors=errors[0], extra={"sessions": len(executors), "per_session": per})


def create_many(create_fn, n, conc=CREATE_CONCURRENCY):
    lat, ids, errors = [], [], 0

    def one(_):
        a = time.perf_counter()
        sid = create_fn()
        return sid, time.perf_counter() - a

    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as ex:
        futs = [ex.submit(one, i) for i in range(n)]
        for f in futs:
            try:
                sid, l = f.result()
                ids.append(sid)
                lat.append(l)
            except Exception as e:  # noqa: BLE001
                errors += 1
                log("create error:", str(e)[:200])
    return ids, summary(lat, wall_s=time.perf_counter() - t0, errors=errors, extra={"concurrency": conc})


def delete_many(delete_fn, ids, conc=4):
    with ThreadPoolExecutor(conc) as ex:
        list(ex.map(delete_fn, ids))


def w5_burst(kb, language, rate, seconds):
    """Creates of `language` at a steady `rate` for `seconds` (each started on schedule, whatever the ones
    before it are doing): start -> first `1+1` done, then deleted. Pool hits and misses from /metrics, for
    the whole burst and for its second half (once the pool has adapted)."""
    n = int(rate * seconds)
    lat, errors = [None] * n, [0]
    lock = threading.Lock()
    counters = ("kernelbox_pool_hits_total", "kernelbox_pool_misses_total")

    def one(i):
        a = time.perf_counter()
        try:
            sid = kb.create({"language": language})
            kb.execute(sid, FIRST_CELL[language])
            lat[i] = time.perf_counter() - a
            kb.delete(sid)
        except Exception as e:  # noqa: BLE001
            with lock:
                errors[0] += 1
                if errors[0] <= 3:
                    log("burst error:", str(e)[:200])

    start = [kb.metrics(c) for c in counters]
    mid = None
    t0 = time.perf_counter()
    with ThreadPoolExecutor(32) as ex:
        futs = []
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if mid is None and i >= n // 2:
                mid = [kb.metrics(c) for c in counters]
            futs.append(ex.submit(one, i))
        for fut in futs:
            fut.result()
    end = [kb.metrics(c) for c in counters]
    got = [x for x in lat if x is not None]
    half = [x for x in lat[n // 2:] if x is not None]

    def rate_of(a, b):
        hits, misses = b[0] - a[0], b[1] - a[1]
        return hits / (hits + misses) if hits + misses else float("nan")

    return summary(got, wall_s=time.perf_counter() - t0, errors=errors[0], extra={
        "rate_per_s": rate, "seconds": seconds, "hit_rate": rate_of(start, end), "hit_rate_second_half": rate_of(mid, end),
        "p50_second_half_ms": pct(half, 0.5) * 1000 if half else float("nan"),
        "p95_second_half_ms": pct(half, 0.95) * 1000 if half else float("nan"),
        "hits": end[0] - start[0], "misses": end[1] - start[1],
    })


# ---------------------------------------------------------------- the run


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / 1024 / 1024
    docker = subprocess.run(["docker", "version", "-f", "{{.Server.Version}}"], capture_output=True, text=True).stdout.strip()
    cg = subprocess.run(["docker", "info", "-f", "{{.CgroupVersion}}"], capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem, 1), "kernel": platform.release(),
        "docker": f"{docker} (cgroup v{cg})", "python": platform.python_version(),
        "date": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
    }


def run_kernelbox_density(R):
    kb = Kernelbox(pool=0)
    kb.start()
    try:
        kb.wait_trees(["python"])
        time.sleep(1)
        R["kb_rss_0"] = kb.server_rss()
        # --- density on a pool-less service: memory_mb 128, bounded concurrency
        loadavg("w4 kernelbox density")
        created = []
        R["w4_kb"] = {"rss": {0: R["kb_rss_0"]}}
        for target in DENSITY:
            log(f"w4 kernelbox: {target} sessions")
            ids, s = create_many(lambda: kb.create({"language": "python", "memory_mb": 128}), target - len(created))
            created += ids
            R["w4_kb"][f"create_{target}"] = s
            time.sleep(3)
            R["w4_kb"]["rss"][target] = kb.server_rss()
            R["w4_kb"].setdefault("alive", {})[target] = len(created)
            if target == DENSITY[0]:
                R["w4_kb"]["mem"] = mem_report(session_memory(kb.containers(created)))
        R["w4_kb"]["sessions_reached"] = len(created)
        log(f"w4 kernelbox: `1+1` in each of the {len(created)} sessions")
        R["w4_kb"]["execute_all"] = w3_concurrent([(lambda s=s: kb.execute(s)) for s in created], 1)
        R["w4_kb"]["rss_after_execute"] = kb.server_rss()
        log("w4 kernelbox: deleting")
        t0 = time.perf_counter()
        delete_many(kb.delete, created)
        R["w4_kb"]["delete_s"] = time.perf_counter() - t0
    finally:
        kb.stop()


def lang_start(kb, name, n, pooled):
    create = lambda: kb.create({"language": name})  # noqa: E731
    execute = lambda sid: kb.execute(sid, FIRST_CELL[name])  # noqa: E731
    before = (lambda: kb.wait_pool_full(name)) if pooled else None
    return w1_start(create, execute, kb.delete, n, before=before)


def run_kernelbox(R):
    # --- cold, without runtime trees: every session reads its image's files (the service before trees)
    kb = Kernelbox(pool=0, trees=False)
    kb.start()
    try:
        R["w1_kb_cold_image"] = {}
        for name, _, _ in LANGS:
            log(f"w1 kernelbox cold, no tree: {name}")
            loadavg(f"w1 kernelbox cold no tree {name}")
            R["w1_kb_cold_image"][name] = lang_start(kb, name, N_COLD if name == "python" else N_LANG, pooled=False)
    finally:
        kb.stop()

    # --- cold: no pool; every language's runtime tree made first (kept across runs in KB_RUNTIMES)
    kb = Kernelbox(pool=0)
    kb.start()
    try:
        log("kernelbox: runtime trees")
        R["trees_s"] = kb.wait_trees()
        loadavg("w1 kernelbox cold")
        log("w1 kernelbox cold")
        phases = ("container", "connect", "ready")
        sums = lambda: {p: (kb.metrics(f'kernelbox_boot_phase_seconds_sum{{phase="{p}"}}'),  # noqa: E731
                            kb.metrics(f'kernelbox_boot_phase_seconds_count{{phase="{p}"}}')) for p in phases}
        before = sums()
        R["w1_kb_cold"] = w1_start(kb.create, kb.execute, kb.delete, N_COLD)
        after = sums()
        # Where a cold python start goes, from the service's own histogram: mean ms per phase.
        R["w1_kb_cold_phases"] = {p: (after[p][0] - before[p][0]) * 1000 / max(1, after[p][1] - before[p][1])
                                  for p in phases}
        R["w1_kb_cold_lang"] = {"python": R["w1_kb_cold"]}
        for name, _, _ in LANGS[1:]:
            log(f"w1 kernelbox cold {name}")
            R["w1_kb_cold_lang"][name] = lang_start(kb, name, N_LANG, pooled=False)
        R["w1_kb_tree_boots"] = kb.metrics('kernelbox_runtime_tree_boots_total{language="python",files="tree"}')
        R["w1_kb_image_boots"] = kb.metrics('kernelbox_runtime_tree_boots_total{language="python",files="image"}')
    finally:
        kb.stop()

    # --- burst against the default adaptive pool (python=2..8)
    kb = Kernelbox(pool="python=2..8")
    kb.start()
    try:
        kb.wait_pool_full()
        log(f"w5 kernelbox burst: {BURST_RATE}/s for {BURST_S:.0f} s")
        loadavg("w5 kernelbox burst")
        R["w5_kb"] = w5_burst(kb, "python", BURST_RATE, BURST_S)
    finally:
        kb.stop()

    # --- pooled: every language has a pool
    kb = Kernelbox(pool=POOLED_ALL)
    kb.start()
    try:
        log("w1 kernelbox pooled: waiting for the pools")
        for name, _, _ in LANGS:
            kb.wait_pool_full(name)
        hits0, miss0 = kb.metrics("kernelbox_pool_hits_total"), kb.metrics("kernelbox_pool_misses_total")
        loadavg("w1 kernelbox pooled")
        R["w1_kb_pool"] = w1_start(kb.create, kb.execute, kb.delete, N_POOLED, before=kb.wait_pool_full)
        R["w1_kb_pool"]["pool_hits"] = kb.metrics("kernelbox_pool_hits_total") - hits0
        R["w1_kb_pool"]["pool_misses"] = kb.metrics("kernelbox_pool_misses_total") - miss0
        R["w1_kb_pool"]["pool_size"] = POOL
        R["w1_kb_pool_lang"] = {"python": R["w1_kb_pool"]}
        for name, _, _ in LANGS[1:]:
            log(f"w1 kernelbox pooled {name}")
            R["w1_kb_pool_lang"][name] = lang_start(kb, name, N_LANG, pooled=True)

        log("w2 kernelbox")
        sid = kb.create()
        loadavg("w2 kernelbox")
        R["w2_kb"] = w2_rtt(lambda: kb.execute(sid), N_RTT)
        # The same session through the other protocols kernelbox speaks: the Jupyter gateway's WebSocket
        # (the client Kernel Gateway gets, plain) and MCP (the reference client, `execute` tool).
        log("w2 kernelbox websocket")
        ws = KgSocket(KB_PORT, kernel_id(sid), quickack=False)
        R["w2_kb_ws"] = w2_rtt(ws.execute, N_RTT)
        ws.close()
        log("w2 kernelbox mcp")
        R["w2_kb_mcp"] = mcp_rtt(sid, N_RTT)
        kb.delete(sid)

        for n in (8, 64):
            log(f"w3 kernelbox {n}x50")
            kb.wait_pool_full()
            ids, _ = create_many(kb.create, n, conc=min(n, 4))
            loadavg(f"w3 kernelbox {n}x50")
            R[f"w3_kb_{n}"] = w3_concurrent([(lambda s=s: kb.execute(s)) for s in ids], 50)
            R[f"w3_kb_{n}"]["create_errors"] = n - len(ids)
            delete_many(kb.delete, ids)
    finally:
        kb.stop()


def run_kernelbox_gvisor(R):
    """gVisor (runsc, as the engine has it registered) beside runc on one service (`--session-runtimes runsc`),
    each measured the same way one after the other: cold starts, the `1+1` round trip, 8 sessions x 50
    executes, and the PSS of idle sessions (`memory_mb` 128)."""
    out = subprocess.run(["docker", "info", "--format", "{{json .Runtimes}}"], capture_output=True, text=True)
    runtimes = json.loads(out.stdout or "{}")
    if "runsc" not in runtimes:
        raise RuntimeError("gVisor (runsc) is not registered with the Docker engine: see the README's "
                           "\"Sessions under gVisor\" (scripts/test registers it as root)")
    kb = Kernelbox(pool=0, extra=["--session-runtimes", "runsc"])
    kb.start()
    G = R["gvisor"] = {"args": runtimes["runsc"].get("runtimeArgs", [])}
    try:
        kb.wait_trees(["python"])
        for rt in ("runc", "runsc"):
            body = {"language": "python", "runtime": rt}
            create = lambda body=body: kb.create(body)  # noqa: E731
            log(f"gvisor: cold starts under {rt}")
            loadavg(f"gvisor cold {rt}")
            G[f"cold_{rt}"] = w1_start(create, kb.execute, kb.delete, N_COLD)
            log(f"gvisor: round trip under {rt}")
            sid = create()
            G[f"rtt_{rt}"] = w2_rtt(lambda: kb.execute(sid), N_RTT)
            kb.delete(sid)
            log(f"gvisor: 8x50 under {rt}")
            ids, _ = create_many(create, 8, conc=4)
            G[f"w3_8_{rt}"] = w3_concurrent([(lambda s=s: kb.execute(s)) for s in ids], 50)
            delete_many(kb.delete, ids)
            log(f"gvisor: {N_GV_IDLE} idle sessions under {rt}")
            ids, s = create_many(lambda rt=rt: kb.create({"language": "python", "runtime": rt, "memory_mb": 128}),
                                 N_GV_IDLE)
            time.sleep(3)
            G[f"idle_{rt}"] = mem_report(session_memory(kb.containers(ids)))
            G[f"idle_create_{rt}"] = s
            delete_many(kb.delete, ids)
    finally:
        kb.stop()


def run_host_floor(R):
    """Workload 2 against ipykernel on the host (the bench venv's, the image's version): no container."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    record_pid(km.provisioner.process.pid)
    try:
        loadavg("w2 host")
        log("w2 host ipykernel")
        R["w2_host"] = w2_rtt(lambda: floor_execute(kc), N_RTT)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def run_floor(R):
    run_host_floor(R)
    fl = Floor()
    try:
        log("floor: cold starts")
        starts = []
        for _ in range(5):
            kc, cid, dt = fl.start()
            starts.append(dt)
            fl.stop(kc, cid)
        R["w1_floor"] = summary(starts)
        kc, cid, _ = fl.start()
        loadavg("w2 floor")
        log("w2 floor")
        R["w2_floor"] = w2_rtt(lambda: floor_execute(kc), N_RTT)
        fl.stop(kc, cid)
    finally:
        fl.stop()


def run_kg(R, venv):
    kg = Gateway(venv)
    kg.start()
    try:
        time.sleep(1)
        R["kg_rss_0"] = kg.server_rss()

        log("w1 KG")
        loadavg("w1 KG")
        R["w1_kg"] = w1_start(kg.create, kg.execute_new, kg.delete, N_COLD)

        kid = kg.create()
        for qa in (False, True):
            s = kg.socket(kid, quickack=qa)
            log(f"w2 KG quickack={qa}")
            loadavg(f"w2 KG quickack={qa}")
            R[f"w2_kg_{'qa' if qa else 'nagle'}"] = w2_rtt(s.execute, N_RTT)
            s.close()
        kg.delete(kid)

        for n in (8, 64):
            ids, _ = create_many(kg.create, n, conc=min(n, 4))
            for qa in (False, True) if n == 8 else (True,):
                socks = []
                for k in ids:
                    # A kernel KG cannot keep (it lost a port race: "Address already in use") counts as
                    # 50 failed executes, not as the end of the run.
                    try:
                        # 60 s to come up: KG "nudges" a kernel that lost its ports for ever.
                        s = kg.socket(k, quickack=qa, timeout=60)
                        s.execute()
                        s.ws.settimeout(600)
                        socks.append(s)
                    except Exception as e:  # noqa: BLE001
                        log("KG kernel unusable:", str(e)[:200])
                log(f"w3 KG {n}x50 quickack={qa}")
                loadavg(f"w3 KG {n}x50 quickack={qa}")
                key = f"w3_kg_{n}_{'qa' if qa else 'nagle'}"
                R[key] = w3_concurrent([s.execute for s in socks], 50)
                R[key]["create_errors"] = n - len(ids)
                R[key]["errors"] += (n - len(socks)) * 50
                for s in socks:
                    s.close()
            delete_many(kg.delete, ids)

    finally:
        kg.stop()


def run_kg_density(R, venv):
    kg = Gateway(venv)
    kg.start()
    try:
        time.sleep(1)
        R["kg_rss_0"] = kg.server_rss()

        loadavg("w4 KG density")
        created = []
        R["w4_kg"] = {"rss": {0: R["kg_rss_0"]}}
        for target in KG_DENSITY:
            log(f"w4 KG: {target} kernels")

            def create_ready():
                k = kg.create()
                kg.execute_new(k)  # the kernel is up (as a kernelbox session is when its create returns)
                return k

            ids, s = create_many(create_ready, target - len(created))
            created += ids
            R["w4_kg"][f"create_{target}"] = s
            time.sleep(3)
            R["w4_kg"]["rss"][target] = kg.server_rss()
            R["w4_kg"].setdefault("alive", {})[target] = len(created)
            if target == KG_DENSITY[0]:
                per = []
                for pid in kg.kernel_pids():
                    r = smaps_rollup(pid)
                    if r:
                        per.append({"ipykernel": {"pss": r.get("Pss", 0), "rss": r.get("Rss", 0),
                                                  "pss_anon": r.get("Pss_Anon", 0), "pss_file": r.get("Pss_File", 0),
                                                  "count": 1}})
                R["w4_kg"]["mem"] = mem_report(per)
        R["w4_kg"]["sessions_reached"] = len(created)
        delete_many(kg.delete, created)
    finally:
        kg.stop()


# ---------------------------------------------------------------- the report


def f(x, unit="ms", nd=1):
    if x is None or (isinstance(x, float) and x != x):
        return "—"
    return f"{x:,.{nd}f} {unit}".strip()


def render(R):
    M = R["machine"]
    L = []
    w = L.append
    w(f"Run {M['date']}, commit `{M['commit']}`: {M['cpu']}, {M['cores']} cores, {M['mem_gib']} GiB, Linux "
      f"{M['kernel']}, Docker {M['docker']}, host Python {M['python']} (KG and the floor client: the pinned versions in "
      f"`bench/requirements.txt`, the same ipykernel {R.get('ipykernel', '?')} as the image). Load average "
      f"(1/5/15 min) at the start: {R['load_start']}; at the end: {R['load_end']}. Took {R['took_s'] / 60:.1f} min.")
    w("")
    w("| # | workload | system | p50 | p95 | throughput | n | errors |")
    w("|---|---|---|---|---|---|---|---|")

    def row(num, name, system, s, unit="/s", thr_nd=1):
        if not s:
            w(f"| {num} | {name} | {system} | not run | | | | |")
            return
        w(f"| {num} | {name} | {system} | {f(s['p50_ms'])} | {f(s['p95_ms'])} | "
          f"{f(s['throughput_per_s'], unit, thr_nd)} | {s['n']} | {s['errors']} |")

    row(1, "start → first `1+1` done, cold", "kernelbox (`--pool none`)", R.get("w1_kb_cold"), "starts/s", 2)
    p = R.get("w1_kb_pool")
    row(1, f"start → first `1+1` done, pooled", f"kernelbox (`--pool python={POOL}`, {int(p['pool_hits']) if p else 0} hits, "
        f"{int(p['pool_misses']) if p else 0} misses)", p, "starts/s", 2)
    row(1, "start → first `1+1` done", "Kernel Gateway (new kernel + WebSocket)", R.get("w1_kg"), "starts/s", 2)
    row(1, "`docker run` → kernel_info → `1+1` done", "floor: ipykernel in the image, no kernelbox", R.get("w1_floor"), "starts/s", 2)
    for name, _, code in LANGS:
        cold, pooled, image = ((R.get(k) or {}).get(name) for k in ("w1_kb_cold_lang", "w1_kb_pool_lang", "w1_kb_cold_image"))
        row(1, f"{name}: start → `{code}` done, cold, runtime tree", "kernelbox (`--pool none`)", cold, "starts/s", 2)
        row(1, f"{name}: start → `{code}` done, cold, image's files", "kernelbox (`--runtimes-dir none`)", image, "starts/s", 2)
        if name != "python":
            row(1, f"{name}: start → `{code}` done, pooled", "kernelbox (pool of 2)", pooled, "starts/s", 2)
    row(2, f"`1+1` round trip, {N_RTT} sequential", "kernelbox (HTTP JSON)", R.get("w2_kb"), "exec/s", 0)
    row(2, f"`1+1` round trip, {N_RTT} sequential", "kernelbox, gateway WebSocket (plain client)", R.get("w2_kb_ws"), "exec/s", 0)
    row(2, f"`1+1` round trip, {N_RTT} sequential", "kernelbox, MCP `execute` (reference client)", R.get("w2_kb_mcp"), "exec/s", 0)
    row(2, f"`1+1` round trip, {N_RTT} sequential", "floor: jupyter_client → ipykernel over ZeroMQ/TCP", R.get("w2_floor"), "exec/s", 0)
    row(2, f"`1+1` round trip, {N_RTT} sequential", "floor: jupyter_client → ipykernel on the host (no container)", R.get("w2_host"), "exec/s", 0)
    row(2, f"`1+1` round trip, {N_RTT} sequential", "Kernel Gateway, plain client (Nagle + delayed ACK)", R.get("w2_kg_nagle"), "exec/s", 0)
    row(2, f"`1+1` round trip, {N_RTT} sequential", "Kernel Gateway, client sets TCP_QUICKACK", R.get("w2_kg_qa"), "exec/s", 0)
    row(3, "8 sessions × 50 `1+1` concurrently", "kernelbox", R.get("w3_kb_8"), "exec/s", 0)
    row(3, "8 sessions × 50 `1+1` concurrently", "Kernel Gateway, plain client", R.get("w3_kg_8_nagle"), "exec/s", 0)
    row(3, "8 sessions × 50 `1+1` concurrently", "Kernel Gateway, TCP_QUICKACK", R.get("w3_kg_8_qa"), "exec/s", 0)
    row(3, "64 sessions × 50 `1+1` concurrently", "kernelbox", R.get("w3_kb_64"), "exec/s", 0)
    row(3, "64 sessions × 50 `1+1` concurrently", "Kernel Gateway, TCP_QUICKACK", R.get("w3_kg_64_qa"), "exec/s", 0)
    for key, system, counts in (("w4_kb", "kernelbox (`memory_mb` 128, cold)", DENSITY), ("w4_kg", "Kernel Gateway", KG_DENSITY)):
        d = R.get(key) or {}
        prev = 0
        for n in counts:
            row(4, f"create idle python sessions {prev + 1}–{n}, {CREATE_CONCURRENCY} at a time", system, d.get(f"create_{n}"), "sessions/s", 2)
            prev = n
    ea = (R.get("w4_kb") or {}).get("execute_all")
    if ea:
        row(4, f"`1+1` in each of the {ea['sessions']} sessions, all at once", "kernelbox", ea, "exec/s", 0)
    b = R.get("w5_kb")
    if b:
        row(5, f"burst: python creates at {b['rate_per_s']:g}/s for {b['seconds']:.0f} s, start → `1+1` done "
            f"(hit rate {b['hit_rate']:.0%}; second half {b['hit_rate_second_half']:.0%}, p50 {f(b['p50_second_half_ms'])}, "
            f"p95 {f(b['p95_second_half_ms'])})", "kernelbox (`--pool python=2..8`)", b, "starts/s", 2)
    w("")
    w("![kernelbox, Kernel Gateway and the floors side by side](benchmarks.png)")
    w("")

    # memory
    w("**Density** (workload 4). PSS per idle python session, median over the sessions present at "
      f"{DENSITY[0] if DENSITY else '?'} sessions (PSS shares a page among the processes that map it, so it "
      "depends on how many sessions run side by side), MiB:")
    w("")
    w("| system | process | count | PSS | of it anonymous | of it file | RSS |")
    w("|---|---|---|---|---|---|---|")
    for key, system in (("w4_kb", "kernelbox"), ("w4_kg", "Kernel Gateway")):
        m = (R.get(key) or {}).get("mem")
        if not m:
            w(f"| {system} | not measured | | | | | |")
            continue
        for k, v in m["kinds"].items():
            w(f"| {system} | {k} | {v['count']:g} | {v['pss']:.1f} | {v['pss_anon']:.1f} | {v['pss_file']:.1f} | {v['rss']:.1f} |")
        w(f"| {system} | **total per session** | | **{m['total_pss_mib_median']:.1f}** (p95 {m['total_pss_mib_p95']:.1f}) | | | |")
    w("")
    w("| server's own VmRSS | " + " | ".join(f"{n} sessions" for n in [0] + DENSITY) + " |")
    w("|---|" + "---|" * (1 + len(DENSITY)))
    for key, system in (("w4_kb", "kernelbox"), ("w4_kg", "Kernel Gateway")):
        d = (R.get(key) or {}).get("rss", {})
        alive = (R.get(key) or {}).get("alive", {})

        def cell(n):
            v = f(d.get(n), "MiB")
            if n and alive.get(n) is not None and alive[n] != n:
                v += f" (only {alive[n]} reached)"
            if n and n not in d:
                v = "not run"
            return v
        w(f"| {system} | " + " | ".join(cell(n) for n in [0] + DENSITY) + " |")
    w("")

    # gVisor
    G = R.get("gvisor")
    if G:
        w(f"**gVisor** (runsc `{' '.join(G.get('args', []))}`) beside runc, one service (`--session-runtimes runsc`), "
          "python, the same workloads one after the other:")
        w("")
        w("| workload | runtime | p50 | p95 | throughput | n | errors |")
        w("|---|---|---|---|---|---|---|")
        for key, name, unit, nd in (("cold", "start → first `1+1` done, cold", "starts/s", 2),
                                    ("rtt", f"`1+1` round trip, {N_RTT} sequential", "exec/s", 0),
                                    ("w3_8", "8 sessions × 50 `1+1` concurrently", "exec/s", 0)):
            for rt in ("runc", "runsc"):
                s_ = G.get(f"{key}_{rt}")
                if s_:
                    w(f"| {name} | {rt} | {f(s_['p50_ms'])} | {f(s_['p95_ms'])} | {f(s_['throughput_per_s'], unit, nd)} | "
                      f"{s_['n']} | {s_['errors']} |")
        w("")
        w("| PSS per idle python session (`memory_mb` 128), MiB | runtime | process | count | PSS | RSS |")
        w("|---|---|---|---|---|---|")
        for rt in ("runc", "runsc"):
            m = G.get(f"idle_{rt}")
            if not m:
                continue
            for k, v in m["kinds"].items():
                w(f"| | {rt} | {k} | {v['count']:g} | {v['pss']:.1f} | {v['rss']:.1f} |")
            w(f"| median of {m['sessions']} | {rt} | **total per session** | | **{m['total_pss_mib_median']:.1f}** "
              f"(p95 {m['total_pss_mib_p95']:.1f}) | |")
        w("")

    # targets
    def g(k, f_):
        return (R.get(k) or {}).get(f_)

    tg = []
    kg50 = g("w1_kg", "p50_ms")
    cold = R.get("w1_kb_cold_lang") or {}
    image = R.get("w1_kb_cold_image") or {}

    def c50(d, name):
        return (d.get(name) or {}).get("p50_ms")

    py50 = c50(cold, "python")
    if py50 and kg50:
        tg.append(("cold start → first `1+1`, python, p50 ≤ Kernel Gateway's", f"{f(py50)} vs {f(kg50)}", py50 <= kg50))
    sci50 = c50(cold, "python_scientific")
    if sci50 and py50:
        tg.append(("cold start, python_scientific with `import pandas` ≤ 2× python's", f"{f(sci50)} ({sci50 / py50:.1f}×)", sci50 <= 2 * py50))
    for name in ("java", "javascript", "bash"):
        now, before = c50(cold, name), c50(image, name)
        if now and before:
            tg.append((f"cold start, {name}, ≤ 60% of the image's files (`--runtimes-dir none`, this run)",
                       f"{f(now)} vs {f(before)} ({now / before:.0%})", now <= 0.6 * before))
    m = (R.get("w4_kb") or {}).get("mem")
    if m:
        tg.append((f"PSS per idle python session at {DENSITY[0]} sessions ≤ 30 MiB", f(m["total_pss_mib_median"], "MiB"),
                   m["total_pss_mib_median"] <= 30))
    d4 = R.get("w4_kb") or {}
    top = DENSITY[-1] if DENSITY else None
    if top and d4.get("execute_all"):
        ea, rss = d4["execute_all"], d4.get("rss_after_execute")
        ok = d4.get("sessions_reached") == top and ea["errors"] == 0 and rss is not None and rss <= 64
        tg.append((f"{top} idle python sessions created and executing, service RSS ≤ 64 MiB",
                   f"{d4.get('sessions_reached')} sessions, {ea['errors']} errors, {f(rss, 'MiB')}", ok))
    b = R.get("w5_kb")
    if b:
        ok = b["hit_rate_second_half"] >= 0.9 and b["p95_second_half_ms"] <= 50
        tg.append((f"burst at {b['rate_per_s']:g}/s: hit rate ≥ 90% with p95 start ≤ 50 ms once adapted (second half)",
                   f"{b['hit_rate_second_half']:.0%}, p95 {f(b['p95_second_half_ms'])}", ok))
    kb2, host2 = g("w2_kb", "p50_ms"), g("w2_host", "p50_ms")
    if kb2 and host2:
        tg.append(("`1+1` round trip ≤ 1.0× a local jupyter_client → ipykernel (p50)", f"{kb2 / host2:.2f}× ({f(kb2, 'ms', 2)} vs {f(host2, 'ms', 2)})", kb2 <= host2))
    t3, k3n, k3q = g("w3_kb_8", "throughput_per_s"), g("w3_kg_8_nagle", "throughput_per_s"), g("w3_kg_8_qa", "throughput_per_s")
    if t3 and k3n:
        tg.append(("8×50 throughput ≥ 3× Kernel Gateway's (plain client)", f"{t3 / k3n:.1f}×", t3 / k3n >= 3))
    if t3 and k3q:
        tg.append(("8×50 throughput ≥ 1.5× Kernel Gateway's (quick-ACK client)", f"{t3 / k3q:.1f}×", t3 / k3q >= 1.5))
    pool50, pool95 = g("w1_kb_pool", "p50_ms"), g("w1_kb_pool", "p95_ms")
    if pool50 and kg50:
        tg.append(("pooled start ≥ 15× faster than Kernel Gateway's cold start (p50)", f"{kg50 / pool50:.1f}× ({f(pool50)}, p95 {f(pool95)})", kg50 / pool50 >= 15))
    e64 = g("w3_kb_64", "errors")
    if e64 is not None:
        tg.append(("64×50 without an error", f"{e64 + g('w3_kb_64', 'create_errors')} errors", e64 + g("w3_kb_64", "create_errors") == 0))
    w("| target | this run | met? |")
    w("|---|---|---|")
    for name, fig, ok in tg:
        w(f"| {name} | {fig} | {'yes' if ok else '**missed**'} |")
    w("")
    # extra detail
    extra = []
    for key, label in (("w1_kb_cold", "kernelbox cold"), ("w1_kb_pool", "kernelbox pooled"), ("w1_kg", "KG")):
        s = R.get(key)
        if s:
            extra.append(f"{label}: create {f(s['create_p50_ms'])} + first execute {f(s['first_execute_p50_ms'])}")
    w("Start split at p50 (create call returned / first execute): " + "; ".join(extra) + ".")
    ph = R.get("w1_kb_cold_phases")
    if ph:
        w("")
        w(f"Where a cold python start goes (means over the cold starts, the service's `kernelbox_boot_phase_seconds`): "
          f"the container's create and start {f(ph['container'])}, the kernel's boot until its four connections are in "
          f"{f(ph['connect'])}, its first answers (kernel_info, IOPub) {f(ph['ready'])}; the rest of the create call "
          f"is the API, the run directory and the registry.")
    if R.get("trees_s") is not None:
        w("")
        w(f"Runtime trees: ready for every language {R['trees_s']:.0f} s after the cold service started (copied once per "
          f"image content, kept across runs); python boots in the cold phase: {R.get('w1_kb_tree_boots', 0):.0f} over the "
          f"tree, {R.get('w1_kb_image_boots', 0):.0f} from the image's files.")
    w("")
    w("Load average along the run: " + "; ".join(f"{a} {b}" for a, b in LOADS) + ".")
    return "\n".join(L)


def chart(R, path):
    """The side-by-side figures at a glance: starts per language, round trip, throughput, memory."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def g(k, f_="p50_ms"):
        return (R.get(k) or {}).get(f_)

    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    names = [name for name, _, _ in LANGS]
    x = range(len(names))
    series = [("kernelbox pooled", "w1_kb_pool_lang", "#2b8a3e"), ("kernelbox cold", "w1_kb_cold_lang", "#1c7ed6"),
              ("kernelbox cold, image's files", "w1_kb_cold_image", "#a5d8ff")]
    width = 0.2
    for i, (label, key, color) in enumerate(series):
        vals = [((R.get(key) or {}).get(n) or {}).get("p50_ms") or 0 for n in names]
        ax[0][0].bar([j + (i - 1.5) * width for j in x], vals, width, label=label, color=color)
    kg = [g("w1_kg") or 0 if n == "python" else 0 for n in names]
    ax[0][0].bar([j + 1.5 * width for j in x], kg, width, label="Kernel Gateway (python)", color="#e8590c")
    ax[0][0].set_xticks(list(x), [n.replace("_", "\n") for n in names])
    ax[0][0].set_ylabel("ms, p50")
    ax[0][0].set_yscale("log")
    ax[0][0].set_title("start → first cell done")
    ax[0][0].legend(fontsize=8)

    def bars(a, items, title, unit):
        labels = [l for l, _, _ in items]
        vals = [v or 0 for _, v, _ in items]
        a.barh(labels, vals, color=[c for _, _, c in items])
        for i, v in enumerate(vals):
            a.text(v, i, f" {v:,.2f}" if v < 10 else f" {v:,.0f}", va="center", fontsize=8)
        a.set_title(title)
        a.set_xlabel(unit)
        a.invert_yaxis()

    bars(ax[0][1], [("kernelbox HTTP", g("w2_kb"), "#1c7ed6"), ("kernelbox WebSocket", g("w2_kb_ws"), "#1c7ed6"),
                    ("host: jupyter_client → ipykernel", g("w2_host"), "#868e96"),
                    ("floor: ipykernel in a container", g("w2_floor"), "#868e96"),
                    ("Kernel Gateway, quick-ACK", g("w2_kg_qa"), "#e8590c"),
                    ("Kernel Gateway, plain", g("w2_kg_nagle"), "#e8590c")], "`1+1` round trip, p50", "ms")
    bars(ax[1][0], [("kernelbox", g("w3_kb_8", "throughput_per_s"), "#1c7ed6"),
                    ("Kernel Gateway, quick-ACK", g("w3_kg_8_qa", "throughput_per_s"), "#e8590c"),
                    ("Kernel Gateway, plain", g("w3_kg_8_nagle", "throughput_per_s"), "#e8590c")],
         "8 sessions × 50 `1+1` concurrently", "executes/s")
    kbm, kgm = (R.get("w4_kb") or {}).get("mem") or {}, (R.get("w4_kg") or {}).get("mem") or {}
    bars(ax[1][1], [("kernelbox (container, runtime tree)", kbm.get("total_pss_mib_median"), "#1c7ed6"),
                    ("Kernel Gateway (a process)", kgm.get("total_pss_mib_median"), "#e8590c")],
         f"idle python session, PSS at {DENSITY[0] if DENSITY else 0} sessions", "MiB")
    M = R["machine"]
    fig.suptitle(f"kernelbox vs Kernel Gateway, one run ({M['date']}, commit {M['commit']}, {M['cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_md(R):
    path = os.path.join(REPO, "bench", "BENCHMARKS.md")
    begin, end = "<!-- results:begin (written by bench/run) -->", "<!-- results:end -->"
    body = render(R)
    try:
        text = open(path).read()
    except OSError:
        text = ""
    if begin in text and end in text:
        pre = text.split(begin)[0]
        post = text.split(end, 1)[1]
        text = pre + begin + "\n" + body + "\n" + end + post
    else:
        text = "# kernelbox benchmarks\n\n`bench/run` (one command) writes the section below.\n\n" + begin + "\n" + body + "\n" + end + "\n"
    with open(path, "w") as fh:
        fh.write(text)
    log("wrote", path)


def main():
    out_json = sys.argv[1]
    venv = ENV["KB_VENV"]
    R = {"machine": machine(), "load_start": loadavg("start")}
    try:
        import ipykernel
        R["ipykernel"] = ipykernel.__version__
    except ImportError:
        pass
    t0 = time.time()
    only = set(ENV.get("KB_BENCH_ONLY", "kernelbox,gvisor,floor,kg").split(","))
    failures = []
    # The long memory phase first, then the latency workloads of the three close together in time.
    for name, fn in (("kernelbox", lambda: run_kernelbox_density(R)), ("kg", lambda: run_kg_density(R, venv)),
                     ("kernelbox", lambda: run_kernelbox(R)), ("gvisor", lambda: run_kernelbox_gvisor(R)),
                     ("floor", lambda: run_floor(R)), ("kg", lambda: run_kg(R, venv))):
        if name not in only:
            continue
        try:
            fn()
        except Exception as e:  # noqa: BLE001  (report what ran; the run fails at the end)
            import traceback
            traceback.print_exc()
            failures.append(f"{name}: {e}")
        with open(out_json, "w") as fh:
            json.dump(R, fh, indent=1, default=str)
    R["load_end"] = loadavg("end")
    R["took_s"] = time.time() - t0
    R["failures"] = failures
    with open(out_json, "w") as fh:
        json.dump(R, fh, indent=1, default=str)
    if ENV.get("KB_BENCH_WRITE", "1") == "1":
        write_md(R)
        chart(R, os.path.join(REPO, "bench", "benchmarks.png"))
    print(render(R))
    if failures:
        log("FAILED:", failures)
        sys.exit(1)


if __name__ == "__main__":
    main()
