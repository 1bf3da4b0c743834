//! A user's sessions through the layer: the device list, revoking one or
//! all, the session limit, lifecycle events, the expiry reaper, and the
//! same for tokens with a revocation store.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Path;
use axum::http::{header, Request, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use tether::{
    EndReason, EventKind, JwtSessions, LimitPolicy, MemoryStore, Session, SessionConfig,
    SessionError, SessionEvent, SessionLayer, SessionLimit, SessionStore, Timestamp,
};
use tower::ServiceExt;

mod common;
use common::{login, mypage};

async fn sessions(session: Session) -> Result<Json<serde_json::Value>, SessionError> {
    Ok(Json(
        serde_json::json!({ "sessions": session.sessions().await? }),
    ))
}

async fn revoke(session: Session, Path(r): Path<String>) -> Result<String, SessionError> {
    Ok(session.end_session(&r).await?.to_string())
}

async fn everywhere(session: Session) -> Result<String, SessionError> {
    Ok(session.end_all_sessions(false).await?.to_string())
}

async fn others(session: Session) -> Result<String, SessionError> {
    Ok(session.end_all_sessions(true).await?.to_string())
}

async fn logout(session: Session) -> Result<&'static str, SessionError> {
    session.destroy().await?;
    Ok("bye")
}

type Events = Arc<Mutex<Vec<SessionEvent>>>;

struct App {
    router: Router,
    layer: SessionLayer,
    events: Events,
    clock: Arc<std::sync::atomic::AtomicU64>,
}

fn config(events: &Events, clock: &Arc<std::sync::atomic::AtomicU64>) -> SessionConfig {
    let (events, clock) = (events.clone(), clock.clone());
    SessionConfig::default()
        .with_secure(false)
        .with_principal_attribute("loginMember")
        .with_node_name("A")
        .with_idle_timeout(Duration::from_secs(60))
        .with_clock(move || Timestamp(clock.load(std::sync::atomic::Ordering::SeqCst)))
        .with_listener(move |e| events.lock().unwrap().push(e))
}

fn app_with(layer: SessionLayer, limit: Option<SessionLimit>) -> App {
    let events: Events = Arc::default();
    let clock = Arc::new(std::sync::atomic::AtomicU64::new(Timestamp::now().0));
    let mut config = config(&events, &clock);
    if let Some(l) = limit {
        config = config.with_session_limit(l);
    }
    let layer = layer.with_config(config);
    let router = Router::new()
        .route("/login", post(login))
        .route("/mypage", get(mypage))
        .route("/sessions", get(sessions))
        .route("/sessions/{r}/revoke", post(revoke))
        .route("/logout-everywhere", post(everywhere))
        .route("/logout-others", post(others))
        .route("/logout", post(logout))
        .layer(layer.clone());
    App {
        router,
        layer,
        events,
        clock,
    }
}

fn app(limit: Option<SessionLimit>) -> App {
    app_with(SessionLayer::new(MemoryStore::new()), limit)
}

struct Reply {
    status: StatusCode,
    cookie: Option<String>,
    body: String,
}

impl App {
    async fn send(&self, method: &str, path: &str, cookie: Option<&str>, ua: &str) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::USER_AGENT, ua)
            .header("x-forwarded-for", "203.0.113.9, 10.0.0.1");
        if let Some(c) = cookie {
            req = req.header(header::COOKIE, format!("SESSION={c}"));
        }
        let res = self
            .router
            .clone()
            .oneshot(req.body(Body::from("7")).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let cookie = res
            .headers()
            .get(header::SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("SESSION="))
            .and_then(|v| v.split(';').next())
            .filter(|v| !v.is_empty())
            .map(str::to_string);
        let body = String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec())
            .unwrap();
        Reply {
            status,
            cookie,
            body,
        }
    }

    async fn login(&self, ua: &str) -> String {
        // A millisecond between logins: "oldest" is by login time.
        self.clock.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let r = self.send("POST", "/login", None, ua).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        r.cookie.expect("a session cookie")
    }

    async fn status(&self, cookie: &str) -> StatusCode {
        self.send("GET", "/mypage", Some(cookie), "x").await.status
    }

    async fn list(&self, cookie: &str) -> Vec<serde_json::Value> {
        let r = self.send("GET", "/sessions", Some(cookie), "x").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        v["sessions"].as_array().unwrap().clone()
    }

    fn events(&self) -> Vec<SessionEvent> {
        self.events.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn a_user_lists_their_devices_and_ends_them() {
    let app = app(None);
    let a = app.login("Firefox").await;
    let b = app.login("Safari").await;
    let c = app.login("curl").await;
    let list = app.list(&a).await;
    assert_eq!(list.len(), 3, "{list:?}");
    let current: Vec<_> = list.iter().filter(|s| s["current"] == true).collect();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0]["user_agent"], "Firefox");
    assert_eq!(current[0]["address"], "203.0.113.9");
    assert_eq!(current[0]["node"], "A");
    for s in &list {
        let r = s["ref"].as_str().unwrap();
        assert_eq!(r.len(), 16);
        for id in [&a, &b, &c] {
            assert!(
                !id.contains(r) && !r.contains(id.as_str()),
                "a ref leaks an ID"
            );
        }
        assert!(s["created"].as_u64().is_some() && s["last_access"].as_u64().is_some());
    }
    // Revoke Safari from Firefox: Safari is out at its next request.
    let safari = list.iter().find(|s| s["user_agent"] == "Safari").unwrap()["ref"]
        .as_str()
        .unwrap()
        .to_string();
    let r = app
        .send("POST", &format!("/sessions/{safari}/revoke"), Some(&a), "x")
        .await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "true"));
    assert_eq!(app.status(&b).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.status(&a).await, StatusCode::OK);
    // A ref of someone else's session (or garbage) ends nothing.
    let r = app
        .send("POST", "/sessions/0123456789abcdef/revoke", Some(&a), "x")
        .await;
    assert_eq!(r.body, "false");
    // Everywhere else: curl is out, Firefox stays.
    let r = app.send("POST", "/logout-others", Some(&a), "x").await;
    assert_eq!(r.body, "1");
    assert_eq!(app.status(&c).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.status(&a).await, StatusCode::OK);
    assert_eq!(app.list(&a).await.len(), 1);
    // Everywhere: Firefox too, and its cookie is removed.
    let d = app.login("Edge").await;
    let r = app.send("POST", "/logout-everywhere", Some(&a), "x").await;
    assert_eq!(r.body, "2");
    assert_eq!(app.status(&a).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.status(&d).await, StatusCode::UNAUTHORIZED);

    let kinds: Vec<_> = app.events().iter().map(|e| e.kind.clone()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == EventKind::Created).count(),
        4,
        "{kinds:?}"
    );
    let revoked = EventKind::Destroyed {
        reason: EndReason::Revoked,
    };
    assert_eq!(
        kinds.iter().filter(|k| **k == revoked).count(),
        3,
        "{kinds:?}"
    );
    let logout = EventKind::Destroyed {
        reason: EndReason::Logout,
    };
    assert_eq!(
        kinds.iter().filter(|k| **k == logout).count(),
        1,
        "{kinds:?}"
    );
    assert!(app
        .events()
        .iter()
        .all(|e| e.principal.as_deref() == Some("7")));
}

#[tokio::test]
async fn the_session_limit_refuses_or_evicts_the_oldest() {
    let refuse = app(Some(SessionLimit {
        max: 2,
        policy: LimitPolicy::Refuse,
    }));
    let a = refuse.login("one").await;
    refuse.login("two").await;
    let third = refuse.send("POST", "/login", None, "three").await;
    assert_eq!(third.status, StatusCode::CONFLICT, "{}", third.body);
    assert!(third.body.contains("at most 2"), "{}", third.body);
    assert!(third.cookie.is_none(), "a refused login issued a session");
    // A logout frees a slot.
    refuse.send("POST", "/logout", Some(&a), "one").await;
    refuse.login("three").await;

    let evict = app(Some(SessionLimit {
        max: 2,
        policy: LimitPolicy::EvictOldest,
    }));
    let first = evict.login("one").await;
    let second = evict.login("two").await;
    let third = evict.login("three").await;
    assert_eq!(evict.status(&first).await, StatusCode::UNAUTHORIZED);
    assert_eq!(evict.status(&second).await, StatusCode::OK);
    assert_eq!(evict.status(&third).await, StatusCode::OK);
    assert!(evict.events().iter().any(|e| e.kind
        == EventKind::Destroyed {
            reason: EndReason::Evicted
        }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_racing_for_the_last_slot_let_exactly_one_in() {
    let app = Arc::new(app(Some(SessionLimit {
        max: 1,
        policy: LimitPolicy::Refuse,
    })));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            app.send("POST", "/login", None, &format!("device {i}"))
                .await
                .status
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::CONFLICT => {}
            other => panic!("{other}"),
        }
    }
    assert_eq!(ok, 1);
}

#[tokio::test]
async fn expired_sessions_are_reported_by_the_reaper() {
    let app = app(None);
    let a = app.login("one").await;
    let b = app.login("two").await;
    // Keep one alive past the other's expiry by using it.
    let t0 = app.clock.load(std::sync::atomic::Ordering::SeqCst);
    app.clock
        .store(t0 + 50_000, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(app.status(&b).await, StatusCode::OK);
    let principals = app.layer.principals().unwrap();
    let later = Timestamp(t0 + 61_000);
    assert_eq!(principals.reap(later).await.unwrap(), 1);
    assert_eq!(principals.reap(later).await.unwrap(), 0, "reported twice");
    let expired: Vec<_> = app
        .events()
        .into_iter()
        .filter(|e| e.kind == EventKind::Expired)
        .collect();
    assert_eq!(expired.len(), 1);
    app.clock
        .store(later.0, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(app.status(&a).await, StatusCode::UNAUTHORIZED);
    let listed = app.list(&b).await;
    assert_eq!(listed.len(), 1);
    // An operator lists and ends a user's sessions without their cookie.
    assert_eq!(principals.list("7", later).await.unwrap().len(), 1);
    assert_eq!(principals.end_all("7", later).await.unwrap(), 1);
    assert_eq!(app.status(&b).await, StatusCode::UNAUTHORIZED);
}

/// The index is a record in the store with a computable ID; a client that
/// sends that ID as its cookie must not read, change or delete it.
#[tokio::test]
async fn a_cookie_can_never_address_the_index() {
    let store = Arc::new(MemoryStore::new());
    let app = app_with(SessionLayer::from_arc(store.clone()), None);
    let a = app.login("one").await;
    let index = tether::SessionId::derived("principal", "\u{0}7");
    assert!(store
        .load(&index, tether::Load::at(Timestamp::now()))
        .await
        .unwrap()
        .is_some());
    let r = app
        .send("POST", "/logout", Some(&index.to_string()), "attacker")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        app.status(&index.to_string()).await,
        StatusCode::UNAUTHORIZED
    );
    assert!(store
        .load(&index, tether::Load::at(Timestamp::now()))
        .await
        .unwrap()
        .is_some());
    assert_eq!(app.list(&a).await.len(), 1);
}

#[tokio::test]
async fn tokens_with_a_revocation_store_are_listed_and_ended() {
    let keys = tether_jwt::generate_hs256_key_file("k");
    let codec = tether_jwt::JwtCodec::from_toml(&keys)
        .unwrap()
        .with_subject_attribute("loginMember");
    let revocation =
        tether_jwt::Revocation::new(Arc::new(MemoryStore::new()), Duration::from_secs(3600));
    let layer = SessionLayer::jwt(JwtSessions::new(codec).with_revocation(revocation));
    let app = app_with(
        layer,
        Some(SessionLimit {
            max: 2,
            policy: LimitPolicy::EvictOldest,
        }),
    );
    let a = app.login("one").await;
    let b = app.login("two").await;
    assert_eq!(app.list(&a).await.len(), 2);
    let c = app.login("three").await;
    assert_eq!(app.status(&a).await, StatusCode::UNAUTHORIZED, "evicted");
    assert_eq!(app.list(&b).await.len(), 2);
    let r = app.send("POST", "/logout-others", Some(&b), "x").await;
    assert_eq!(r.body, "1");
    assert_eq!(app.status(&c).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.status(&b).await, StatusCode::OK);
    app.send("POST", "/logout-everywhere", Some(&b), "x").await;
    assert_eq!(app.status(&b).await, StatusCode::UNAUTHORIZED);
    // Without a revocation store there is nowhere to list tokens.
    let bare = app_with(
        SessionLayer::jwt(JwtSessions::new(
            tether_jwt::JwtCodec::from_toml(&keys)
                .unwrap()
                .with_subject_attribute("loginMember"),
        )),
        None,
    );
    let t = bare.login("one").await;
    let r = bare.send("GET", "/sessions", Some(&t), "x").await;
    assert_eq!(r.status, StatusCode::NOT_IMPLEMENTED, "{}", r.body);
}
