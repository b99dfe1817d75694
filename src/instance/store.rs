//! Persistence of instance records in SQLite (the only module that writes SQL).
//!
//! # Durability
//! - **WAL + `synchronous=FULL`**: a commit returns only after its WAL frames are fsynced, so
//!   an acknowledged change survives a `kill -9` and a power loss; a commit torn by a crash is
//!   discarded whole by WAL recovery at the next open. Writes are rare, so the fsync per
//!   commit costs nothing that matters.
//! - **One transaction per change** (`BEGIN IMMEDIATE`): a record is written whole or not at
//!   all, and the tombstone check, the write and the tombstone removal happen atomically.
//! - **Versions**: every change carries a caller-assigned, per-name, increasing version. A write
//!   whose version is not greater than the stored one is ignored, so changes that reach the
//!   store out of order from concurrent tasks converge to the newest.
//! - **Tombstones**: a delete leaves `(name, version)` in `deleted`, so a late upsert of the
//!   deleted instance (older version) cannot resurrect it; a newer upsert removes the tombstone.
//!   The caller must keep versions increasing across delete and re-create of the same name:
//!   [`Store::version`] returns the highest version seen (row or tombstone) to continue from.
//!   Tombstones are small and stay until the name is re-created.
//! - **Schema**: numbered migrations, each applied in its own transaction together with the bump
//!   of `PRAGMA user_version`; a database from a newer paddock is refused, never downgraded.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

/// Schema migrations; entry `i` takes the database from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // v1
    "CREATE TABLE instances (
        name TEXT PRIMARY KEY NOT NULL,
        config TEXT NOT NULL CHECK (json_valid(config)),
        desired_running INTEGER NOT NULL CHECK (desired_running IN (0, 1)),
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        version INTEGER NOT NULL CHECK (version >= 0)
    ) STRICT;
    CREATE TABLE deleted (
        name TEXT PRIMARY KEY NOT NULL,
        version INTEGER NOT NULL CHECK (version >= 0)
    ) STRICT;",
    // v2: auth (its SQL lives in auth/store.rs; the schema's versions are one sequence).
    "CREATE TABLE users (
        name TEXT PRIMARY KEY NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('admin', 'viewer')),
        password_hash TEXT NOT NULL,
        created_at TEXT NOT NULL
    ) STRICT;
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('management', 'inference')),
        role TEXT NOT NULL CHECK (role IN ('admin', 'viewer')),
        instances TEXT CHECK (instances IS NULL OR json_valid(instances)),
        secret_sha256 TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at TEXT NOT NULL
    ) STRICT;",
];

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// One instance as persisted. The store does not interpret `config` (the instance's spec as JSON, owned by the caller).
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRecord {
    pub name: String,
    pub config: serde_json::Value,
    /// Whether the instance should be running (so it is started again after a restart).
    pub desired_running: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Monotonic per-name version assigned by the caller; a write with a version not greater than
    /// the stored one is ignored (writes may reach the store out of order from concurrent tasks).
    pub version: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open instance database {}: {source}", path.display())]
    Open { path: PathBuf, source: rusqlite::Error },
    #[error(
        "instance database {} has schema version {found}, but this paddock knows only up to {known}: \
         it was written by a newer paddock; refusing to use it (upgrade paddock)",
        path.display()
    )]
    NewerSchema { path: PathBuf, found: i64, known: i64 },
    #[error("instance database {}: migration to schema version {version} failed: {source}", path.display())]
    Migration { path: PathBuf, version: usize, source: rusqlite::Error },
    #[error("instance database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("instance '{name}' in the database is corrupt: {what}")]
    CorruptRow { name: String, what: String },
    #[error("instance '{name}': version {version} is too large to store (max {})", i64::MAX)]
    VersionOutOfRange { name: String, version: u64 },
}

/// Cheap to clone; all methods are blocking (call them from a blocking thread). Internally one connection behind a mutex.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) `path`, sets WAL, synchronous=FULL, busy_timeout (5 s),
    /// foreign_keys=ON, and runs the embedded migrations. A database from a newer paddock → error.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Self::init(path, Connection::open(path))
    }

    /// A private in-memory database, for tests.
    pub fn open_in_memory() -> Result<Store, StoreError> {
        Self::init(Path::new(":memory:"), Connection::open_in_memory())
    }

    /// Any SQLite error while opening and configuring is reported as an open failure of `path`.
    fn init(path: &Path, conn: rusqlite::Result<Connection>) -> Result<Store, StoreError> {
        let configured = conn.map_err(StoreError::from).and_then(|c| Self::configure(c, path));
        configured.map_err(|e| match e {
            StoreError::Sqlite(source) => StoreError::Open { path: path.to_path_buf(), source },
            e => e,
        })
    }

    fn configure(mut conn: Connection, path: &Path) -> Result<Store, StoreError> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // Returns the resulting mode: "wal" for files ("memory" in memory). Should WAL be
        // unavailable, the rollback journal with synchronous=FULL is crash-safe too.
        let _mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn, path)?;
        Ok(Store { conn: Arc::new(Mutex::new(conn)) })
    }

    /// All records, ordered by name. A row that cannot be read back (invalid JSON config,
    /// bad timestamp, ...) → [`StoreError::CorruptRow`] naming the instance; nothing is skipped.
    pub fn load_all(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT name, config, desired_running, created_at, updated_at, version
             FROM instances ORDER BY name",
        )?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let name: String = row.get(0)?;
            let corrupt = |what: String| StoreError::CorruptRow { name: name.clone(), what };
            let config: String = row.get(1)?;
            let config =
                serde_json::from_str(&config).map_err(|e| corrupt(format!("config is not valid JSON: {e}")))?;
            let desired_running = match row.get::<_, i64>(2)? {
                0 => false,
                1 => true,
                v => return Err(corrupt(format!("desired_running is {v}, not 0 or 1"))),
            };
            let created_at = parse_time(&row.get::<_, String>(3)?).map_err(|e| corrupt(format!("created_at: {e}")))?;
            let updated_at = parse_time(&row.get::<_, String>(4)?).map_err(|e| corrupt(format!("updated_at: {e}")))?;
            let version = row.get::<_, i64>(5)?;
            let version = u64::try_from(version).map_err(|_| corrupt(format!("version {version} is negative")))?;
            out.push(InstanceRecord { name, config, desired_running, created_at, updated_at, version });
        }
        Ok(out)
    }

    /// Inserts or updates in one transaction. Returns whether the row was written (false = an
    /// equal or newer version is stored, or the name was deleted at an equal or newer version).
    pub fn upsert(&self, record: &InstanceRecord) -> Result<bool, StoreError> {
        let version = to_i64(&record.name, record.version)?;
        let config = serde_json::to_string(&record.config).expect("a JSON value serializes");
        let mut conn = self.conn.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let tombstone: Option<i64> = tx
            .prepare_cached("SELECT version FROM deleted WHERE name = ?1")?
            .query_row([&record.name], |r| r.get(0))
            .optional()?;
        if tombstone.is_some_and(|t| version <= t) {
            return Ok(false); // dropping `tx` rolls back (nothing was written)
        }
        let written =
            tx.prepare_cached(
                "INSERT INTO instances (name, config, desired_running, created_at, updated_at, version)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(name) DO UPDATE SET
                    config = excluded.config,
                    desired_running = excluded.desired_running,
                    created_at = excluded.created_at,
                    updated_at = excluded.updated_at,
                    version = excluded.version
                 WHERE excluded.version > instances.version",
            )?
            .execute(params![
                record.name,
                config,
                record.desired_running,
                format_time(&record.created_at),
                format_time(&record.updated_at),
                version,
            ])? == 1;
        if written && tombstone.is_some() {
            tx.prepare_cached("DELETE FROM deleted WHERE name = ?1")?.execute([&record.name])?;
        }
        tx.commit()?;
        Ok(written)
    }

    /// Deletes `name` if its stored version is < `version`, leaving a tombstone at `version`.
    /// When no row exists the tombstone is still recorded (the delete may have overtaken the
    /// create). Returns whether a row was deleted.
    pub fn delete(&self, name: &str, version: u64) -> Result<bool, StoreError> {
        let version = to_i64(name, version)?;
        let mut conn = self.conn.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let stored: Option<i64> = tx
            .prepare_cached("SELECT version FROM instances WHERE name = ?1")?
            .query_row([name], |r| r.get(0))
            .optional()?;
        if stored.is_some_and(|s| s >= version) {
            return Ok(false); // a stale delete: the instance was changed after it
        }
        let deleted = tx.prepare_cached("DELETE FROM instances WHERE name = ?1")?.execute([name])? == 1;
        tx.prepare_cached(
            "INSERT INTO deleted (name, version) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET version = max(version, excluded.version)",
        )?
        .execute(params![name, version])?;
        tx.commit()?;
        Ok(deleted)
    }

    /// Highest version stored for `name`, row or tombstone (so a restarted server continues
    /// the sequence, also across delete and re-create), None if neither exists.
    pub fn version(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let conn = self.conn.lock();
        let v: Option<i64> = conn
            .prepare_cached(
                "SELECT max(v) FROM (SELECT version AS v FROM instances WHERE name = ?1
                                     UNION ALL SELECT version FROM deleted WHERE name = ?1)",
            )?
            .query_row([name], |r| r.get(0))?;
        v.map(|v| {
            u64::try_from(v).map_err(|_| StoreError::CorruptRow {
                name: name.to_string(),
                what: format!("version {v} is negative"),
            })
        })
        .transpose()
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    loop {
        // The version is read inside the write transaction, so two processes opening the
        // same new file cannot both apply a migration.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if current > known {
            return Err(StoreError::NewerSchema { path: path.to_path_buf(), found: current, known });
        }
        if current == known {
            return Ok(());
        }
        let next = current as usize + 1;
        let mig_err = |source| StoreError::Migration { path: path.to_path_buf(), version: next, source };
        tx.execute_batch(MIGRATIONS[current as usize]).map_err(mig_err)?;
        tx.pragma_update(None, "user_version", next as i64).map_err(mig_err)?;
        tx.commit().map_err(mig_err)?;
    }
}

fn to_i64(name: &str, version: u64) -> Result<i64, StoreError> {
    i64::try_from(version).map_err(|_| StoreError::VersionOutOfRange { name: name.to_string(), version })
}

fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    use std::sync::mpsc;

    fn rec(name: &str, version: u64) -> InstanceRecord {
        let t = Utc::now();
        InstanceRecord {
            name: name.into(),
            config: serde_json::json!({ "model": "m.gguf", "v": version, "opts": { "ctx": [1, 2.5, null] } }),
            desired_running: version & 1 == 0,
            created_at: t - chrono::Duration::seconds(60),
            updated_at: t,
            version,
        }
    }

    #[test]
    fn round_trip() {
        let s = Store::open_in_memory().unwrap();
        let (b, a) = (rec("b", 3), rec("a", 1));
        assert!(s.upsert(&b).unwrap());
        assert!(s.upsert(&a).unwrap());
        assert_eq!(s.load_all().unwrap(), vec![a, b]);
        assert_eq!(s.version("b").unwrap(), Some(3));
        assert_eq!(s.version("zz").unwrap(), None);
    }

    #[test]
    fn older_or_equal_write_is_ignored_newer_applied() {
        let s = Store::open_in_memory().unwrap();
        let v5 = rec("x", 5);
        assert!(s.upsert(&v5).unwrap());
        assert!(!s.upsert(&rec("x", 4)).unwrap());
        assert!(!s.upsert(&InstanceRecord { desired_running: true, ..v5.clone() }).unwrap());
        assert_eq!(s.load_all().unwrap(), vec![v5]);
        let v6 = rec("x", 6);
        assert!(s.upsert(&v6).unwrap());
        assert_eq!(s.load_all().unwrap(), vec![v6]);
    }

    #[test]
    fn delete_then_stale_upsert_does_not_resurrect() {
        let s = Store::open_in_memory().unwrap();
        s.upsert(&rec("x", 2)).unwrap();
        assert!(!s.delete("x", 2).unwrap(), "a delete not newer than the row is stale");
        assert_eq!(s.load_all().unwrap()[0].version, 2);
        assert!(s.delete("x", 3).unwrap());
        assert!(!s.upsert(&rec("x", 2)).unwrap());
        assert!(!s.upsert(&rec("x", 3)).unwrap());
        assert!(s.load_all().unwrap().is_empty());
        // A delete that overtakes the create still wins.
        assert!(!s.delete("y", 2).unwrap());
        assert!(!s.upsert(&rec("y", 1)).unwrap());
        assert!(s.load_all().unwrap().is_empty());
        assert!(!s.delete("x", 1).unwrap());
    }

    #[test]
    fn recreate_after_delete_with_higher_version() {
        let s = Store::open_in_memory().unwrap();
        s.upsert(&rec("x", 1)).unwrap();
        assert!(s.delete("x", 2).unwrap());
        let again = rec("x", 3);
        assert!(s.upsert(&again).unwrap());
        assert_eq!(s.load_all().unwrap(), vec![again]);
        assert!(!s.upsert(&rec("x", 2)).unwrap());
        assert!(s.delete("x", 4).unwrap());
        assert!(s.load_all().unwrap().is_empty());
    }

    #[test]
    fn version_continues_after_delete() {
        let s = Store::open_in_memory().unwrap();
        s.upsert(&rec("x", 7)).unwrap();
        s.delete("x", 8).unwrap();
        assert_eq!(s.version("x").unwrap(), Some(8));
        s.upsert(&rec("x", 9)).unwrap();
        assert_eq!(s.version("x").unwrap(), Some(9));
        let big = InstanceRecord { version: u64::MAX, ..rec("x", 0) };
        assert!(matches!(s.upsert(&big), Err(StoreError::VersionOutOfRange { .. })));
    }

    #[test]
    fn reopen_file_reads_everything_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("paddock.db");
        let all: Vec<_> = (0..10).map(|i| rec(&format!("i{i}"), i + 1)).collect();
        {
            let s = Store::open(&path).unwrap();
            for r in &all {
                s.upsert(r).unwrap();
            }
            s.delete("i3", 100).unwrap();
        }
        let s = Store::open(&path).unwrap();
        let expected: Vec<_> = all.into_iter().filter(|r| r.name != "i3").collect();
        assert_eq!(s.load_all().unwrap(), expected);
        assert_eq!(s.version("i3").unwrap(), Some(100));
        let sql = "SELECT * FROM pragma_journal_mode, pragma_synchronous, pragma_user_version";
        let got: (String, i64, i64) =
            (s.conn.lock()).query_row(sql, [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap();
        assert_eq!(got, ("wal".into(), 2, MIGRATIONS.len() as i64));
    }

    #[test]
    fn future_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("paddock.db");
        drop(Store::open(&path).unwrap());
        let future = MIGRATIONS.len() as i64 + 1;
        Connection::open(&path).unwrap().pragma_update(None, "user_version", future).unwrap();
        let err = Store::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::NewerSchema { found, .. } if found == future), "{err:?}");
        assert!(err.to_string().contains("newer paddock"), "{err}");
        let uv: i64 = Connection::open(&path).unwrap().pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(uv, future, "the database must be left untouched");
    }

    #[test]
    fn invalid_json_config_is_rejected_and_reported() {
        let s = Store::open_in_memory().unwrap();
        let insert =
            "INSERT INTO instances VALUES ('bad', '{not json', 0, '2024-01-01T00:00:00Z', '2024-01-01T00:00:00Z', 1)";
        let err = s.conn.lock().execute(insert, []).unwrap_err();
        assert!(err.to_string().contains("CHECK constraint failed"), "{err}");
        // A row that got past the CHECK anyway is reported, not skipped.
        s.upsert(&rec("good", 1)).unwrap();
        s.conn.lock().pragma_update(None, "ignore_check_constraints", true).unwrap();
        s.conn.lock().execute(insert, []).unwrap();
        match s.load_all() {
            Err(StoreError::CorruptRow { name, .. }) => assert_eq!(name, "bad"),
            other => panic!("expected a corrupt row, got {other:?}"),
        }
    }

    #[test]
    fn concurrent_upserts_keep_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("paddock.db")).unwrap();
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut max = HashMap::new();
                    for i in 0..200u64 {
                        // A permutation of 1..=200, so versions arrive out of order.
                        let p = (i * 7919) % 200 + 1;
                        let (name, v) = if i % 2 == 0 {
                            (format!("own{t}"), p)
                        } else {
                            (format!("shared{}", i % 3), p * 8 + t) // distinct across threads
                        };
                        s.upsert(&rec(&name, v)).unwrap();
                        let m = max.entry(name).or_insert(0);
                        *m = v.max(*m);
                    }
                    max
                })
            })
            .collect();
        let mut expected: HashMap<String, u64> = HashMap::new();
        for t in threads {
            for (name, v) in t.join().unwrap() {
                let m = expected.entry(name).or_insert(0);
                *m = v.max(*m);
            }
        }
        let all = s.load_all().unwrap();
        assert_eq!(all.len(), expected.len());
        for r in all {
            assert_eq!(r.version, expected[&r.name], "{}", r.name);
            assert_eq!(r.config["v"], r.version, "{}: config of another version", r.name);
        }
    }

    const WRITER_ENV: &str = "PADDOCK_STORE_CRASH_WRITER";

    /// Writes forever, printing "ACK name version" after each upsert returned.
    fn crash_writer(path: &Path, base: u64) -> ! {
        let s = Store::open(path).unwrap();
        let mut out = std::io::stdout().lock();
        for n in 0u64.. {
            let mut r = rec(&format!("w{}", n % 17), base + n);
            r.config["pad"] = "x".repeat((n as usize * 37) % 3000).into();
            s.upsert(&r).unwrap();
            writeln!(out, "ACK {} {}", r.name, r.version).unwrap();
            out.flush().unwrap();
        }
        unreachable!()
    }

    #[test]
    fn acknowledged_writes_survive_sigkill() {
        if let Ok(spec) = std::env::var(WRITER_ENV) {
            let (base, path) = spec.split_once(':').unwrap();
            crash_writer(Path::new(path), base.parse().unwrap());
        }
        use std::hash::{BuildHasher, Hasher};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("paddock.db");
        let mut acked: HashMap<String, u64> = HashMap::new();
        for cycle in 1..=5u64 {
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args(["acknowledged_writes_survive_sigkill", "--nocapture", "--test-threads=1"])
                .env(WRITER_ENV, format!("{}:{}", cycle * 1_000_000, path.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            let (tx, rx) = mpsc::channel();
            let reader = std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    // libtest's "test ... " (no newline) may precede the first ACK on its line.
                    let ack = line.rfind("ACK ").map(|i| &line[i + 4..]);
                    if let Some((name, v)) = ack.and_then(|l| l.split_once(' ')) {
                        tx.send((name.to_string(), v.parse::<u64>().unwrap())).unwrap();
                    }
                }
            });
            let first = rx.recv_timeout(Duration::from_secs(30));
            if first.is_ok() {
                let jitter = std::collections::hash_map::RandomState::new().build_hasher().finish();
                std::thread::sleep(Duration::from_millis(100 + jitter % 300));
            }
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            reader.join().unwrap();
            let got: Vec<_> = first.into_iter().chain(rx.try_iter()).collect();
            assert!(!got.is_empty(), "cycle {cycle}: the writer acknowledged nothing");
            for (name, v) in got {
                let m = acked.entry(name).or_insert(0);
                *m = v.max(*m);
            }

            let s = Store::open(&path).unwrap();
            let check: String = s.conn.lock().query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
            assert_eq!(check, "ok", "cycle {cycle}");
            let stored: HashMap<_, _> = s.load_all().unwrap().into_iter().map(|r| (r.name.clone(), r)).collect();
            for (name, v) in &acked {
                let r = stored.get(name).unwrap_or_else(|| panic!("cycle {cycle}: {name} lost"));
                assert!(r.version >= *v, "cycle {cycle}: {name} at {} < acked {v}", r.version);
                assert_eq!(r.config["v"], r.version, "cycle {cycle}: {name} torn");
            }
        }
    }
}
