//! Handlers the layer's integration tests share: the brief's login and
//! `/mypage`.

use axum::http::StatusCode;
use tether::{Session, SessionError};

/// Logs in the member named by the body (7 when it names none), with a
/// fresh session ID as a login should have.
pub async fn login(session: Session, body: String) -> Result<&'static str, SessionError> {
    session.cycle_id().await?;
    session
        .insert("loginMember", body.trim().parse::<u64>().unwrap_or(7))
        .await?;
    Ok("ok")
}

/// The logged-in member's number, or 401.
pub async fn mypage(session: Session) -> Result<(StatusCode, String), SessionError> {
    Ok(match session.get::<u64>("loginMember").await? {
        Some(m) => (StatusCode::OK, m.to_string()),
        None => (StatusCode::UNAUTHORIZED, "not logged in".into()),
    })
}
