//! Who may call what: users with roles, API keys, signed login tokens.
//!
//! # Layout
//! - this file: the [`Auth`] handle (users and keys cached in memory, written through to the
//!   database), [`Principal`] (who a request acts as) and [`Need`] (what a route requires).
//! - [`token`]: HS256 login tokens and the secret that signs them.
//! - [`store`]: the SQL.
//!
//! # When auth is on
//! Off only while paddock listens on loopback and no user or key exists; on otherwise. Creating
//! the first credential on an open loopback server turns it on at once, so the first one must
//! be an admin (else nobody could manage paddock any more).
//!
//! # Credentials
//! - Login tokens (JWT, HS256) carry the user's name; the role is read from the current user
//!   list at each request, so deleting a user or changing a role takes effect at once.
//! - API keys look like `pdk_<id>_<secret>`. Only the secret's SHA-256 is stored; the id finds
//!   the key and the digest is compared in constant time. Keys are random 256-bit values, so a
//!   fast digest is enough (a password hash would cost every request ~50 ms for nothing).
//! - Passwords are hashed with argon2id; login against an unknown user hashes too, so timing
//!   does not tell which users exist.

pub mod store;
pub mod token;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::AuthConfig;
use store::{AuthStore, DeleteOutcome};
pub use token::IssuedToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything.
    Admin,
    /// Read-only management, and inference.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// Acts as its role on every route.
    Management,
    /// Reaches only `/v1/*` and instance routes, optionally of some instances only.
    Inference,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Management => "management",
            KeyKind::Inference => "inference",
        }
    }
}

/// A user as stored.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub role: Role,
    /// argon2id, PHC string.
    pub password_hash: String,
    pub created_at: DateTime<Utc>,
}

/// An API key as stored (never the key itself).
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub kind: KeyKind,
    /// A management key's role; inference keys are `viewer`.
    pub role: Role,
    /// The instances an inference key may use; None = all.
    pub instances: Option<Vec<String>>,
    /// Hex SHA-256 of the key's secret part.
    pub secret_sha256: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

/// What `GET /api/auth/users` shows of a user.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct UserView {
    pub username: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
}

/// What `GET /api/auth/keys` shows of a key; `key` only in the answer that creates it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct KeyView {
    pub id: String,
    pub name: String,
    pub kind: KeyKind,
    pub role: Role,
    /// The instances an inference key may use; absent = all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instances: Option<Vec<String>>,
    /// The key's first characters, to recognise it.
    pub prefix: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    /// The key itself: shown once, at creation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// `POST /api/auth/users`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    pub username: String,
    pub password: String,
    #[serde(default = "viewer")]
    pub role: Role,
}

/// `POST /api/auth/keys`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    pub name: String,
    pub kind: KeyKind,
    /// A management key's role [default: viewer]; not allowed on inference keys.
    pub role: Option<Role>,
    /// Instances an inference key may use [default: all]; not allowed on management keys.
    pub instances: Option<Vec<String>>,
}

fn viewer() -> Role {
    Role::Viewer
}

/// Who a request acts as.
#[derive(Debug, Clone, PartialEq)]
pub enum Principal {
    /// Auth is off: loopback and no credentials.
    Open,
    User {
        name: String,
        role: Role,
    },
    Key {
        id: String,
        kind: KeyKind,
        role: Role,
        instances: Option<Vec<String>>,
    },
}

/// What a route requires of its caller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Need<'a> {
    /// Inference on the named instance, or on one not known yet (the `/v1` body names it: the
    /// handler checks [`Principal::may_use`] once it is read).
    Inference(Option<&'a str>),
    /// Reading management state.
    Read,
    /// Changing management state.
    Write,
    /// Users and keys.
    Admin,
    /// A login token to exchange for a new one.
    LoginToken,
}

impl Principal {
    /// The identity rate limits count against; None = the client's address.
    pub fn rate_key(&self) -> Option<String> {
        match self {
            Principal::Open => None,
            Principal::User { name, .. } => Some(format!("user:{name}")),
            Principal::Key { id, .. } => Some(format!("key:{id}")),
        }
    }

    pub fn may_use(&self, instance: &str) -> bool {
        match self {
            Principal::Key { kind: KeyKind::Inference, instances: Some(list), .. } => {
                list.iter().any(|i| i == instance)
            }
            _ => true,
        }
    }

    /// Ok, or why not (a 403).
    pub fn check(&self, need: Need<'_>) -> Result<(), AuthError> {
        let role = match self {
            Principal::Open => return Ok(()),
            Principal::User { role, .. } => *role,
            Principal::Key { kind: KeyKind::Inference, .. } => {
                return match need {
                    Need::Inference(Some(name)) if !self.may_use(name) => {
                        Err(AuthError::Forbidden(format!("this API key may not use instance '{name}'")))
                    }
                    Need::Inference(_) => Ok(()),
                    Need::LoginToken => Err(not_a_login_token()),
                    _ => Err(AuthError::Forbidden("inference API keys reach only /v1 and instance routes".into())),
                };
            }
            Principal::Key { role, .. } => *role,
        };
        match (need, role) {
            (Need::LoginToken, _) if !matches!(self, Principal::User { .. }) => Err(not_a_login_token()),
            (Need::Inference(_) | Need::Read | Need::LoginToken, _) | (_, Role::Admin) => Ok(()),
            (Need::Write, Role::Viewer) => Err(AuthError::Forbidden("viewers may not change anything".into())),
            (Need::Admin, Role::Viewer) => Err(AuthError::Forbidden("only admins manage users and keys".into())),
        }
    }
}

fn not_a_login_token() -> AuthError {
    AuthError::Forbidden("only login tokens are refreshed; API keys do not expire".into())
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// No, bad, expired or revoked credentials (401).
    #[error("{0}")]
    Unauthenticated(String),
    /// Valid credentials without the right (403).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Invalid(String),
    #[error("user '{0}' does not exist")]
    UserNotFound(String),
    #[error("API key '{0}' does not exist")]
    KeyNotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
}

/// The auth state. Cheap to clone.
#[derive(Clone)]
pub struct Auth {
    inner: Arc<Inner>,
}

struct Inner {
    /// Listening beyond loopback: auth stays on even without credentials.
    must_auth: bool,
    store: AuthStore,
    users: RwLock<HashMap<String, User>>,
    keys: RwLock<HashMap<String, ApiKey>>,
    tokens: token::TokenKeys,
    /// Serializes writes so the database and the caches change in the same order.
    writes: tokio::sync::Mutex<()>,
    /// Verified against when a login names no known user, so both take as long.
    decoy_hash: String,
}

impl Auth {
    /// Opens the auth tables of `database`, loads the signing secret (from config, else the
    /// data dir's `jwt-secret`, created 0600 on first start) and bootstraps the configured admin.
    pub fn open(config: &AuthConfig, database: &Path, data_dir: &Path, loopback: bool) -> Result<Auth, String> {
        let store = AuthStore::open(database).map_err(|e| e.to_string())?;
        let users = store.users().map_err(|e| e.to_string())?;
        let keys = store.keys().map_err(|e| e.to_string())?;
        let tokens = token::TokenKeys::load(config, data_dir)?;
        let decoy_hash = hash_password(&random_token(16))?;
        let auth = Auth {
            inner: Arc::new(Inner {
                must_auth: !loopback,
                store,
                users: RwLock::new(users.into_iter().map(|u| (u.name.clone(), u)).collect()),
                keys: RwLock::new(keys.into_iter().map(|k| (k.id.clone(), k)).collect()),
                tokens,
                writes: tokio::sync::Mutex::new(()),
                decoy_hash,
            }),
        };
        if let Some(password) = &config.admin_password {
            let name = &config.admin_username;
            if !auth.inner.users.read().contains_key(name) {
                let user = new_user(name, password, Role::Admin)?;
                auth.inner.store.insert_user(&user).map_err(|e| e.to_string())?;
                auth.inner.users.write().insert(user.name.clone(), user);
                tracing::info!("created admin user '{name}'");
            }
        }
        if auth.inner.must_auth && !auth.has_credentials() {
            return Err("paddock listens beyond loopback and no credentials are configured, so anyone who \
                 reaches the port could run it: set PADDOCK_ADMIN_PASSWORD (or auth.admin_password in the \
                 config file) to create an admin, or listen on 127.0.0.1"
                .into());
        }
        Ok(auth)
    }

    fn has_credentials(&self) -> bool {
        !self.inner.users.read().is_empty() || !self.inner.keys.read().is_empty()
    }

    /// Whether requests must carry credentials.
    pub fn active(&self) -> bool {
        self.inner.must_auth || self.has_credentials()
    }

    /// Who `credential` (a login token or an API key) is.
    pub fn authenticate(&self, credential: &str) -> Result<Principal, AuthError> {
        if let Some(rest) = credential.strip_prefix(KEY_PREFIX) {
            let invalid = || AuthError::Unauthenticated("invalid API key".into());
            let (id, secret) = rest.split_once('_').ok_or_else(invalid)?;
            let keys = self.inner.keys.read();
            let key = keys.get(id).ok_or_else(invalid)?;
            let digest = sha256_hex(secret);
            if !bool::from(digest.as_bytes().ct_eq(key.secret_sha256.as_bytes())) {
                return Err(invalid());
            }
            return Ok(Principal::Key {
                id: key.id.clone(),
                kind: key.kind,
                role: key.role,
                instances: key.instances.clone(),
            });
        }
        let claims = self.inner.tokens.verify(credential)?;
        let users = self.inner.users.read();
        let user = users
            .get(&claims.sub)
            .ok_or_else(|| AuthError::Unauthenticated(format!("user '{}' no longer exists", claims.sub)))?;
        Ok(Principal::User { name: user.name.clone(), role: user.role })
    }

    pub async fn login(&self, username: &str, password: &str) -> Result<IssuedToken, AuthError> {
        let hash = self.inner.users.read().get(username).map(|u| u.password_hash.clone());
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.inner.decoy_hash.clone());
        let password = password.to_string();
        let matches = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
            .await
            .map_err(|e| AuthError::Internal(e.to_string()))?;
        if !(known && matches) {
            return Err(AuthError::Unauthenticated("wrong username or password".into()));
        }
        self.inner.tokens.issue(username)
    }

    /// A new token for the user a login token belongs to.
    pub fn refresh(&self, principal: &Principal) -> Result<IssuedToken, AuthError> {
        principal.check(Need::LoginToken)?;
        match principal {
            Principal::User { name, .. } => self.inner.tokens.issue(name),
            // Auth is off: there is no login token to exchange.
            _ => Err(AuthError::Unauthenticated("refresh needs a login token, and auth is off".into())),
        }
    }

    pub fn users(&self) -> Vec<UserView> {
        let mut users: Vec<UserView> = self
            .inner
            .users
            .read()
            .values()
            .map(|u| UserView { username: u.name.clone(), role: u.role, created_at: u.created_at })
            .collect();
        users.sort_by(|a, b| a.username.cmp(&b.username));
        users
    }

    pub async fn create_user(&self, request: NewUser) -> Result<UserView, AuthError> {
        validate_name("username", &request.username)?;
        if request.password.chars().count() < MIN_PASSWORD {
            return Err(AuthError::Invalid(format!("password must be at least {MIN_PASSWORD} characters")));
        }
        let _write = self.inner.writes.lock().await;
        if request.role != Role::Admin && !self.active() {
            return Err(first_must_be_admin());
        }
        let NewUser { username, password, role } = request;
        let user = tokio::task::spawn_blocking(move || new_user(&username, &password, role))
            .await
            .map_err(|e| AuthError::Internal(e.to_string()))?
            .map_err(AuthError::Internal)?;
        let inserted = self.blocking(|store, user| store.insert_user(user), user.clone()).await?;
        if !inserted {
            return Err(AuthError::Conflict(format!("user '{}' already exists", user.name)));
        }
        let view = UserView { username: user.name.clone(), role: user.role, created_at: user.created_at };
        self.inner.users.write().insert(user.name.clone(), user);
        Ok(view)
    }

    pub async fn delete_user(&self, name: &str) -> Result<(), AuthError> {
        let _write = self.inner.writes.lock().await;
        match self.blocking(|store, name| store.delete_user(name), name.to_string()).await? {
            DeleteOutcome::Deleted => {
                self.inner.users.write().remove(name);
                Ok(())
            }
            DeleteOutcome::NotFound => Err(AuthError::UserNotFound(name.to_string())),
            DeleteOutcome::LastAdmin => {
                Err(AuthError::Conflict(format!("'{name}' is the last admin; create another admin first")))
            }
        }
    }

    pub fn keys(&self) -> Vec<KeyView> {
        let mut keys: Vec<KeyView> = self.inner.keys.read().values().map(|k| key_view(k, None)).collect();
        keys.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
        keys
    }

    /// Creates a key; the answer holds the key itself, which is not kept.
    pub async fn create_key(&self, request: NewKey, by: &Principal) -> Result<KeyView, AuthError> {
        validate_name("name", &request.name)?;
        let (role, instances) = match request.kind {
            KeyKind::Management if request.instances.is_some() => {
                return Err(AuthError::Invalid("instances applies to inference keys only".into()))
            }
            KeyKind::Management => (request.role.unwrap_or(Role::Viewer), None),
            KeyKind::Inference if request.role.is_some() => {
                return Err(AuthError::Invalid("role applies to management keys only".into()))
            }
            KeyKind::Inference => {
                if let Some(list) = &request.instances {
                    if list.is_empty() {
                        return Err(AuthError::Invalid(
                            "instances must name at least one instance (or be left out for all)".into(),
                        ));
                    }
                    for name in list {
                        crate::instance::validate_name(name).map_err(|e| AuthError::Invalid(e.to_string()))?;
                    }
                }
                (Role::Viewer, request.instances)
            }
        };
        let _write = self.inner.writes.lock().await;
        if !(request.kind == KeyKind::Management && role == Role::Admin) && !self.active() {
            return Err(first_must_be_admin());
        }
        let id = hex(&random_bytes(6));
        let secret = random_token(32);
        let key = ApiKey {
            id: id.clone(),
            name: request.name,
            kind: request.kind,
            role,
            instances,
            secret_sha256: sha256_hex(&secret),
            created_by: match by {
                Principal::Open => "anonymous (auth off)".into(),
                Principal::User { name, .. } => format!("user:{name}"),
                Principal::Key { id, .. } => format!("key:{id}"),
            },
            created_at: Utc::now(),
        };
        self.blocking(|store, key| store.insert_key(key), key.clone()).await?;
        let view = key_view(&key, Some(format!("{KEY_PREFIX}{id}_{secret}")));
        self.inner.keys.write().insert(id, key);
        Ok(view)
    }

    pub async fn delete_key(&self, id: &str) -> Result<(), AuthError> {
        let _write = self.inner.writes.lock().await;
        if !self.blocking(|store, id| store.delete_key(id), id.to_string()).await? {
            return Err(AuthError::KeyNotFound(id.to_string()));
        }
        self.inner.keys.write().remove(id);
        Ok(())
    }

    /// Runs a store call on a blocking thread.
    async fn blocking<T: Send + 'static, R: Send + 'static>(
        &self,
        f: impl FnOnce(&AuthStore, &T) -> Result<R, store::AuthStoreError> + Send + 'static,
        arg: T,
    ) -> Result<R, AuthError> {
        let auth = self.clone();
        tokio::task::spawn_blocking(move || f(&auth.inner.store, &arg))
            .await
            .map_err(|e| AuthError::Internal(e.to_string()))?
            .map_err(|e| AuthError::Internal(e.to_string()))
    }
}

const KEY_PREFIX: &str = "pdk_";
const MIN_PASSWORD: usize = 8;

fn first_must_be_admin() -> AuthError {
    AuthError::Conflict(
        "auth is off until the first credential exists, and it turns on with it: the first user (or key) \
         must be an admin, or nobody could manage paddock"
            .into(),
    )
}

fn key_view(k: &ApiKey, key: Option<String>) -> KeyView {
    KeyView {
        id: k.id.clone(),
        name: k.name.clone(),
        kind: k.kind,
        role: k.role,
        instances: k.instances.clone(),
        prefix: format!("{KEY_PREFIX}{}_", k.id),
        created_by: k.created_by.clone(),
        created_at: k.created_at,
        key,
    }
}

fn validate_name(field: &str, name: &str) -> Result<(), AuthError> {
    let ok = (1..=64).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if ok {
        Ok(())
    } else {
        Err(AuthError::Invalid(format!("{field} must be 1-64 characters of letters, digits, '.', '_', '-', '@'")))
    }
}

fn new_user(name: &str, password: &str, role: Role) -> Result<User, String> {
    Ok(User { name: name.to_string(), role, password_hash: hash_password(password)?, created_at: Utc::now() })
}

fn hash_password(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash password: {e}"))
}

fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).expect("the OS random source failed");
    bytes
}

/// `n` random bytes, base64url without padding.
fn random_token(n: usize) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes(n))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_key_kinds_grant_what_they_should() {
        let admin = Principal::User { name: "a".into(), role: Role::Admin };
        let viewer = Principal::User { name: "v".into(), role: Role::Viewer };
        let mgmt_viewer =
            Principal::Key { id: "k".into(), kind: KeyKind::Management, role: Role::Viewer, instances: None };
        let scoped = Principal::Key {
            id: "i".into(),
            kind: KeyKind::Inference,
            role: Role::Viewer,
            instances: Some(vec!["a".into()]),
        };
        for need in [Need::Read, Need::Write, Need::Admin, Need::Inference(Some("b")), Need::LoginToken] {
            assert!(admin.check(need).is_ok(), "{need:?}");
            assert!(Principal::Open.check(need).is_ok());
        }
        assert!(viewer.check(Need::Read).is_ok() && viewer.check(Need::Inference(Some("b"))).is_ok());
        assert!(viewer.check(Need::Write).is_err() && viewer.check(Need::Admin).is_err());
        assert!(mgmt_viewer.check(Need::Read).is_ok() && mgmt_viewer.check(Need::Write).is_err());
        assert!(mgmt_viewer.check(Need::LoginToken).is_err());
        assert!(scoped.check(Need::Inference(Some("a"))).is_ok());
        assert!(scoped.check(Need::Inference(None)).is_ok());
        assert!(scoped.check(Need::Inference(Some("b"))).is_err());
        assert!(scoped.check(Need::Read).is_err() && scoped.check(Need::LoginToken).is_err());
    }

    #[test]
    fn passwords_verify_only_against_their_own_hash() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("correct horsf", &hash));
        assert!(!verify_password("correct horse", "not a hash"));
    }
}
