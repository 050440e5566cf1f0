//! The Redis key-value backend against a real `redis-server` (one per test, on a free loopback
//! port, killed on drop). Without `redis-server` the tests print a note and pass, unless
//! `FREERELAY_REQUIRE_REDIS=1` (scripts/test sets it), which makes them fail instead.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use freerelay_cli::kv::redis::RedisBackend;
use freerelay_cli::kv::{CasExpectation, KvBackend, KvError, KvStores};

/// A `redis-server` child process.
struct RedisServer {
    child: Child,
    port: u16,
    password: Option<String>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server, or returns `None` (after a note) when `redis-server` is not installed.
    fn start() -> Option<Self> {
        Self::start_with(None)
    }

    fn start_with(password: Option<&str>) -> Option<Self> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            if std::env::var("FREERELAY_REQUIRE_REDIS").is_ok_and(|v| v == "1") {
                panic!(
                    "FREERELAY_REQUIRE_REDIS=1 but redis-server is not installed or not on PATH \
                     (Debian: apt-get install redis-server)"
                );
            }
            eprintln!(
                "note: redis-server is not installed; skipping this Redis test \
                 (set FREERELAY_REQUIRE_REDIS=1 to make that an error)"
            );
            return None;
        }
        // Another test may take the free port between our look and the server's bind: try again.
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let mut server = RedisServer {
                child: spawn(port, password, dir.path()),
                port,
                password: password.map(str::to_string),
                dir,
            };
            if server.wait_ready() {
                return Some(server);
            }
        }
        panic!("redis-server did not start (5 attempts)");
    }

    /// The URL of database `db`.
    fn url(&self, db: u8) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}/{db}", self.port),
            None => format!("redis://127.0.0.1:{}/{db}", self.port),
        }
    }

    /// Waits until the server answers `PING`; false if it exited (port taken) or never answered.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        let client = redis::Client::open(self.url(0)).unwrap();
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            if let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200)) {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Kills the server and starts a new, empty one on the same port.
    fn restart(&mut self) {
        self.stop();
        self.child = spawn(self.port, self.password.as_deref(), self.dir.path());
        assert!(self.wait_ready(), "redis-server did not restart");
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A plain client connection to database `db`, to look at what the backend wrote.
    fn raw(&self, db: u8) -> redis::Connection {
        redis::Client::open(self.url(db))
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(port: u16, password: Option<&str>, dir: &Path) -> Child {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(p) = password {
        cmd.args(["--requirepass", p]);
    }
    cmd.spawn().expect("cannot run redis-server")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let rc = dir.join("runtime-config.toml");
    std::fs::write(&rc, text).unwrap();
    rc
}

fn keys(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn single_key_operations() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let db = RedisBackend::connect(&server.url(0)).unwrap();
    assert_eq!(db.get("default", "k").unwrap(), None);
    assert!(!db.exists("default", "k").unwrap());
    db.set("default", "k", b"v1").unwrap();
    db.set("default", "k", b"v2").unwrap();
    assert_eq!(db.get("default", "k").unwrap().as_deref(), Some(&b"v2"[..]));
    assert!(db.exists("default", "k").unwrap());
    // Binary values and the empty value round-trip.
    db.set("default", "bin", &[0, 159, 146, 150, 255]).unwrap();
    assert_eq!(
        db.get("default", "bin").unwrap().unwrap(),
        vec![0, 159, 146, 150, 255]
    );
    db.set("default", "empty", b"").unwrap();
    assert_eq!(db.get("default", "empty").unwrap(), Some(Vec::new()));
    assert!(db.exists("default", "empty").unwrap());
    assert_eq!(
        keys(db.get_keys("default").unwrap()),
        vec!["bin", "empty", "k"]
    );
    db.delete("default", "k").unwrap();
    db.delete("default", "missing").unwrap();
    assert!(!db.exists("default", "k").unwrap());
    // As in Spin, keys are stored as they are: no label prefix, one database per store.
    let mut raw = server.raw(0);
    let v: Vec<u8> = redis::cmd("GET").arg("bin").query(&mut raw).unwrap();
    assert_eq!(v, vec![0, 159, 146, 150, 255]);
    assert_eq!(
        db.get("another-label", "bin").unwrap(),
        Some(vec![0, 159, 146, 150, 255])
    );
}

#[test]
fn batch_operations_omit_missing_keys() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let db = RedisBackend::connect(&server.url(0)).unwrap();
    db.set_many(
        "default",
        &[
            ("a".into(), b"1".to_vec()),
            ("b".into(), b"2".to_vec()),
            ("c".into(), b"3".to_vec()),
        ],
    )
    .unwrap();
    let got = db
        .get_many(
            "default",
            &["a".into(), "zz".into(), "c".into(), "b".into()],
        )
        .unwrap();
    assert_eq!(
        got,
        vec![
            ("a".into(), b"1".to_vec()),
            ("c".into(), b"3".to_vec()),
            ("b".into(), b"2".to_vec())
        ]
    );
    assert_eq!(
        db.get_many("default", &["x".into(), "y".into()]).unwrap(),
        vec![]
    );
    db.delete_many("default", &["a".into(), "zz".into(), "c".into()])
        .unwrap();
    assert_eq!(db.get_keys("default").unwrap(), vec!["b"]);
    // Empty batches are no-ops (Redis itself rejects MGET/MSET/DEL without keys).
    assert_eq!(db.get_many("default", &[]).unwrap(), vec![]);
    db.set_many("default", &[]).unwrap();
    db.delete_many("default", &[]).unwrap();
    assert_eq!(db.get_keys("default").unwrap(), vec!["b"]);
}

#[test]
fn increment_is_incrby_with_ascii_decimal_values() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let db = RedisBackend::connect(&server.url(0)).unwrap();
    assert_eq!(db.increment("default", "n", 5).unwrap(), 5);
    assert_eq!(db.get("default", "n").unwrap().unwrap(), b"5");
    assert_eq!(db.increment("default", "n", -7).unwrap(), -2);
    assert_eq!(db.get("default", "n").unwrap().unwrap(), b"-2");
    let mut raw = server.raw(0);
    let s: String = redis::cmd("GET").arg("n").query(&mut raw).unwrap();
    assert_eq!(s, "-2");
    // A counter written as ASCII by someone else continues from there.
    db.set("default", "m", b"41").unwrap();
    assert_eq!(db.increment("default", "m", 1).unwrap(), 42);
    // SQLite's 8-byte encoding is not a Redis integer: an error naming Redis, as under Spin.
    db.set("default", "le", &5i64.to_le_bytes()).unwrap();
    match db.increment("default", "le", 1) {
        Err(KvError::Other(m)) => assert!(m.contains("Redis INCRBY"), "{m}"),
        other => panic!("expected an error, got {other:?}"),
    }
    db.set("default", "max", i64::MAX.to_string().as_bytes())
        .unwrap();
    assert!(matches!(
        db.increment("default", "max", 1),
        Err(KvError::Other(_))
    ));
    // The backend still works after error replies (the connection is kept).
    assert_eq!(db.increment("default", "n", 2).unwrap(), 0);
}

#[test]
fn compare_and_swap_semantics() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let db = RedisBackend::connect(&server.url(0)).unwrap();
    // Absent: only an insert succeeds.
    assert!(db
        .swap("default", "k", &CasExpectation::Absent, b"one")
        .unwrap());
    assert!(!db
        .swap("default", "k", &CasExpectation::Absent, b"two")
        .unwrap());
    assert_eq!(db.get("default", "k").unwrap().unwrap(), b"one");
    // Value: only if unchanged.
    assert!(db
        .swap(
            "default",
            "k",
            &CasExpectation::Value(b"one".to_vec()),
            b"two"
        )
        .unwrap());
    assert!(!db
        .swap(
            "default",
            "k",
            &CasExpectation::Value(b"one".to_vec()),
            b"three"
        )
        .unwrap());
    assert_eq!(db.get("default", "k").unwrap().unwrap(), b"two");
    // Value on a missing key fails (the key was deleted since `current`).
    assert!(!db
        .swap(
            "default",
            "gone",
            &CasExpectation::Value(b"x".to_vec()),
            b"y"
        )
        .unwrap());
    assert_eq!(db.get("default", "gone").unwrap(), None);
    // Binary-exact comparison (NUL bytes, non-UTF-8, a prefix is not a match).
    db.set("default", "b", &[0, 255, 0]).unwrap();
    assert!(!db
        .swap("default", "b", &CasExpectation::Value(vec![0, 255]), b"no")
        .unwrap());
    assert!(db
        .swap(
            "default",
            "b",
            &CasExpectation::Value(vec![0, 255, 0]),
            &[1, 0]
        )
        .unwrap());
    assert_eq!(db.get("default", "b").unwrap().unwrap(), vec![1, 0]);
    // Unconditional (Spin when `current` was not called): always writes.
    assert!(db
        .swap("default", "k", &CasExpectation::Unconditional, b"four")
        .unwrap());
    assert_eq!(db.get("default", "k").unwrap().unwrap(), b"four");
    // The script survives a SCRIPT FLUSH (EVALSHA falls back to loading it again).
    let mut raw = server.raw(0);
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query::<()>(&mut raw)
        .unwrap();
    assert!(db
        .swap(
            "default",
            "k",
            &CasExpectation::Value(b"four".to_vec()),
            b"five"
        )
        .unwrap());
}

/// A CAS loop, as a guest does it with `wasi:keyvalue/atomics` (`current` then `swap`).
fn cas_increment(db: &dyn KvBackend, key: &str) -> u32 {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let current = db.get("default", key).unwrap();
        let (expected, n) = match current {
            None => (CasExpectation::Absent, 0u64),
            Some(v) => {
                let n = std::str::from_utf8(&v).unwrap().parse::<u64>().unwrap();
                (CasExpectation::Value(v), n)
            }
        };
        if db
            .swap("default", key, &expected, (n + 1).to_string().as_bytes())
            .unwrap()
        {
            return attempts;
        }
    }
}

#[test]
fn sixteen_threads_of_cas_loops_give_the_exact_total() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let db = Arc::new(RedisBackend::connect(&server.url(0)).unwrap());
    let start = Arc::new(Barrier::new(16));
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (db, start) = (db.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                (0..200).map(|_| cas_increment(&*db, "n")).sum::<u32>()
            })
        })
        .collect();
    let attempts: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(db.get("default", "n").unwrap().unwrap(), b"3200");
    // Contention really happened (otherwise this test would prove nothing).
    assert!(attempts > 3200, "no CAS ever lost ({attempts} attempts)");
}

#[test]
fn sixteen_threads_incrementing_give_the_exact_total() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let db = Arc::new(RedisBackend::connect(&server.url(0)).unwrap());
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let db = db.clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    db.increment("default", "n", 1).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(db.get("default", "n").unwrap().unwrap(), b"3200");
}

#[test]
fn a_concurrent_write_beats_a_stale_expectation() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let a = RedisBackend::connect(&server.url(0)).unwrap();
    let b = RedisBackend::connect(&server.url(0)).unwrap();
    // `a` saw no value, then `b` inserted one: `a`'s insert-only swap loses.
    assert_eq!(a.get("default", "k").unwrap(), None);
    b.set("default", "k", b"from-b").unwrap();
    assert!(!a
        .swap("default", "k", &CasExpectation::Absent, b"from-a")
        .unwrap());
    assert_eq!(a.get("default", "k").unwrap().unwrap(), b"from-b");
    // `a` saw "from-b", then `b` changed it: `a`'s swap loses again.
    let seen = a.get("default", "k").unwrap().unwrap();
    b.set("default", "k", b"newer").unwrap();
    assert!(!a
        .swap("default", "k", &CasExpectation::Value(seen), b"from-a")
        .unwrap());
    assert_eq!(b.get("default", "k").unwrap().unwrap(), b"newer");
}

#[test]
fn from_config_builds_redis_stores() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rc = write_config(
        dir.path(),
        &format!(
            "[key_value_store.default]\ntype = \"redis\"\nurl = \"{}\"\n\n\
             [key_value_store.cache]\ntype = \"redis\"\nurl = \"{}\"\n",
            server.url(0),
            server.url(1)
        ),
    );
    let stores = KvStores::from_config(&dir.path().join("state"), Some(&rc)).unwrap();
    assert!(stores.is_defined("default") && stores.is_defined("cache"));
    assert_eq!(
        stores.summary("default"),
        Some(format!("redis \"redis://127.0.0.1:{}/0\"", server.port).as_str())
    );
    assert_eq!(
        stores.summary("cache"),
        Some(format!("redis \"redis://127.0.0.1:{}/1\"", server.port).as_str())
    );
    let default = stores.get("default").unwrap();
    let cache = stores.get("cache").unwrap();
    default.set("default", "k", b"in-db-0").unwrap();
    cache.set("cache", "k", b"in-db-1").unwrap();
    assert_eq!(default.get("default", "k").unwrap().unwrap(), b"in-db-0");
    assert_eq!(cache.get("cache", "k").unwrap().unwrap(), b"in-db-1");
    assert_eq!(cache.increment("cache", "n", 3).unwrap(), 3);
    assert!(!default.exists("default", "n").unwrap());
    let v: Vec<u8> = redis::cmd("GET")
        .arg("k")
        .query(&mut server.raw(1))
        .unwrap();
    assert_eq!(v, b"in-db-1");
    // Nothing went to SQLite.
    assert!(!dir
        .path()
        .join("state")
        .join("sqlite_key_value.db")
        .exists());
}

#[test]
fn two_runners_on_one_config_see_each_others_writes() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rc = write_config(
        dir.path(),
        &format!(
            "[key_value_store.default]\ntype = \"redis\"\nurl = \"{}\"\n",
            server.url(0)
        ),
    );
    let one = KvStores::from_config(&dir.path().join("one"), Some(&rc)).unwrap();
    let two = KvStores::from_config(&dir.path().join("two"), Some(&rc)).unwrap();
    let (one, two) = (one.get("default").unwrap(), two.get("default").unwrap());
    one.set("default", "k", b"v").unwrap();
    assert_eq!(two.get("default", "k").unwrap().unwrap(), b"v");
    assert_eq!(one.increment("default", "n", 2).unwrap(), 2);
    assert_eq!(two.increment("default", "n", 3).unwrap(), 5);
    two.set_many("default", &[("x".into(), b"1".to_vec())])
        .unwrap();
    assert_eq!(
        one.get_many("default", &["x".into(), "k".into()]).unwrap(),
        vec![("x".into(), b"1".to_vec()), ("k".into(), b"v".to_vec())]
    );
    assert!(one
        .swap("default", "k", &CasExpectation::Value(b"v".to_vec()), b"w")
        .unwrap());
    assert!(!two
        .swap("default", "k", &CasExpectation::Value(b"v".to_vec()), b"z")
        .unwrap());
    two.delete("default", "k").unwrap();
    assert!(!one.exists("default", "k").unwrap());
}

#[test]
fn unreachable_redis_is_a_clear_startup_error() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let rc = write_config(
        dir.path(),
        &format!("[key_value_store.default]\ntype = \"redis\"\nurl = \"redis://:hunter2@127.0.0.1:{port}\"\n"),
    );
    let err = KvStores::from_config(dir.path(), Some(&rc))
        .err()
        .expect("an unreachable Redis must fail startup")
        .to_string();
    assert!(
        err.starts_with(&format!(
            "key_value_store.default: cannot reach Redis at redis://127.0.0.1:{port}: "
        )),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn passwords_are_used_but_never_shown() {
    let Some(server) = RedisServer::start_with(Some("s3cret")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rc = write_config(
        dir.path(),
        &format!(
            "[key_value_store.default]\ntype = \"redis\"\nurl = \"{}\"\n",
            server.url(0)
        ),
    );
    let stores = KvStores::from_config(dir.path(), Some(&rc)).unwrap();
    let summary = stores.summary("default").unwrap();
    assert_eq!(
        summary,
        format!("redis \"redis://127.0.0.1:{}/0\"", server.port)
    );
    stores
        .get("default")
        .unwrap()
        .set("default", "k", b"v")
        .unwrap();
    // A wrong password fails at startup, without echoing it.
    let wrong = format!("redis://:wrong-pw@127.0.0.1:{}", server.port);
    let err = RedisBackend::connect(&wrong).err().unwrap().to_string();
    assert!(
        err.starts_with(&format!(
            "cannot reach Redis at redis://127.0.0.1:{}: ",
            server.port
        )),
        "{err}"
    );
    assert!(!err.contains("wrong-pw"), "{err}");
}

#[test]
fn a_redis_restart_is_survived() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let db = Arc::new(RedisBackend::connect(&server.url(0)).unwrap());
    // Fill the pool with a few connections.
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let db = db.clone();
            std::thread::spawn(move || db.set("default", &format!("k{i}"), b"v").unwrap())
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    server.restart();
    // Reads and plain writes retry once on a new connection (and the stale pool is dropped).
    assert_eq!(db.get("default", "k0").unwrap(), None);
    db.set("default", "k", b"after").unwrap();
    assert_eq!(db.increment("default", "n", 1).unwrap(), 1);

    // After the pool sat idle, a restart is noticed by PING before an increment is sent.
    server.restart();
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(db.increment("default", "n", 1).unwrap(), 1);
    assert!(db
        .swap("default", "n", &CasExpectation::Value(b"1".to_vec()), b"7")
        .unwrap());

    // While the server is down, calls fail with a message naming Redis, then recover.
    server.stop();
    match db.get("default", "n") {
        Err(KvError::Other(m)) => assert!(m.starts_with("Redis GET at redis://"), "{m}"),
        other => panic!("expected an error, got {other:?}"),
    }
    server.restart();
    assert_eq!(db.get("default", "n").unwrap(), None);
}

#[test]
fn works_from_a_multi_threaded_tokio_runtime() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let db = Arc::new(RedisBackend::connect(&server.url(0)).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let db = db.clone();
                tokio::spawn(async move {
                    for _ in 0..50 {
                        db.increment("default", "n", 1).unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    assert_eq!(db.get("default", "n").unwrap().unwrap(), b"400");
}
