//! Extractors that turn every malformed input into an [`ApiError`] with API.md's body,
//! instead of axum's plain-text rejections.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A JSON body. The content type is not required (curl's `-d` sends a form type); the body
/// must parse. Syntax errors → 400 `invalid_json`, wrong shapes → 400 `bad_request`,
/// over the body limit → 413.
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req, state).await?;
        parse_json(&bytes).map(Json)
    }
}

/// A raw body (a module upload); over the route's limit → JSON 413.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        body_bytes(req, state).await.map(RawBody)
    }
}

/// The raw body, with the limit turned into a 413.
pub async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge("the request body is larger than the server's limit".into())
        } else {
            ApiError::BadRequest(format!("could not read the body: {}", e.body_text()))
        }
    })
}

/// Parse JSON with errors a user can act on.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::InvalidJson(
            "the body is empty; expected JSON".into(),
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| json_error(bytes, e, "invalid body"))
}

/// Tell malformed JSON (`invalid_json`) from well-formed JSON of the wrong shape
/// (`bad_request`). serde reports some shape errors (a number where an enum is expected) as
/// syntax errors, so on failure the text is checked once more for well-formedness.
pub fn json_error(bytes: &[u8], e: serde_json::Error, what: &str) -> ApiError {
    let well_formed = e.classify() == serde_json::error::Category::Data
        || serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok();
    if well_formed {
        ApiError::BadRequest(format!("{what}: {e}"))
    } else {
        ApiError::InvalidJson(format!("malformed JSON: {e}"))
    }
}

/// Path parameters; a bad UUID → 400.
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|e| ApiError::BadRequest(format!("invalid path: {}", e.body_text())))
    }
}

/// Query-string parameters; a bad value → 400.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e| ApiError::BadRequest(format!("invalid query string: {}", e.body_text())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Lifecycle;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Body {
        state: Lifecycle,
    }

    #[test]
    fn wrong_shapes_are_bad_request_and_broken_json_is_invalid_json() {
        for bad_shape in [&br#"{"state": 1}"#[..], br#"{"state": "gone"}"#, br#"[1]"#] {
            let e = parse_json::<Body>(bad_shape).unwrap_err();
            assert_eq!(
                e.code(),
                "bad_request",
                "{}",
                String::from_utf8_lossy(bad_shape)
            );
        }
        for broken in [&br#"{"state": "#[..], b"{bad", b"   "] {
            let e = parse_json::<Body>(broken).unwrap_err();
            assert_eq!(
                e.code(),
                "invalid_json",
                "{}",
                String::from_utf8_lossy(broken)
            );
        }
        assert_eq!(
            parse_json::<Body>(br#"{"state": "retired"}"#)
                .unwrap()
                .state,
            Lifecycle::Retired
        );
    }
}
