//! Bearer-token auth with three roles (`read` ⊂ `write` ⊂ `admin`).
//!
//! Tokens are random, shown once, and stored only as SHA-256 hashes. On first start (no token
//! in the store) an admin token is created and written to `<data-dir>/admin.token` with mode
//! 0600, where the CLI finds it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::Response;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::AppState;
use crate::store::{keys, KvOp, Store, StoreError};
use crate::types::Role;

/// File name of the admin token inside the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

#[derive(Serialize, Deserialize)]
struct TokenRecord {
    role: Role,
    created_at: chrono::DateTime<chrono::Utc>,
}

/// The token table.
pub struct Auth {
    store: Store,
    tokens: RwLock<HashMap<String, Role>>,
    /// `--insecure-no-auth`: every request is admin.
    disabled: bool,
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn new_token() -> String {
    let a = uuid::Uuid::new_v4();
    let b = uuid::Uuid::new_v4();
    format!("th_{}{}", a.simple(), b.simple())
}

impl Auth {
    /// Load tokens; on first start create the admin token file. Returns the path of the file
    /// when it was just written.
    pub async fn open(
        store: Store,
        data_dir: &Path,
        disabled: bool,
    ) -> Result<(Auth, Option<PathBuf>), StoreError> {
        let mut tokens = HashMap::new();
        for kv in store.scan_prefix(&[keys::TOKEN]) {
            let (k, v) = kv?;
            let rec: TokenRecord = serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                key: "token".into(),
                reason: e.to_string(),
            })?;
            tokens.insert(String::from_utf8_lossy(&k[1..]).into_owned(), rec.role);
        }
        let auth = Auth {
            store,
            tokens: RwLock::new(tokens),
            disabled,
        };
        let mut created = None;
        if auth.tokens.read().is_empty() {
            let token = auth.create(Role::Admin).await?;
            let path = data_dir.join(ADMIN_TOKEN_FILE);
            write_secret(&path, &token).map_err(StoreError::io(format!(
                "writing the admin token to {}",
                path.display()
            )))?;
            created = Some(path);
        }
        Ok((auth, created))
    }

    /// Create a token with a role; the plain token is returned once and never stored.
    ///
    /// # Errors
    /// The store's, when the token cannot be made durable (it is then not valid either).
    pub async fn create(&self, role: Role) -> Result<String, StoreError> {
        let token = new_token();
        let h = hash(&token);
        let rec = TokenRecord {
            role,
            created_at: chrono::Utc::now(),
        };
        let rec = serde_json::to_vec(&rec).expect("token record serializes");
        self.store
            .write(vec![KvOp::Put(keys::token(&h), rec)])
            .await?;
        self.tokens.write().insert(h, role);
        Ok(token)
    }

    /// The role of a presented `Authorization` header value.
    pub fn role_of(&self, header: Option<&str>) -> Result<Role, ApiError> {
        if self.disabled {
            return Ok(Role::Admin);
        }
        let h = header.ok_or_else(|| {
            ApiError::Unauthorized("missing `Authorization: Bearer <token>` header".into())
        })?;
        let token = h.strip_prefix("Bearer ").ok_or_else(|| {
            ApiError::Unauthorized("expected `Authorization: Bearer <token>`".into())
        })?;
        self.tokens
            .read()
            .get(&hash(token.trim()))
            .copied()
            .ok_or_else(|| ApiError::Unauthorized("unknown token".into()))
    }
}

fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    writeln!(f, "{secret}")
}

/// The role a request needs: `None` for public routes.
pub fn required_role(method: &Method, path: &str) -> Option<Role> {
    if matches!(path, "/healthz" | "/metrics" | "/v1/openapi.json") {
        return None;
    }
    // API.md: `write` covers twins, ingest, workflows and rules; running a compute module is
    // a computation like a workflow step; uploading code and binding it is `admin`.
    if path == "/v1/changes" || path.starts_with("/v1/sync/") {
        return Some(Role::Peer);
    }
    let invoke = path.starts_with("/v1/modules/") && path.ends_with("/invoke");
    let admin_area = !invoke
        && [
            "/v1/models",
            "/v1/modules",
            "/v1/peers",
            "/v1/tokens",
            "/v1/behaviors",
        ]
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}/")));
    let reading = matches!(*method, Method::GET | Method::HEAD) || path == "/v1/query";
    Some(match (reading, admin_area) {
        (true, _) if path.starts_with("/v1/tokens") => Role::Admin,
        (true, _) => Role::Read,
        (false, true) => Role::Admin,
        (false, false) => Role::Write,
    })
}

/// `?access_token=` on the event streams: browsers cannot set headers on `EventSource` or
/// `WebSocket`. Only there, since a URL ends up in logs and histories more easily.
fn stream_token(uri: &axum::http::Uri) -> Option<&str> {
    if !matches!(uri.path(), "/v1/events" | "/v1/events/ws") {
        return None;
    }
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("access_token="))
}

/// Middleware: check the bearer token against the route's role.
pub async fn require(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(need) = required_role(req.method(), req.uri().path()) {
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| stream_token(req.uri()).map(|t| format!("Bearer {t}")));
        let role = state.auth.role_of(header.as_deref())?;
        if !role.allows(need) {
            return Err(ApiError::Forbidden(format!(
                "this call needs the {need} role; the token has {role}"
            )));
        }
    }
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_follow_api_md() {
        assert_eq!(required_role(&Method::GET, "/healthz"), None);
        assert_eq!(
            required_role(&Method::PUT, "/v1/rules/r"),
            Some(Role::Write)
        );
        assert_eq!(
            required_role(&Method::POST, "/v1/modules/m/invoke"),
            Some(Role::Write)
        );
        assert_eq!(
            required_role(&Method::PUT, "/v1/modules/m"),
            Some(Role::Admin)
        );
        assert_eq!(
            required_role(&Method::PUT, "/v1/behaviors/b"),
            Some(Role::Admin)
        );
        assert_eq!(required_role(&Method::GET, "/v1/twins"), Some(Role::Read));
        assert_eq!(required_role(&Method::POST, "/v1/query"), Some(Role::Read));
        assert_eq!(required_role(&Method::POST, "/v1/twins"), Some(Role::Write));
        assert_eq!(
            required_role(&Method::POST, "/v1/ingest"),
            Some(Role::Write)
        );
        assert_eq!(
            required_role(&Method::PUT, "/v1/models/machine"),
            Some(Role::Admin)
        );
        assert_eq!(
            required_role(&Method::GET, "/v1/models/machine"),
            Some(Role::Read)
        );
        assert_eq!(
            required_role(&Method::POST, "/v1/tokens"),
            Some(Role::Admin)
        );
        assert_eq!(required_role(&Method::GET, "/v1/tokens"), Some(Role::Admin));
        // A prefix that only looks like an admin route is not one.
        assert_eq!(
            required_role(&Method::POST, "/v1/modelsx"),
            Some(Role::Write)
        );
    }
}
