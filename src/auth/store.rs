//! Users and API keys in SQLite (the `users` and `api_keys` tables of paddock's database; the
//! instance store creates them with the rest of the schema).
//!
//! Every method blocks: call from a blocking thread. Each write is one statement, so one
//! transaction; WAL with `synchronous=FULL` makes an acknowledged write survive a kill.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use parking_lot::Mutex;
use rusqlite::{params, Connection};

use super::{ApiKey, KeyKind, Role, User};

#[derive(Debug, thiserror::Error)]
pub enum AuthStoreError {
    #[error("auth database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("auth database: corrupt row {what}")]
    Corrupt { what: String },
}

pub struct AuthStore {
    conn: Mutex<Connection>,
}

impl AuthStore {
    /// Opens the database the instance registry has already opened and migrated.
    pub fn open(path: &Path) -> Result<AuthStore, AuthStoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        Ok(AuthStore { conn: Mutex::new(conn) })
    }

    pub fn users(&self) -> Result<Vec<User>, AuthStoreError> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare("SELECT name, role, password_hash, created_at FROM users ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?))
        })?;
        rows.map(|row| {
            let (name, role, password_hash, created_at) = row?;
            Ok(User { role: parse_role(&role)?, created_at: parse_time(&created_at)?, name, password_hash })
        })
        .collect()
    }

    /// Inserts `user`; false if the name is taken.
    pub fn insert_user(&self, user: &User) -> Result<bool, AuthStoreError> {
        let n = self.conn.lock().execute(
            "INSERT INTO users (name, role, password_hash, created_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO NOTHING",
            params![user.name, user.role.as_str(), user.password_hash, format_time(&user.created_at)],
        )?;
        Ok(n == 1)
    }

    /// Deletes the user unless that would leave no admin while admins exist; returns whether a
    /// row went, in one statement so two concurrent deletes cannot remove the last two admins.
    pub fn delete_user(&self, name: &str) -> Result<DeleteOutcome, AuthStoreError> {
        let conn = self.conn.lock();
        let n = conn.execute(
            "DELETE FROM users WHERE name = ?1
             AND (role != 'admin' OR (SELECT count(*) FROM users WHERE role = 'admin') > 1)",
            params![name],
        )?;
        if n == 1 {
            return Ok(DeleteOutcome::Deleted);
        }
        let exists: bool =
            conn.query_row("SELECT EXISTS (SELECT 1 FROM users WHERE name = ?1)", params![name], |r| r.get(0))?;
        Ok(if exists { DeleteOutcome::LastAdmin } else { DeleteOutcome::NotFound })
    }

    pub fn keys(&self) -> Result<Vec<ApiKey>, AuthStoreError> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare(
            "SELECT id, name, kind, role, instances, secret_sha256, created_by, created_at FROM api_keys ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, String>(7)?,
            ))
        })?;
        rows.map(|row| {
            let (id, name, kind, role, instances, secret_sha256, created_by, created_at) = row?;
            let kind = match kind.as_str() {
                "management" => KeyKind::Management,
                "inference" => KeyKind::Inference,
                other => return Err(AuthStoreError::Corrupt { what: format!("key {id}: kind {other}") }),
            };
            let instances = instances
                .map(|j| serde_json::from_str(&j))
                .transpose()
                .map_err(|e| AuthStoreError::Corrupt { what: format!("key {id}: instances: {e}") })?;
            Ok(ApiKey {
                kind,
                role: parse_role(&role)?,
                instances,
                secret_sha256,
                created_by,
                created_at: parse_time(&created_at)?,
                id,
                name,
            })
        })
        .collect()
    }

    pub fn insert_key(&self, key: &ApiKey) -> Result<(), AuthStoreError> {
        let instances = key.instances.as_ref().map(|i| serde_json::Value::from(i.clone()).to_string());
        self.conn.lock().execute(
            "INSERT INTO api_keys (id, name, kind, role, instances, secret_sha256, created_by, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                key.id,
                key.name,
                key.kind.as_str(),
                key.role.as_str(),
                instances,
                key.secret_sha256,
                key.created_by,
                format_time(&key.created_at)
            ],
        )?;
        Ok(())
    }

    pub fn delete_key(&self, id: &str) -> Result<bool, AuthStoreError> {
        Ok(self.conn.lock().execute("DELETE FROM api_keys WHERE id = ?1", params![id])? == 1)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    NotFound,
    LastAdmin,
}

fn parse_role(s: &str) -> Result<Role, AuthStoreError> {
    match s {
        "admin" => Ok(Role::Admin),
        "viewer" => Ok(Role::Viewer),
        other => Err(AuthStoreError::Corrupt { what: format!("role {other}") }),
    }
}

fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, AuthStoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| AuthStoreError::Corrupt { what: format!("time {s}: {e}") })
}
