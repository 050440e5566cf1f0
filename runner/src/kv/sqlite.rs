//! The default key-value backend: a SQLite file with Spin's exact schema, so the file is
//! interchangeable with `spin up`'s `.spin/sqlite_key_value.db`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{CasExpectation, KvBackend, KvError};

/// SQLite-backed store shared by all instances of the process.
///
/// Durability choice: the database runs in WAL mode with `synchronous=NORMAL`. Spin's default
/// (rollback journal, `synchronous=FULL`) fsyncs on every write, which caps a KV write per
/// request at roughly 1k req/s; with WAL+NORMAL a commit is an append to the WAL and fsyncs
/// happen at checkpoints. The database can never be corrupted by a crash; the cost is that the
/// last few commits before a power loss (not a process crash) may be lost, which is acceptable
/// for counters and routing state. Spin opens WAL databases transparently, so the file stays
/// interchangeable. `busy_timeout` and `BEGIN IMMEDIATE` make read-modify-write operations
/// atomic even when another process (another runner, or Spin) shares the file.
///
/// The write-ahead log is bounded (see [`WalControl`]): SQLite only starts the WAL over from its
/// beginning when a writer finds every frame already copied into the database, which never
/// happens on its own while requests write continuously, so without help the file grows by every
/// commit forever. Background checkpoints copy frames without blocking anyone; once the WAL
/// passes its limit a `RESTART` checkpoint briefly holds writers back so the next commit starts
/// the log over, and `journal_size_limit` gives the disk space back.
pub struct SqliteBackend {
    /// Shared with the checkpoint thread, which holds it during a `RESTART` checkpoint.
    conn: Arc<Mutex<Connection>>,
    /// WAL size control (file databases only).
    wal: Option<WalControl>,
}

/// How long an operation keeps retrying when the database is busy.
const BUSY_RETRY_LIMIT: Duration = Duration::from_secs(10);

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn other(e: rusqlite::Error) -> KvError {
    match &e {
        rusqlite::Error::SqliteFailure(code, _) => {
            KvError::Other(format!("{e} (sqlite code {})", code.extended_code))
        }
        _ => KvError::Other(e.to_string()),
    }
}

/// Locks the connection. A panic while holding the lock cannot leave SQLite inconsistent
/// (transactions roll back on drop), so a poisoned lock is still usable.
fn lock(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    conn.lock().unwrap_or_else(|p| p.into_inner())
}

const UPSERT: &str = "INSERT INTO spin_key_value (store, key, value) VALUES (?1, ?2, ?3)
     ON CONFLICT(store, key) DO UPDATE SET value = excluded.value";
const SELECT: &str = "SELECT value FROM spin_key_value WHERE store = ?1 AND key = ?2";

impl SqliteBackend {
    /// Opens (creating if needed) the database file and its parent directory, with the default
    /// WAL limit ([`WAL_LIMIT`]).
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Self::open_with_wal_limit(path, WAL_LIMIT)
    }

    /// [`Self::open`] with another WAL limit in bytes: past it the log is started over (see
    /// [`WalControl`]); at four times it a writer does that itself before going on.
    pub fn open_with_wal_limit(path: &Path, wal_limit: u64) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        }
        let conn = Connection::open(path).map_err(|e| {
            anyhow::anyhow!("cannot open key-value database {}: {e}", path.display())
        })?;
        let mut backend = Self::init(conn).map_err(|e| {
            anyhow::anyhow!(
                "cannot initialise key-value database {}: {e}",
                path.display()
            )
        })?;
        let page_size = {
            let conn = backend.conn();
            // Checkpoints move to a background thread (see `WalControl`); when a checkpoint has
            // started the log over, the next commit truncates a larger file back to the limit.
            conn.pragma_update(None, "wal_autocheckpoint", 0)
                .and_then(|()| {
                    conn.query_row(
                        &format!("PRAGMA journal_size_limit={wal_limit}"),
                        [],
                        |_| Ok(()),
                    )
                })
                .and_then(|()| conn.query_row("PRAGMA page_size", [], |r| r.get::<_, u64>(0)))
                .map_err(|e| anyhow::anyhow!("cannot configure {}: {e}", path.display()))?
        };
        let mut wal_path = path.as_os_str().to_owned();
        wal_path.push("-wal");
        backend.wal = Some(
            WalControl::start(
                path,
                PathBuf::from(wal_path),
                wal_limit,
                page_size,
                backend.conn.clone(),
            )
            .map_err(|e| {
                anyhow::anyhow!("cannot open key-value database {}: {e}", path.display())
            })?,
        );
        Ok(backend)
    }

    /// An in-memory database (tests).
    pub fn in_memory() -> anyhow::Result<Self> {
        Ok(Self::init(Connection::open_in_memory()?)?)
    }

    fn init(conn: Connection) -> rusqlite::Result<Self> {
        // Setting up may wait for another process.
        conn.busy_timeout(Duration::from_secs(10))?;
        // `journal_mode` returns a row, so it is read rather than executed.
        let _mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        conn.execute_batch(
            "PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS spin_key_value (
                 store TEXT NOT NULL,
                 key   TEXT NOT NULL,
                 value BLOB NOT NULL,
                 PRIMARY KEY (store, key)
             );",
        )?;
        // No waiting inside SQLite on the fast path; `run_waiting` sets a timeout when it waits.
        conn.busy_timeout(Duration::ZERO)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            wal: None,
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        lock(&self.conn)
    }

    /// Runs `op` on the connection, retrying while another process holds the database.
    ///
    /// The common case — the connection is free and no other process holds a lock — runs
    /// inline on the calling thread: an operation is a few microseconds of in-process SQLite
    /// (commits append to the WAL, never fsync; checkpoints run on a background thread), and
    /// moving it to another thread would cost more than the work. Anything that has to wait (the
    /// connection is busy on another thread, or SQLite reports BUSY because another process
    /// writes) goes through [`super::blocking`] (Spin's `block_in_place` on a multi-threaded
    /// runtime; inline on `freerelay up`'s current-thread workers), with `busy_timeout` and
    /// whole-operation retries. Either way the guest's
    /// host call does not yield, as in Spin.
    fn run<T>(
        &self,
        mut op: impl FnMut(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, KvError> {
        if let Ok(mut conn) = self.conn.try_lock() {
            match op(&mut conn) {
                Err(e) if is_busy(&e) => {}
                result => return result.map_err(other),
            }
        }
        super::blocking(|| self.run_waiting(op))
    }

    /// The waiting path of [`Self::run`]. `busy_timeout` covers most contention, but SQLite
    /// returns BUSY without waiting in a few WAL situations (e.g. a stale snapshot or a
    /// concurrent recovery); since every operation here is a self-contained transaction,
    /// repeating it is safe.
    fn run_waiting<T>(
        &self,
        mut op: impl FnMut(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, KvError> {
        let deadline = Instant::now() + BUSY_RETRY_LIMIT;
        let mut conn = self.conn();
        let _ = conn.busy_timeout(BUSY_RETRY_LIMIT);
        let mut pause = Duration::from_micros(200);
        let result = loop {
            match op(&mut conn) {
                Err(e) if is_busy(&e) && Instant::now() < deadline => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                result => break result.map_err(other),
            }
        };
        let _ = conn.busy_timeout(Duration::ZERO);
        result
    }

    /// [`Self::run`] for an operation that writes: counts commits for [`WalControl`].
    fn run_write<T>(
        &self,
        op: impl FnMut(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, KvError> {
        let result = self.run(op);
        if let Some(wal) = &self.wal {
            wal.after_write();
        }
        result
    }
}

/// The default WAL limit: 16 MiB, about 4000 single-page commits. Every time the log reaches
/// it, writers wait for one `RESTART` checkpoint (two fsyncs); a larger limit makes that rarer
/// and the file larger.
pub const WAL_LIMIT: u64 = 16 << 20;

/// Writes between two background `PASSIVE` checkpoints (SQLite's own default is every 1000 WAL
/// pages; a write here appends one or two pages).
const CHECKPOINT_EVERY: u64 = 500;

/// Writes between two looks at the WAL file's size.
const SIZE_CHECK_EVERY: u64 = 64;

/// How long a `RESTART` checkpoint waits for another process's reader or writer. Writers of this
/// process wait meanwhile, so it is short; a checkpoint that gives up is tried again later.
const RESTART_WAIT: Duration = Duration::from_millis(200);

/// After a writer's own `RESTART` failed (another process keeps a snapshot open), writers
/// leave it to the background thread for this long.
const INLINE_RESTART_BACKOFF: Duration = Duration::from_secs(1);

/// Keeps a file database's write-ahead log bounded.
///
/// SQLite appends every commit to the WAL and starts writing it from the beginning again only
/// when a writer finds all of it copied into the database (and no reader using it). A
/// background `PASSIVE` checkpoint copies frames without blocking anyone, but while requests
/// keep writing there are always newer frames than it copied, so the log is never started over
/// and grows by every commit (about 12 KB per gateway request, gigabytes an hour). So:
///
/// - every [`CHECKPOINT_EVERY`] writes a background thread runs a `PASSIVE` checkpoint (copies
///   and fsyncs the bulk, off the request path);
/// - when the WAL holds more than `limit` bytes, that thread takes this process's connection
///   (in-process reads and writes wait on its lock) and runs a `RESTART` checkpoint on it: it
///   copies the few frames written since the last one and waits for other processes' readers,
///   so the next commit starts the log over, and truncates the file back to `limit`
///   (`journal_size_limit`);
/// - if the file still reaches four times `limit` (the thread fell behind), the writer that
///   sees it runs the `RESTART` itself — the bound holds however the threads are scheduled.
///
/// Only a reader in another process that keeps one snapshot open for longer than
/// [`RESTART_WAIT`] at every attempt can keep the log growing, as with any SQLite WAL database.
struct WalControl {
    /// The `-wal` file.
    path: PathBuf,
    limit: u64,
    writes: AtomicU64,
    wake: SyncSender<()>,
    conn: Arc<Mutex<Connection>>,
    /// Held for a whole checkpoint: SQLite lets one checkpoint run at a time and fails another
    /// at once, so a writer's `RESTART` waits here for the background thread's instead.
    checkpointing: Arc<Mutex<()>>,
    /// Until when writers leave restarts to the background thread.
    backoff_until: Mutex<Option<Instant>>,
}

impl WalControl {
    fn start(
        db_path: &Path,
        path: PathBuf,
        limit: u64,
        page_size: u64,
        conn: Arc<Mutex<Connection>>,
    ) -> rusqlite::Result<Self> {
        let ckpt = Connection::open(db_path)?;
        ckpt.busy_timeout(Duration::from_secs(1))?;
        let (wake, rx) = sync_channel::<()>(1);
        let shared = conn.clone();
        let checkpointing = Arc::new(Mutex::new(()));
        let ckpt_lock = checkpointing.clone();
        // A WAL frame is a page plus a 24-byte header.
        let frame_bytes = page_size + 24;
        std::thread::Builder::new()
            .name("kv-checkpoint".into())
            .spawn(move || {
                // Ends when the backend (and so the sender) is dropped.
                while rx.recv().is_ok() {
                    let _checkpointing = ckpt_lock.lock().unwrap_or_else(|p| p.into_inner());
                    // PASSIVE never blocks anyone; what it cannot copy now (a reader, or another
                    // process) is copied at the next wake-up.
                    let frames = ckpt
                        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1))
                        .unwrap_or(0);
                    if frames > 0 && frames as u64 * frame_bytes > limit {
                        restart(&shared);
                    }
                }
            })
            .map_err(|e| {
                rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                    Some(format!("cannot start the checkpoint thread: {e}")),
                )
            })?;
        Ok(Self {
            path,
            limit,
            writes: AtomicU64::new(0),
            wake,
            conn,
            checkpointing,
            backoff_until: Mutex::new(None),
        })
    }

    /// Called after every write (committed or not): wakes the background thread, and restarts
    /// the log here if it has fallen far behind.
    fn after_write(&self) {
        let n = self.writes.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(CHECKPOINT_EVERY) {
            let _ = self.wake.try_send(());
        }
        if !n.is_multiple_of(SIZE_CHECK_EVERY) {
            return;
        }
        let Ok(size) = std::fs::metadata(&self.path).map(|m| m.len()) else {
            return;
        };
        if size <= self.limit {
            return;
        }
        let _ = self.wake.try_send(());
        if size <= self.limit.saturating_mul(4) {
            return;
        }
        {
            let mut until = self.backoff_until.lock().unwrap_or_else(|p| p.into_inner());
            if until.is_some_and(|t| Instant::now() < t) {
                return;
            }
            *until = None;
        }
        let restarted = super::blocking(|| {
            let _checkpointing = self.checkpointing.lock().unwrap_or_else(|p| p.into_inner());
            restart(&self.conn)
        });
        if !restarted {
            // Another process keeps a snapshot open (this one's checkpoints wait for each other).
            *self.backoff_until.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Instant::now() + INLINE_RESTART_BACKOFF);
        }
    }
}

/// Runs a `RESTART` checkpoint on this process's connection, holding its lock (so writers of
/// this process wait on the lock, not in SQLite's busy loop). Returns whether it completed: all
/// frames copied, the database synced, and no reader left on the log, so the next commit
/// starts it over.
fn restart(conn: &Mutex<Connection>) -> bool {
    let conn = lock(conn);
    let _ = conn.busy_timeout(RESTART_WAIT);
    let busy = conn
        .query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0))
        .unwrap_or(1);
    let _ = conn.busy_timeout(Duration::ZERO);
    busy == 0
}

impl KvBackend for SqliteBackend {
    fn get(&self, store: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.run(|conn| {
            conn.prepare_cached(SELECT)?
                .query_row(params![store, key], |r| r.get(0))
                .optional()
        })
    }

    fn set(&self, store: &str, key: &str, value: &[u8]) -> Result<(), KvError> {
        self.run_write(|conn| {
            conn.prepare_cached(UPSERT)?
                .execute(params![store, key, value])
                .map(drop)
        })
    }

    fn delete(&self, store: &str, key: &str) -> Result<(), KvError> {
        self.run_write(|conn| {
            conn.prepare_cached("DELETE FROM spin_key_value WHERE store = ?1 AND key = ?2")?
                .execute(params![store, key])
                .map(drop)
        })
    }

    fn exists(&self, store: &str, key: &str) -> Result<bool, KvError> {
        self.run(|conn| {
            conn.prepare_cached(
                "SELECT 1 FROM spin_key_value WHERE store = ?1 AND key = ?2 LIMIT 1",
            )?
            .exists(params![store, key])
        })
    }

    fn get_keys(&self, store: &str) -> Result<Vec<String>, KvError> {
        self.run(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT key FROM spin_key_value WHERE store = ?1")?;
            let rows = stmt.query_map(params![store], |r| r.get::<_, String>(0))?;
            rows.collect()
        })
    }

    fn get_many(&self, store: &str, keys: &[String]) -> Result<Vec<(String, Vec<u8>)>, KvError> {
        self.run(|conn| {
            // One read transaction gives a consistent snapshot across the keys.
            let tx = conn.transaction()?;
            let mut out = Vec::with_capacity(keys.len());
            {
                let mut stmt = tx.prepare_cached(SELECT)?;
                for key in keys {
                    if let Some(v) = stmt
                        .query_row(params![store, key], |r| r.get::<_, Vec<u8>>(0))
                        .optional()?
                    {
                        out.push((key.clone(), v));
                    }
                }
            }
            tx.commit()?;
            Ok(out)
        })
    }

    fn set_many(&self, store: &str, pairs: &[(String, Vec<u8>)]) -> Result<(), KvError> {
        self.run_write(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut stmt = tx.prepare_cached(UPSERT)?;
                for (k, v) in pairs {
                    stmt.execute(params![store, k, v])?;
                }
            }
            tx.commit()
        })
    }

    fn delete_many(&self, store: &str, keys: &[String]) -> Result<(), KvError> {
        self.run_write(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut stmt =
                    tx.prepare_cached("DELETE FROM spin_key_value WHERE store = ?1 AND key = ?2")?;
                for k in keys {
                    stmt.execute(params![store, k])?;
                }
            }
            tx.commit()
        })
    }

    fn increment(&self, store: &str, key: &str, delta: i64) -> Result<i64, KvError> {
        let result = self.run_write(|conn| {
            // IMMEDIATE takes the write lock up front, so a concurrent writer in another process
            // waits (busy_timeout) instead of failing the read→write upgrade.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let current: Option<Vec<u8>> = tx
                .prepare_cached(SELECT)?
                .query_row(params![store, key], |r| r.get(0))
                .optional()?;
            let current = match current {
                None => 0,
                Some(bytes) => match <[u8; 8]>::try_from(bytes.as_slice()) {
                    Ok(arr) => i64::from_le_bytes(arr),
                    Err(_) => {
                        return Ok(Err(format!(
                            "value of key {key:?} is {} bytes, not an 8-byte little-endian i64",
                            bytes.len()
                        )))
                    }
                },
            };
            let Some(new) = current.checked_add(delta) else {
                return Ok(Err(format!("increment of key {key:?} overflows i64")));
            };
            tx.prepare_cached(UPSERT)?.execute(params![
                store,
                key,
                new.to_le_bytes().as_slice()
            ])?;
            tx.commit()?;
            Ok(Ok(new))
        })?;
        result.map_err(KvError::Other)
    }

    fn swap(
        &self,
        store: &str,
        key: &str,
        expected: &CasExpectation,
        value: &[u8],
    ) -> Result<bool, KvError> {
        let changed = self.run_write(|conn| match expected {
            CasExpectation::Unconditional => {
                conn.prepare_cached(UPSERT)?.execute(params![store, key, value])
            }
            CasExpectation::Absent => conn
                .prepare_cached(
                    "INSERT INTO spin_key_value (store, key, value) VALUES (?1, ?2, ?3)
                     ON CONFLICT(store, key) DO NOTHING",
                )?
                .execute(params![store, key, value]),
            CasExpectation::Value(old) => conn
                .prepare_cached(
                    "UPDATE spin_key_value SET value = ?3 WHERE store = ?1 AND key = ?2 AND value = ?4",
                )?
                .execute(params![store, key, value, old]),
        })?;
        Ok(changed == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_operations() {
        let db = SqliteBackend::in_memory().unwrap();
        assert_eq!(db.get("s", "k").unwrap(), None);
        assert!(!db.exists("s", "k").unwrap());
        db.set("s", "k", b"v1").unwrap();
        db.set("s", "k", b"v2").unwrap();
        assert_eq!(db.get("s", "k").unwrap().as_deref(), Some(&b"v2"[..]));
        assert_eq!(db.get("other", "k").unwrap(), None, "stores are separate");
        db.set("s", "a", b"").unwrap();
        assert_eq!(db.get_keys("s").unwrap(), vec!["a", "k"]);
        db.delete("s", "k").unwrap();
        db.delete("s", "missing").unwrap();
        assert!(!db.exists("s", "k").unwrap());
    }

    #[test]
    fn batch_operations_omit_missing_keys_like_spin() {
        let db = SqliteBackend::in_memory().unwrap();
        db.set_many(
            "s",
            &[("a".into(), b"1".to_vec()), ("b".into(), b"2".to_vec())],
        )
        .unwrap();
        let got = db
            .get_many("s", &["a".into(), "zz".into(), "b".into()])
            .unwrap();
        assert_eq!(
            got,
            vec![("a".into(), b"1".to_vec()), ("b".into(), b"2".to_vec())]
        );
        db.delete_many("s", &["a".into(), "zz".into()]).unwrap();
        assert_eq!(db.get_keys("s").unwrap(), vec!["b"]);
    }

    #[test]
    fn increment_from_absent_and_le_encoding() {
        let db = SqliteBackend::in_memory().unwrap();
        assert_eq!(db.increment("s", "n", 5).unwrap(), 5);
        assert_eq!(
            db.get("s", "n").unwrap().unwrap(),
            5i64.to_le_bytes().to_vec()
        );
        assert_eq!(db.increment("s", "n", -7).unwrap(), -2);
        assert_eq!(
            db.get("s", "n").unwrap().unwrap(),
            vec![0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        db.set("s", "bad", b"abc").unwrap();
        assert!(matches!(
            db.increment("s", "bad", 1),
            Err(KvError::Other(_))
        ));
        db.set("s", "max", &i64::MAX.to_le_bytes()).unwrap();
        assert!(db.increment("s", "max", 1).is_err());
    }

    #[test]
    fn compare_and_swap_semantics() {
        let db = SqliteBackend::in_memory().unwrap();
        // Absent: only an insert succeeds.
        assert!(db.swap("s", "k", &CasExpectation::Absent, b"one").unwrap());
        assert!(!db.swap("s", "k", &CasExpectation::Absent, b"two").unwrap());
        // Value: only if unchanged.
        assert!(db
            .swap("s", "k", &CasExpectation::Value(b"one".to_vec()), b"two")
            .unwrap());
        assert!(!db
            .swap("s", "k", &CasExpectation::Value(b"one".to_vec()), b"three")
            .unwrap());
        assert_eq!(db.get("s", "k").unwrap().unwrap(), b"two");
        // Unconditional (Spin when `current` was not called): always writes.
        assert!(db
            .swap("s", "k", &CasExpectation::Unconditional, b"four")
            .unwrap());
        assert_eq!(db.get("s", "k").unwrap().unwrap(), b"four");
    }
}
