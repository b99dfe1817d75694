//! Login tokens: JWTs signed with HS256 and nothing else.
//!
//! The algorithm is fixed on both sides: a token whose header names another one (`none`,
//! HS512, RS256 with the secret as a "public key"…) is refused, as is one past its `exp`
//! (no leeway: the configured lifetime is the lifetime).

use std::io::Write;
use std::path::Path;

use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::AuthError;
use crate::config::AuthConfig;

/// The data dir's file holding the signing secret when the config gives none.
pub const SECRET_FILE: &str = "jwt-secret";

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user's name.
    pub sub: String,
    pub iat: i64,
    pub exp: i64,
    /// Unique per token, so two issued in the same second differ.
    pub jti: String,
}

/// `POST /api/auth/login` and `/refresh`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IssuedToken {
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: chrono::Duration,
}

impl TokenKeys {
    pub fn load(config: &AuthConfig, data_dir: &Path) -> Result<TokenKeys, String> {
        let secret = match &config.jwt_secret {
            Some(s) => s.clone().into_bytes(),
            None => load_or_create_secret(&data_dir.join(SECRET_FILE))?,
        };
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(TokenKeys {
            encoding: EncodingKey::from_secret(&secret),
            decoding: DecodingKey::from_secret(&secret),
            validation,
            ttl: chrono::Duration::seconds(config.token_ttl as i64),
        })
    }

    pub fn issue(&self, user: &str) -> Result<IssuedToken, AuthError> {
        let now = Utc::now();
        let expires_at = now + self.ttl;
        let claims = Claims {
            sub: user.to_string(),
            iat: now.timestamp(),
            exp: expires_at.timestamp(),
            jti: super::random_token(12),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::Internal(format!("cannot sign token: {e}")))?;
        Ok(IssuedToken { token, expires_at: DateTime::from_timestamp(claims.exp, 0).unwrap_or(expires_at) })
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map(|d| d.claims).map_err(|e| {
            AuthError::Unauthenticated(match e.kind() {
                ErrorKind::ExpiredSignature => "token expired; log in again".into(),
                ErrorKind::InvalidSignature => "token signature is invalid".into(),
                ErrorKind::InvalidAlgorithm => "token must be signed with HS256".into(),
                _ => format!("invalid token: {e}"),
            })
        })
    }
}

/// Reads the secret, or creates 32 random bytes (hex) in a 0600 file. A temporary file renamed
/// into place without overwriting: a crash leaves no half secret, and of two processes starting
/// at once both end up with the one that won.
fn load_or_create_secret(path: &Path) -> Result<Vec<u8>, String> {
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().len() >= 32 => return Ok(s.trim().as_bytes().to_vec()),
        Ok(_) => return Err(format!("{} holds no usable secret (want at least 32 characters)", path.display())),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("cannot read {}: {e}", path.display()))
        }
        Err(_) => {}
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let secret = super::hex(&super::random_bytes(32));
    // NamedTempFile is created with mode 0600.
    let write = || -> std::io::Result<()> {
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(secret.as_bytes())?;
        tmp.as_file().sync_all()?;
        match tmp.persist_noclobber(path) {
            Ok(_) => Ok(()),
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e.error),
        }
    };
    write().map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let stored = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(stored.trim().as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(secret: &str, ttl: u64) -> TokenKeys {
        let config = AuthConfig { jwt_secret: Some(secret.into()), token_ttl: ttl, ..Default::default() };
        TokenKeys::load(&config, Path::new("/nonexistent")).unwrap()
    }

    #[test]
    fn tokens_verify_only_with_their_secret_and_algorithm() {
        let a = keys("a-secret-of-at-least-32-characters!!", 60);
        let issued = a.issue("alice").unwrap();
        assert_eq!(a.verify(&issued.token).unwrap().sub, "alice");
        let b = keys("another-secret-of-32-characters!!!!!", 60);
        assert!(b.verify(&issued.token).is_err());
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &Claims { sub: "alice".into(), iat: 0, exp: Utc::now().timestamp() + 60, jti: "x".into() },
            &EncodingKey::from_secret(b"a-secret-of-at-least-32-characters!!"),
        )
        .unwrap();
        assert!(matches!(a.verify(&hs512), Err(AuthError::Unauthenticated(m)) if m.contains("HS256")));
    }

    #[test]
    fn the_secret_file_is_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SECRET_FILE);
        let first = load_or_create_secret(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load_or_create_secret(&path).unwrap(), first);
    }
}
