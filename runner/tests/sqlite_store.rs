//! The SQLite key-value backend under concurrency and across "processes" (connections).

use std::sync::Arc;

use freerelay_cli::kv::sqlite::SqliteBackend;
use freerelay_cli::kv::{CasExpectation, KvBackend};

#[test]
fn thirty_two_threads_incrementing_give_the_exact_total() {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(SqliteBackend::open(&dir.path().join("kv.db")).unwrap());
    let threads: Vec<_> = (0..32)
        .map(|_| {
            let db = db.clone();
            std::thread::spawn(move || {
                for _ in 0..50 {
                    db.increment("default", "n", 1).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        db.get("default", "n").unwrap().unwrap(),
        1600i64.to_le_bytes()
    );
}

#[test]
fn values_persist_across_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state").join("sqlite_key_value.db");
    {
        let db = SqliteBackend::open(&path).unwrap();
        db.set("default", "k", b"v").unwrap();
        db.increment("default", "n", 41).unwrap();
    }
    let db = SqliteBackend::open(&path).unwrap();
    assert_eq!(db.get("default", "k").unwrap().as_deref(), Some(&b"v"[..]));
    assert_eq!(db.increment("default", "n", 1).unwrap(), 42);
}

#[test]
fn the_file_uses_spins_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.db");
    SqliteBackend::open(&path)
        .unwrap()
        .set("default", "k", b"v")
        .unwrap();
    // Read it back with plain SQL, as Spin's own store would.
    let conn = rusqlite::Connection::open(&path).unwrap();
    let value: Vec<u8> = conn
        .query_row(
            "SELECT value FROM spin_key_value WHERE store = 'default' AND key = 'k'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(value, b"v");
    let pk: i64 = conn
        .query_row(
            "SELECT count(*) FROM pragma_table_info('spin_key_value') WHERE pk > 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(pk, 2, "primary key is (store, key)");
}

#[test]
fn two_processes_sharing_the_file_stay_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.db");
    // Two independent backends = two connections, as two runner processes would have.
    let a = Arc::new(SqliteBackend::open(&path).unwrap());
    let b = Arc::new(SqliteBackend::open(&path).unwrap());
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let db = if i % 2 == 0 { a.clone() } else { b.clone() };
            std::thread::spawn(move || {
                for _ in 0..50 {
                    db.increment("default", "shared", 2).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(a.increment("default", "shared", 0).unwrap(), 1600);
    assert_eq!(
        b.get("default", "shared").unwrap().unwrap(),
        1600i64.to_le_bytes()
    );
}

#[test]
fn compare_and_swap_loses_races_across_connections() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.db");
    let a = SqliteBackend::open(&path).unwrap();
    let b = SqliteBackend::open(&path).unwrap();
    // Both saw "absent"; only the first insert may win.
    assert!(a
        .swap("default", "k", &CasExpectation::Absent, b"a")
        .unwrap());
    assert!(!b
        .swap("default", "k", &CasExpectation::Absent, b"b")
        .unwrap());
    // Both saw "a"; only one update may win.
    let seen = CasExpectation::Value(b"a".to_vec());
    assert!(b.swap("default", "k", &seen, b"b").unwrap());
    assert!(!a.swap("default", "k", &seen, b"c").unwrap());
    assert_eq!(a.get("default", "k").unwrap().unwrap(), b"b");
}

#[test]
fn concurrent_cas_counters_never_lose_updates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.db");
    let dbs: Vec<Arc<SqliteBackend>> = (0..2)
        .map(|_| Arc::new(SqliteBackend::open(&path).unwrap()))
        .collect();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let db = dbs[i % 2].clone();
            std::thread::spawn(move || {
                for _ in 0..25 {
                    loop {
                        let cur = db.get("default", "c").unwrap();
                        let n = cur
                            .as_deref()
                            .map(|v| String::from_utf8_lossy(v).parse::<u64>().unwrap())
                            .unwrap_or(0);
                        let expected = match cur {
                            Some(v) => CasExpectation::Value(v),
                            None => CasExpectation::Absent,
                        };
                        if db
                            .swap("default", "c", &expected, (n + 1).to_string().as_bytes())
                            .unwrap()
                        {
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(dbs[0].get("default", "c").unwrap().unwrap(), b"200");
}

/// Marks a child process of [`separate_processes_incrementing_give_the_exact_total`]; holds the
/// database path.
const CHILD_ENV: &str = "FREERELAY_KV_CHILD_DB";

/// Three processes (this test binary re-run as children) × 4 threads × 250 increments on one
/// file. Run normally it is the parent, and passes only with the exact total; a child (the same
/// test, with [`CHILD_ENV`] set) does its share and returns.
#[test]
fn separate_processes_incrementing_give_the_exact_total() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        let db = Arc::new(SqliteBackend::open(std::path::Path::new(&path)).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let db = db.clone();
                std::thread::spawn(move || {
                    for _ in 0..250 {
                        db.increment("default", "procs", 1).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.db");
    SqliteBackend::open(&path).unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..3)
        .map(|_| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "separate_processes_incrementing_give_the_exact_total",
                    "--test-threads",
                    "1",
                ])
                .env(CHILD_ENV, &path)
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a child process failed");
    }
    // Exact: a child that ran no test (or lost an update) cannot give 3000.
    let db = SqliteBackend::open(&path).unwrap();
    assert_eq!(
        db.get("default", "procs").unwrap().unwrap(),
        3000i64.to_le_bytes()
    );
}

/// The size of the `-wal` file beside `db` (0 when there is none).
fn wal_size(db: &std::path::Path) -> u64 {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    std::fs::metadata(wal).map_or(0, |m| m.len())
}

/// 20 000 commits while other threads — on this connection and on another one, as another
/// process would — keep reading: the write-ahead log stays within its bound instead of growing
/// by every commit (about 80 MB here without the bound), and no update is lost.
#[test]
fn the_write_ahead_log_stays_bounded_under_writes_and_concurrent_reads() {
    const LIMIT: u64 = 1 << 20;
    const WRITES: i64 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.db");
    let db = Arc::new(SqliteBackend::open_with_wal_limit(&path, LIMIT).unwrap());
    let other = Arc::new(SqliteBackend::open_with_wal_limit(&path, LIMIT).unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|i| {
            let db = if i % 2 == 0 {
                db.clone()
            } else {
                other.clone()
            };
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    db.get("default", "n").unwrap();
                    db.get_many("default", &["n".to_string(), "s".to_string()])
                        .unwrap();
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let mut largest = 0;
    for i in 0..WRITES {
        db.increment("default", "n", 1).unwrap();
        if i % 2 == 0 {
            db.set("default", "s", &i.to_le_bytes()).unwrap();
        }
        if i % 100 == 0 {
            largest = largest.max(wal_size(&path));
        }
    }
    largest = largest.max(wal_size(&path));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0, "a reader never ran");
    }
    assert_eq!(db.increment("default", "n", 0).unwrap(), WRITES);
    // The hard bound is four times the limit, checked every 64 writes (a commit here appends a
    // page or two).
    assert!(
        largest <= 5 * LIMIT,
        "the WAL reached {largest} bytes (limit {LIMIT})"
    );
}
