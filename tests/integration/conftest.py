"""Fixtures for the FreeRelay integration tests.

Real processes only: mock providers are the `freerelay-mock` binary (one per provider), the
gateway is the real component run by `freerelay up`. Clients are the official `openai` SDK (every
chat test), httpx (raw protocol checks) and LangChain.

Run: scripts/build && cargo build --release -p freerelay-cli -p freerelay-testkit
     .venv/bin/pytest tests/integration
"""

from __future__ import annotations

import atexit
import hashlib
import os
import queue
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import httpx
import pytest
from openai import OpenAI

REPO = Path(__file__).resolve().parents[2]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
RUNNER_BIN = Path(os.environ.get("FREERELAY_BIN", TARGET / "release" / "freerelay"))
MOCK_BIN = Path(os.environ.get("FREERELAY_MOCK_BIN", TARGET / "release" / "freerelay-mock"))
WASM = Path(os.environ.get(
    "FREERELAY_WASM", REPO / "components" / "target" / "wasm32-wasip2" / "release" / "freerelay_gateway.wasm"))
MANIFEST = REPO / "spin.toml"

START_TIMEOUT_S = float(os.environ.get("FREERELAY_START_TIMEOUT", "90"))

PROVIDERS = ["groq", "gemini", "openrouter", "cerebras", "mistral", "nvidia", "together", "openai",
             "anthropic"]

# Path prefix of each provider's API, as the gateway must call it (Gemini and Anthropic are
# spoken natively: `/v1beta/models/<model>:generateContent`, `/v1/messages`).
API_PATHS = {
    "groq": "/openai/v1",
    "gemini": "/v1beta",
    "openrouter": "/api/v1",
    "cerebras": "/v1",
    "mistral": "/v1",
    "nvidia": "/v1",
    "together": "/v1",
    "openai": "/v1",
    "anthropic": "/v1",
}

DEFAULT_MODELS = {
    "groq": "llama-3.1-8b-instant",
    "gemini": "gemini-3.1-flash-lite",
    "openrouter": "meta-llama/llama-3.3-70b-instruct:free",
}


def _require(path: Path, what: str) -> None:
    if not path.exists():
        pytest.fail(
            f"{what} is missing: {path}\n"
            "Build everything first:  scripts/build && "
            "cargo build --release -p freerelay-cli -p freerelay-testkit",
            pytrace=False,
        )


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _LineReader:
    """Drains a process's stdout on a thread (so the pipe never fills) and keeps every line."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        self._t = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._t.start()

    def _run(self, stream):
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, pattern: re.Pattern, timeout: float) -> re.Match | None:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                line = self._q.get(timeout=remaining)
            except queue.Empty:
                return None
            if line is None:
                return None
            m = pattern.search(line)
            if m:
                return m


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


# The runner keeps the compiled component in `<state-dir>/cache/<digest>.cwasm` (its name covers
# the .wasm and the engine, so a stale one is never used). A fresh state dir would compile the
# component again (~2.5 s a gateway); every gateway of the session is given the first compile.
_COMPILE_CACHE: Path | None = None


def _seed_compile_cache(state_dir: Path) -> None:
    if _COMPILE_CACHE is None:
        return
    dest = state_dir / "cache"
    for f in _COMPILE_CACHE.glob("*.cwasm"):
        if not (dest / f.name).exists():
            dest.mkdir(parents=True, exist_ok=True)
            tmp = dest / (f.name + ".seed.tmp")
            shutil.copyfile(f, tmp)
            tmp.replace(dest / f.name)


def _keep_compile_cache(state_dir: Path) -> None:
    global _COMPILE_CACHE
    if _COMPILE_CACHE is None:
        _COMPILE_CACHE = Path(tempfile.mkdtemp(prefix="freerelay-cwasm-"))
        atexit.register(shutil.rmtree, _COMPILE_CACHE, True)
    for f in (state_dir / "cache").glob("*.cwasm"):
        if not (_COMPILE_CACHE / f.name).exists():
            tmp = _COMPILE_CACHE / (f.name + ".tmp")
            shutil.copyfile(f, tmp)
            tmp.replace(_COMPILE_CACHE / f.name)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SPIN_VARIABLE_")}


# ---------------------------------------------------------------------------------------------
# Mock providers


class Mock:
    """One `freerelay-mock` process standing in for a provider.

    It speaks OpenAI chat completions (`…/chat/completions`), Anthropic Messages (`…/messages`)
    and Gemini (`…/models/{model}:generateContent`, `:streamGenerateContent`) on one port.
    `keys`: how many provider keys it accepts (random ones), or the keys themselves; `self.key`
    is the first, `self.keys` all of them. `reject_prefill` (Anthropic: no trailing assistant
    message) and `reject_stream_options` (OpenAI: 422 to any `stream_options`, as Mistral) turn on
    the mock's stricter checks; `args` are further command-line arguments.
    """

    def __init__(self, name: str, log_dir: Path, *, keys: int | list[str] | tuple[str, ...] = 1,
                 reject_prefill: bool = False, reject_stream_options: bool = False,
                 args: list[str] | tuple[str, ...] = ()):
        _require(MOCK_BIN, "The mock provider binary (freerelay-mock)")
        self.name = name
        if isinstance(keys, int):
            keys = [f"prov-secret-{name}-{secrets.token_hex(12)}" for _ in range(max(keys, 1))]
        self.keys = list(keys)
        self.key = self.keys[0]
        cmd = [str(MOCK_BIN), "--listen", "127.0.0.1:0", "--name", name]
        cmd += [f"--api-key={k}" for k in self.keys]
        if reject_prefill:
            cmd.append("--reject-prefill")
        if reject_stream_options:
            cmd.append("--reject-stream-options")
        cmd += list(args)
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=open(log_dir / f"mock-{name}.log", "wb"),
            env=_clean_env(),
        )
        self._out = _LineReader(self.proc.stdout)
        m = self._out.wait_for(re.compile(r"listening on (http://\S+)"), 10)
        if not m:
            _stop(self.proc)
            pytest.fail(f"mock {name} did not start: {self._out.lines}", pytrace=False)
        self.url = m.group(1)
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def script(self, *behaviours: dict) -> None:
        r = self.http.post("/_mock/script", json=list(behaviours))
        assert r.status_code == 200, r.text

    def reset(self) -> None:
        self.http.post("/_mock/reset").raise_for_status()

    def requests(self, kind: str | None = None) -> list[dict]:
        """Chat requests received, of every format (OpenAI `chat`, `anthropic`, `gemini`), or
        only those of one `kind`."""
        params = {"kind": kind} if kind else None
        return self.http.get("/_mock/requests", params=params).json()

    def all_requests(self) -> list[dict]:
        """Every request to the provider API: chat, model listings and unknown paths."""
        return self.http.get("/_mock/requests", params={"all": "1"}).json()

    def rules(self, *rules: dict) -> None:
        """Replaces the mock's standing rules (consulted before the script, first match wins):
        `{"model": m?, "contains": text?, "times": n?, "behaviour": {...}}`. `model` is the
        requested model (Gemini: the one in the path), `contains` any substring of the raw
        body; `times` limits the rule to n requests. No rules: every request follows the
        script, then the default answer."""
        r = self.http.post("/_mock/rules", json=list(rules))
        assert r.status_code == 200, r.text

    def fail_model(self, model: str, status: int = 500, times: int | None = None,
                   **behaviour) -> None:
        """Every request for `model` (or the next `times` of them) gets `status` (replaces the
        standing rules)."""
        rule: dict = {"model": model, "behaviour": {"kind": "status", "status": status, **behaviour}}
        if times is not None:
            rule["times"] = times
        self.rules(rule)

    def standing_rules(self) -> list[dict]:
        """The rules left (with the uses left in `times`)."""
        return self.http.get("/_mock/rules").json()

    def release(self, count: int = 1) -> None:
        """Lets `count` answers held by `pause_after_chunks` go on (kept if none waits yet)."""
        r = self.http.post("/_mock/release", json={"count": count})
        assert r.status_code == 200, r.text

    def paused(self) -> int:
        """Answers waiting at their pause right now."""
        return self.http.get("/_mock/paused").json()["paused"]

    def close(self) -> None:
        self.http.close()
        _stop(self.proc)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("freerelay")


@pytest.fixture
def make_mock(tmp_path) -> Iterable[Callable[[str], Mock]]:
    """Starts mocks for one test: `make_mock("groq")`, `make_mock("groq", keys=2)`."""
    mocks: list[Mock] = []

    def make(name: str, **options) -> Mock:
        m = Mock(name, tmp_path, **options)
        mocks.append(m)
        return m

    yield make
    for m in mocks:
        m.close()


# ---------------------------------------------------------------------------------------------
# The gateway, run by `freerelay up`


@dataclass
class Gateway:
    """A `freerelay up` process serving spin.toml with the given providers."""

    state_dir: Path
    env: dict[str, str]
    client_key: str
    log_dir: Path
    url: str = ""
    proc: subprocess.Popen | None = None
    _out: _LineReader | None = None
    _stderr_path: Path | None = None
    _clients: list = field(default_factory=list)
    _starts: int = 0
    # `--runtime-config-file` (e.g. a Redis key-value store shared with other runners).
    runtime_config: Path | None = None
    name: str = "gateway"

    def start(self) -> "Gateway":
        _require(RUNNER_BIN, "The runner binary (freerelay)")
        _require(WASM, "The gateway component (.wasm)")
        self._starts += 1
        self._stderr_path = self.log_dir / f"{self.name}-{self._starts}.stderr.log"
        _seed_compile_cache(self.state_dir)
        cmd = [
            str(RUNNER_BIN), "up", "-f", str(MANIFEST),
            "--listen", "127.0.0.1:0", "--state-dir", str(self.state_dir),
        ]
        if self.runtime_config is not None:
            cmd += ["--runtime-config-file", str(self.runtime_config)]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=open(self._stderr_path, "wb"),
            env=self.env,
            cwd=REPO,
        )
        self._out = _LineReader(self.proc.stdout)
        m = self._out.wait_for(re.compile(r"Serving (http://[^\s/]+)"), START_TIMEOUT_S)
        if not m:
            _stop(self.proc)
            pytest.fail(
                f"`freerelay up` did not print 'Serving http://…' within {START_TIMEOUT_S}s.\n"
                f"stdout: {self._out.lines[-20:]}\nstderr: {self.stderr_tail()}",
                pytrace=False,
            )
        self.url = m.group(1)
        _keep_compile_cache(self.state_dir)
        return self

    def stderr_tail(self, n: int = 4000) -> str:
        if self._stderr_path and self._stderr_path.exists():
            return self._stderr_path.read_text(errors="replace")[-n:]
        return ""

    def stop(self) -> None:
        if self.proc:
            _stop(self.proc)
            self.proc = None

    def restart(self) -> "Gateway":
        """Stops and starts again on the same state dir (the port may change)."""
        self.stop()
        return self.start()

    # clients
    def client(self, key: str | None = None, **kw) -> OpenAI:
        c = OpenAI(
            base_url=f"{self.url}/v1",
            api_key=key if key is not None else self.client_key,
            max_retries=0,
            timeout=kw.pop("timeout", 30),
            **kw,
        )
        self._clients.append(c)
        return c

    def http(self, auth: bool = True, timeout: float = 30) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.client_key}"} if auth else {}
        c = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self._clients.append(c)
        return c

    def stats(self) -> dict:
        with httpx.Client(base_url=self.url, timeout=10) as c:
            r = c.get("/v1/freerelay/stats", headers={"Authorization": f"Bearer {self.client_key}"})
        assert r.status_code == 200, r.text
        return r.json()

    def state(self, key: str | None = None, headers: dict[str, str] | None = None) -> dict:
        """`GET /v1/freerelay/state` as client `key` (default: the first): breakers, AIMD
        limits, budgets, quotas, cache counters."""
        with httpx.Client(base_url=self.url, timeout=10) as c:
            r = c.get("/v1/freerelay/state",
                      headers={"Authorization": f"Bearer {key or self.client_key}", **(headers or {})})
        assert r.status_code == 200, f"/v1/freerelay/state: {r.status_code} {r.text[:500]}"
        return r.json()

    def close(self) -> None:
        for c in self._clients:
            c.close()
        self.stop()


# Edge state a long-lived gateway (the session's shared one, a module's) must not carry from one
# test into the next: a breaker opened by one test's scripted 5xx would answer another's
# request with a 503, a cache entry would answer it without reaching the mock, an AIMD cut would
# send it elsewhere. Such gateways get these (a breaker that never trips, no cache, a window
# that never binds); a dedicated gateway (`make_gateway`), whose state lives and dies with its
# test, keeps the product's defaults.
NEUTRAL_EDGE_STATE = {
    "SPIN_VARIABLE_BREAKER_MIN_SAMPLES": "1000",
    "SPIN_VARIABLE_BREAKER_FAILURE_RATE": "1",
    "SPIN_VARIABLE_CACHE": "off",
    "SPIN_VARIABLE_AIMD_MIN_LIMIT": "100000",
    "SPIN_VARIABLE_AIMD_INITIAL_LIMIT": "100000",
    "SPIN_VARIABLE_AIMD_MAX_LIMIT": "100000",
}


def gateway_env(providers: dict[str, Mock], client_keys: list[str], extra: dict[str, str] | None = None,
                product_edge_defaults: bool = False) -> dict[str, str]:
    """The environment of a gateway serving `providers` to `client_keys`. Unless
    `product_edge_defaults`, its breakers, cache and AIMD windows are neutralised
    (NEUTRAL_EDGE_STATE) for gateways shared between tests; `extra` overrides either way."""
    env = _clean_env()
    if not product_edge_defaults:
        env.update(NEUTRAL_EDGE_STATE)
    env["SPIN_VARIABLE_CLIENT_KEYS"] = ",".join(sha256_hex(k) for k in client_keys)
    for pid, mock in providers.items():
        env[f"SPIN_VARIABLE_{pid.upper()}_BASE_URL"] = mock.url
        env[f"SPIN_VARIABLE_{pid.upper()}_API_KEY"] = mock.key
    # Every provider not given here is unconfigured (no key), whatever the manifest defaults say.
    for pid in PROVIDERS:
        env.setdefault(f"SPIN_VARIABLE_{pid.upper()}_API_KEY", "")
        # The mocks stand in for accounts with room to spare: the catalogue's free-tier limits
        # (Groq's 30 requests a minute…) would otherwise throttle tests that are not about
        # quotas. Quota tests set their own limits through `extra`.
        for kind, roomy in (("RPM", "1000000"), ("RPD", "1000000000"), ("TPM", "1000000000"),
                            ("TPD", "1000000000")):
            env.setdefault(f"SPIN_VARIABLE_{pid.upper()}_{kind}", roomy)
    env.update(extra or {})
    return env


def new_client_key() -> str:
    return "fr-test-" + secrets.token_hex(16)


@pytest.fixture
def make_gateway(tmp_path) -> Iterable[Callable[..., Gateway]]:
    """Starts a dedicated gateway: `make_gateway({"groq": mock}, extra_env={...})`.

    `state_dir` defaults to a fresh directory under the test's tmp_path; `gw.restart()` keeps it.
    `runtime_config`: a Spin runtime config file (`--runtime-config-file`), e.g. from
    `redis_store()`, to share the key-value store with other gateways.
    """
    gateways: list[Gateway] = []

    def make(providers: dict[str, Mock], extra_env: dict[str, str] | None = None,
             state_dir: Path | None = None, client_keys: list[str] | None = None,
             runtime_config: Path | None = None) -> Gateway:
        keys = client_keys or [new_client_key()]
        sd = state_dir or (tmp_path / f"state-{len(gateways)}")
        sd.mkdir(parents=True, exist_ok=True)
        gw = Gateway(state_dir=sd, env=gateway_env(providers, keys, extra_env, product_edge_defaults=True),
                     client_key=keys[0], log_dir=tmp_path, runtime_config=runtime_config,
                     name=f"gateway{len(gateways)}")
        gateways.append(gw)
        return gw.start()

    yield make
    for gw in gateways:
        gw.close()


# ---------------------------------------------------------------------------------------------
# The shared set-up most tests use: groq, gemini and openrouter configured, one gateway for the
# whole session. Tests that change routing state (cool-downs), need special variables or assert
# absolute counters use `make_gateway` instead.


@dataclass
class Shared:
    gateway: Gateway
    mocks: dict[str, Mock]
    second_client_key: str

    @property
    def groq(self) -> Mock:
        return self.mocks["groq"]

    @property
    def gemini(self) -> Mock:
        return self.mocks["gemini"]

    @property
    def openrouter(self) -> Mock:
        return self.mocks["openrouter"]

    def provider_keys(self) -> list[str]:
        return [m.key for m in self.mocks.values()]


@pytest.fixture(scope="session")
def shared_setup(session_dir) -> Iterable[Shared]:
    _require(MOCK_BIN, "The mock provider binary (freerelay-mock)")
    _require(RUNNER_BIN, "The runner binary (freerelay)")
    _require(WASM, "The gateway component (.wasm)")
    mocks = {name: Mock(name, session_dir) for name in ("groq", "gemini", "openrouter")}
    keys = [new_client_key(), new_client_key()]
    state = session_dir / "shared-state"
    state.mkdir()
    gw = Gateway(state_dir=state, env=gateway_env(mocks, keys), client_key=keys[0], log_dir=session_dir)
    try:
        gw.start()
        yield Shared(gateway=gw, mocks=mocks, second_client_key=keys[1])
    finally:
        gw.close()
        for m in mocks.values():
            m.close()


@pytest.fixture
def shared(shared_setup) -> Shared:
    """The shared gateway, with every mock's script and request log cleared."""
    for m in shared_setup.mocks.values():
        m.reset()
    return shared_setup


@pytest.fixture
def gw(shared) -> Gateway:
    return shared.gateway


@pytest.fixture
def client(shared) -> OpenAI:
    return shared.gateway.client()


# ---------------------------------------------------------------------------------------------
# Redis: one `redis-server` for the session, one database per test (`redis_store()`), so that
# several `freerelay up` processes can share the key-value store as edge instances do.

REDIS_DATABASES = 512


@dataclass
class RedisServer:
    proc: subprocess.Popen
    port: int
    log: Path
    _next_db: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def new_db(self) -> int:
        """A database index no other test has used (Spin's Redis store keeps every key at the
        top level of the URL's database, so a fresh one is a fresh store)."""
        with self._lock:
            self._next_db += 1
            if self._next_db >= REDIS_DATABASES:
                pytest.fail(f"more than {REDIS_DATABASES - 1} Redis databases asked for")
            return self._next_db

    def command(self, *args: str, db: int = 0) -> str:
        """One command through redis-cli (for checks and diagnostics)."""
        cli = _which("redis-cli")
        if not cli:
            pytest.fail("redis-cli is missing (it comes with redis-server)", pytrace=False)
        out = subprocess.run([cli, "-p", str(self.port), "-n", str(db), *args],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip()

    def close(self) -> None:
        _stop(self.proc)


def _which(name: str) -> str | None:
    import shutil

    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/bin", "/usr/sbin", "/usr/local/bin"):
        p = Path(d) / name
        if p.exists():
            return str(p)
    return None


@pytest.fixture(scope="session")
def redis_server(session_dir) -> Iterable[RedisServer]:
    """A private `redis-server` on a free loopback port, no persistence. Without the binary the
    tests that need it are skipped, unless FREERELAY_REQUIRE_REDIS=1 (scripts/test), which
    makes that a failure."""
    binary = os.environ.get("FREERELAY_REDIS_SERVER") or _which("redis-server")
    if binary and not Path(binary).exists():
        binary = None
    if not binary:
        msg = ("redis-server not found (install the redis-server package, or set "
               "FREERELAY_REDIS_SERVER)")
        if os.environ.get("FREERELAY_REQUIRE_REDIS") == "1":
            pytest.fail(msg + "; FREERELAY_REQUIRE_REDIS=1 forbids skipping", pytrace=False)
        pytest.skip(msg)
    port = free_port()
    log = session_dir / "redis-server.log"
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--databases", str(REDIS_DATABASES), "--protected-mode", "yes", "--dir", str(session_dir),
         "--logfile", str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=_clean_env(),
    )
    server = RedisServer(proc=proc, port=port, log=log)
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            pytest.fail(f"redis-server exited ({proc.returncode}): "
                        f"{log.read_text(errors='replace')[-2000:] if log.exists() else ''}",
                        pytrace=False)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.close()
            pytest.fail("redis-server did not answer PING within 10 s", pytrace=False)
        time.sleep(0.05)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_store(redis_server, tmp_path) -> Callable[[], Path]:
    """`redis_store()`: a runtime config file whose `default` key-value store is a fresh Redis
    database; give the same file to several gateways (`make_gateway(..., runtime_config=rc)`)
    and they share one store."""
    count = [0]

    def make() -> Path:
        count[0] += 1
        db = redis_server.new_db()
        rc = tmp_path / f"runtime-config-{count[0]}.toml"
        rc.write_text(f'[key_value_store.default]\ntype = "redis"\nurl = "{redis_server.url(db)}"\n')
        return rc

    return make
