//! Errors a handler can meet through [`crate::Session`].

use axum_core::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use tether_core::StoreError;

/// Why a session operation failed.
///
/// It converts into an HTTP response chosen deliberately: an unreachable store
/// is 503 (the user is not logged out, the request can be retried), an
/// oversized session is 413, anything else 500.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A value could not be serialized to JSON.
    #[error("session attribute {key:?} could not be encoded")]
    Encode {
        /// The attribute.
        key: String,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// A stored value is not of the requested type.
    #[error("session attribute {key:?} does not hold the requested type")]
    Decode {
        /// The attribute.
        key: String,
        /// The deserializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// The session would exceed the store's size limit; nothing was changed.
    #[error("session of {size} bytes would exceed the limit of {limit} bytes")]
    TooLarge {
        /// The size the session would have had.
        size: usize,
        /// The store's limit.
        limit: usize,
    },
    /// `Session::modify` lost the race for attribute `key` on every try:
    /// other requests kept changing it. Nothing of this change was saved.
    #[error("session attribute {key:?} changed concurrently {tries} times in a row; nothing was saved, try again")]
    Contention {
        /// The attribute.
        key: String,
        /// Tries made.
        tries: u32,
    },
    /// The session ended (logout, expiry, a concurrent login) while this
    /// request was changing it; nothing was saved.
    #[error("session ended or was replaced by a concurrent request (logout, login, expiry); nothing was saved")]
    Gone,
    /// This strategy cannot do that (e.g. list a user's tokens without a
    /// revocation store).
    #[error("not supported here: {0}")]
    Unsupported(&'static str),
}

impl SessionError {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Store(e) => store_status(e),
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Contention { .. } | Self::Gone => StatusCode::CONFLICT,
            Self::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
            Self::Encode { .. } | Self::Decode { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

pub(crate) fn store_status(e: &StoreError) -> StatusCode {
    match e {
        StoreError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        StoreError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        StoreError::Conflict | StoreError::LimitReached { .. } => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A plain-text error response; 503s carry `Retry-After` because the
/// condition is expected to pass.
pub(crate) fn error_response(status: StatusCode, message: String) -> Response {
    let mut response = (status, message).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// The body text for a store failure: what happened and what it means for the user.
pub(crate) fn store_message(e: &StoreError) -> String {
    match e {
        StoreError::Unavailable(_) => {
            "session store unavailable: your session is intact, try again shortly\n".to_string()
        }
        other => format!("session error: {other}\n"),
    }
}

impl IntoResponse for SessionError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            Self::Store(e) => store_message(e),
            other => format!("session error: {other}\n"),
        };
        error_response(status, message)
    }
}
