//! The axum extractor for [`Session`].

use axum_core::extract::FromRequestParts;
use http::request::Parts;
use http::StatusCode;

use crate::Session;

impl<S: Send + Sync> FromRequestParts<S> for Session {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Session>().cloned().ok_or((
            StatusCode::INTERNAL_SERVER_ERROR,
            "tether: Session extractor used without SessionLayer\n",
        ))
    }
}
