//! The session layer's behaviour, driven through an axum router in process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use http_body_util::BodyExt;
use tether::{
    MemoryStore, Session, SessionConfig, SessionError, SessionLayer, SessionStore, Timestamp,
};
use tether_core::testing::FailingStore;
use tether_core::{Load, SessionId};
use tower::ServiceExt;

type Store = FailingStore<Arc<MemoryStore>>;

struct App {
    router: Router,
    store: Store,
    clock: Arc<AtomicU64>,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    /// The session ID handed out by this reply's `Set-Cookie`, if any.
    fn issued(&self) -> Option<SessionId> {
        self.set_cookies().iter().find_map(|c| {
            let value = c.strip_prefix("SESSION=")?.split(';').next()?;
            SessionId::parse(value).ok()
        })
    }
}

async fn login(session: Session, body: String) -> Result<String, SessionError> {
    session.cycle_id().await?;
    let member: u64 = body.trim().parse().unwrap_or(7);
    session.insert("loginMember", member).await?;
    Ok(format!("member {member}"))
}

async fn mypage(session: Session) -> Result<(StatusCode, String), SessionError> {
    Ok(match session.get::<u64>("loginMember").await? {
        Some(m) => (StatusCode::OK, format!("member {m}")),
        None => (StatusCode::UNAUTHORIZED, "not logged in".into()),
    })
}

/// Swallows store errors, as a careless handler would.
async fn careless(session: Session) -> (StatusCode, &'static str) {
    match session.get::<u64>("loginMember").await.ok().flatten() {
        Some(_) => (StatusCode::OK, "in"),
        None => (StatusCode::UNAUTHORIZED, "not logged in"),
    }
}

async fn set(session: Session, body: String) -> Result<&'static str, SessionError> {
    let (k, v) = body.split_once('=').unwrap();
    session.insert(k, v).await?;
    Ok("ok")
}

async fn cart(session: Session, item: String) -> Result<String, SessionError> {
    let n = session
        .modify("cart", |c: &mut Option<Vec<String>>| {
            let c = c.get_or_insert_with(Vec::new);
            if !item.is_empty() {
                c.push(item.clone());
            }
            c.len()
        })
        .await?;
    Ok(n.to_string())
}

async fn short(session: Session) -> Result<&'static str, SessionError> {
    session.cycle_id().await?;
    session.insert("loginMember", 7u64).await?;
    session.set_idle_timeout(Duration::from_secs(300));
    Ok("ok")
}

async fn logout(session: Session) -> Result<&'static str, SessionError> {
    session.destroy().await?;
    Ok("bye")
}

async fn boom(session: Session) -> StatusCode {
    session.insert("poison", true).await.unwrap();
    StatusCode::INTERNAL_SERVER_ERROR
}

async fn logout_then_boom(session: Session) -> StatusCode {
    session.destroy().await.unwrap();
    StatusCode::BAD_GATEWAY
}

fn app_with(config: SessionConfig) -> App {
    let clock = Arc::new(AtomicU64::new(Timestamp::now().0));
    let c = clock.clone();
    let store = FailingStore::new(Arc::new(MemoryStore::new().with_max_size(1024)));
    let config = config.with_clock(move || Timestamp(c.load(Ordering::SeqCst)));
    let router = Router::new()
        .route("/login", post(login))
        .route("/mypage", get(mypage))
        .route("/careless", get(careless))
        .route("/set", post(set))
        .route("/cart", post(cart))
        .route("/logout", post(logout))
        .route("/short", post(short))
        .route("/boom", post(boom))
        .route("/logout-boom", post(logout_then_boom))
        .route("/plain", get(|| async { "no session here" }))
        .layer(SessionLayer::new(store.clone()).with_config(config));
    App {
        router,
        store,
        clock,
    }
}

fn app() -> App {
    app_with(SessionConfig::default())
}

impl App {
    async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: &str,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let res = self
            .router
            .clone()
            .oneshot(req.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body: String::from_utf8(bytes.to_vec()).unwrap(),
        }
    }

    async fn with_cookie(&self, method: &str, path: &str, id: SessionId, body: &str) -> Reply {
        self.send(method, path, &[("cookie", format!("SESSION={id}"))], body)
            .await
    }

    async fn login(&self) -> SessionId {
        let r = self.send("POST", "/login", &[], "7").await;
        assert_eq!(r.status, StatusCode::OK);
        r.issued().expect("login issues a session cookie")
    }

    fn advance(&self, d: Duration) {
        self.clock.fetch_add(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// The stored record of session `id` at the app's current time.
    async fn stored(&self, id: &SessionId) -> Option<tether::Record> {
        self.store
            .inner()
            .load(id, Load::at(self.now()))
            .await
            .unwrap()
    }

    fn now(&self) -> Timestamp {
        Timestamp(self.clock.load(Ordering::SeqCst))
    }
}

#[tokio::test]
async fn login_issues_a_cookie_with_safe_defaults() {
    let app = app();
    let r = app.send("POST", "/login", &[], "7").await;
    assert_eq!(r.status, StatusCode::OK);
    let cookies = r.set_cookies();
    assert_eq!(cookies.len(), 1);
    let id = r.issued().unwrap();
    assert_eq!(
        cookies[0],
        format!("SESSION={id}; Path=/; Secure; HttpOnly; SameSite=Lax")
    );
    assert_eq!(r.headers[header::CACHE_CONTROL], "private");
    let page = app.with_cookie("GET", "/mypage", id, "").await;
    assert_eq!(
        (page.status, page.body.as_str()),
        (StatusCode::OK, "member 7")
    );
    assert!(page.set_cookies().is_empty(), "a read sends no cookie");
}

#[tokio::test]
async fn a_handler_that_never_touches_the_session_costs_no_store_io() {
    let app = app();
    let id = app.login().await;
    let before = app.store.calls();
    let r = app.with_cookie("GET", "/plain", id, "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(app.store.calls(), before);
}

#[tokio::test]
async fn a_read_costs_one_store_operation_and_writes_nothing() {
    let app = app();
    let id = app.login().await;
    let version = app.stored(&id).await.unwrap().version;
    let before = app.store.calls();
    app.with_cookie("GET", "/mypage", id, "").await;
    assert_eq!(app.store.calls(), before + 1);
    let after = app.stored(&id).await.unwrap();
    assert_eq!(after.version, version);
}

#[tokio::test]
async fn a_write_without_a_read_costs_one_store_operation() {
    let app = app();
    let id = app.login().await;
    let before = app.store.calls();
    let r = app.with_cookie("POST", "/set", id, "theme=dark").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(app.store.calls(), before + 1);
    let rec = app.stored(&id).await.unwrap();
    assert_eq!(rec.attributes["theme"].get(), "\"dark\"");
    assert_eq!(rec.attributes["loginMember"].get(), "7");
}

#[tokio::test]
async fn modify_without_a_change_writes_nothing() {
    let app = app();
    let id = app.login().await;
    app.with_cookie("POST", "/cart", id, "book").await;
    let v1 = app.stored(&id).await.unwrap().version;
    let r = app.with_cookie("POST", "/cart", id, "").await;
    assert_eq!(r.body, "1");
    let v2 = app.stored(&id).await.unwrap().version;
    assert_eq!(v1, v2);
}

#[tokio::test]
async fn malformed_cookies_are_no_session_and_never_reach_the_store() {
    let app = app();
    let good = SessionId::random().to_string();
    let cases = [
        good[..21].to_string(),
        format!("{good}AAAA"),
        "%00%ff".to_string(),
        "not base64!!!!!!!!!!!!".to_string(),
        "A".repeat(5000),
        format!("{}=", &good[..20]),
    ];
    for bad in cases {
        let before = app.store.calls();
        let r = app
            .send(
                "GET",
                "/mypage",
                &[("cookie", format!("SESSION={bad}"))],
                "",
            )
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{bad}");
        assert_eq!(app.store.calls(), before, "{bad} reached the store");
        assert!(r.set_cookies().is_empty());
    }
}

#[tokio::test]
async fn an_unknown_id_is_no_session_and_is_never_adopted() {
    let app = app();
    let forged = SessionId::random();
    let r = app.with_cookie("GET", "/mypage", forged, "").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // A blind write with an unknown ID saves nothing and says so; no cookie
    // changes (it could overwrite one a concurrent login just issued).
    let r = app.with_cookie("POST", "/set", forged, "k=v").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(r.set_cookies().is_empty());
    assert!(app.stored(&forged).await.is_none());
}

/// Regression (found in review): a write racing a login's rotation used to
/// create a fresh session whose cookie could replace the rotated one.
#[tokio::test]
async fn a_write_racing_a_rotation_does_not_replace_the_new_cookie() {
    let app = app();
    let old = app.login().await;
    // A second login rotates the ID…
    let new = app
        .with_cookie("POST", "/login", old, "7")
        .await
        .issued()
        .unwrap();
    // …while a request sent earlier with the old ID writes blindly.
    let late = app.with_cookie("POST", "/set", old, "cart=book").await;
    assert_eq!(late.status, StatusCode::CONFLICT);
    assert!(
        late.set_cookies().is_empty(),
        "the late write issued a cookie"
    );
    assert_eq!(
        app.with_cookie("GET", "/mypage", new, "").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn login_rotates_the_id_and_the_pre_login_id_is_dead() {
    let app = app();
    // An attacker plants a session (fixation): it has a cart, no login.
    let planted = app
        .send("POST", "/cart", &[], "book")
        .await
        .issued()
        .unwrap();
    let r = app.with_cookie("POST", "/login", planted, "7").await;
    let fresh = r.issued().expect("login issues a new ID");
    assert_ne!(fresh, planted);
    let old = app.with_cookie("GET", "/mypage", planted, "").await;
    assert_eq!(
        old.status,
        StatusCode::UNAUTHORIZED,
        "pre-login ID still works"
    );
    let new = app.with_cookie("GET", "/mypage", fresh, "").await;
    assert_eq!(new.status, StatusCode::OK);
    // The cart survived the rotation.
    assert_eq!(app.with_cookie("POST", "/cart", fresh, "").await.body, "1");
}

#[tokio::test]
async fn logout_deletes_and_sends_a_matching_removal_cookie() {
    let app = app_with(
        SessionConfig::default()
            .with_path("/app")
            .with_domain("example.test")
            .with_same_site(tether::SameSite::Strict),
    );
    let id = app.login().await;
    let r = app.with_cookie("POST", "/logout", id, "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.set_cookies(),
        vec!["SESSION=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Path=/app; Domain=example.test; Secure; HttpOnly; SameSite=Strict".to_string()]
    );
    assert!(app.stored(&id).await.is_none());
    assert_eq!(
        app.with_cookie("GET", "/mypage", id, "").await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn an_unreachable_store_is_503_not_a_logout() {
    let app = app();
    let id = app.login().await;
    app.store.set_down(true);
    for path in ["/mypage", "/careless"] {
        let r = app.with_cookie("GET", path, id, "").await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert!(r.body.contains("session store unavailable"), "{}", r.body);
        assert_eq!(r.headers[header::RETRY_AFTER], "1");
        assert!(
            r.set_cookies().is_empty(),
            "no cookie may change during an outage"
        );
    }
    // A write during the outage fails visibly too.
    let r = app.with_cookie("POST", "/set", id, "k=v").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let r = app.send("POST", "/login", &[], "7").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.set_cookies().is_empty());
    // Back up: the same session works again.
    app.store.set_down(false);
    assert_eq!(
        app.with_cookie("GET", "/mypage", id, "").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_5xx_response_saves_nothing() {
    let app = app();
    let id = app.login().await;
    let r = app.with_cookie("POST", "/boom", id, "").await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    let rec = app.stored(&id).await.unwrap();
    assert!(!rec.attributes.contains_key("poison"));
    let r = app.with_cookie("POST", "/logout-boom", id, "").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(r.set_cookies().is_empty());
    assert_eq!(
        app.with_cookie("GET", "/mypage", id, "").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn an_oversized_value_is_413_and_the_stored_session_is_intact() {
    let app = app();
    let id = app.login().await;
    let before = app.stored(&id).await.unwrap();
    // One value over the limit: refused at insert.
    let r = app
        .with_cookie("POST", "/set", id, &format!("blob={}", "x".repeat(2000)))
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.body);
    // Two blind writes each under the limit but together over it: refused at save.
    app.with_cookie("POST", "/set", id, &format!("a={}", "x".repeat(600)))
        .await;
    let mid = app.stored(&id).await.unwrap();
    let r = app
        .with_cookie("POST", "/set", id, &format!("b={}", "y".repeat(600)))
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.body);
    assert!(r.body.contains("exceeds the limit"), "{}", r.body);
    let after = app.stored(&id).await.unwrap();
    assert_eq!(after, mid);
    assert_eq!(
        after.attributes["loginMember"].get(),
        before.attributes["loginMember"].get()
    );
}

#[tokio::test]
async fn concurrent_requests_changing_different_attributes_both_survive() {
    let app = Arc::new(app());
    let id = app.login().await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            app.with_cookie("POST", "/set", id, &format!("k{i}=v{i}"))
                .await
                .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    let rec = app.stored(&id).await.unwrap();
    for i in 0..20 {
        assert_eq!(rec.attributes[&format!("k{i}")].get(), format!("\"v{i}\""));
    }
}

#[tokio::test]
async fn sessions_expire_after_inactivity_and_reads_keep_them_alive() {
    let app = app_with(
        SessionConfig::default()
            .with_idle_timeout(Duration::from_secs(100))
            .with_max_age(Duration::from_secs(100)),
    );
    let id = app.login().await;
    // Under a quarter of the window: no refresh, no cookie.
    app.advance(Duration::from_secs(20));
    let r = app.with_cookie("GET", "/mypage", id, "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.set_cookies().is_empty());
    // Past a quarter: the access is recorded and the Max-Age cookie slides.
    app.advance(Duration::from_secs(10));
    let r = app.with_cookie("GET", "/mypage", id, "").await;
    assert_eq!(r.issued(), Some(id));
    assert!(r.set_cookies()[0].contains("Max-Age=100"));
    // 99 s after that read it is still alive; 100 s after the next, gone.
    app.advance(Duration::from_secs(99));
    assert_eq!(
        app.with_cookie("GET", "/mypage", id, "").await.status,
        StatusCode::OK
    );
    app.advance(Duration::from_secs(100));
    assert_eq!(
        app.with_cookie("GET", "/mypage", id, "").await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn the_header_transport_carries_the_id_for_api_clients() {
    let app = app_with(SessionConfig::default().with_header("X-Auth-Token"));
    let r = app.send("POST", "/login", &[], "9").await;
    let token = r.headers["x-auth-token"].to_str().unwrap().to_string();
    assert_eq!(SessionId::parse(&token).ok(), r.issued());
    let r = app
        .send("GET", "/mypage", &[("x-auth-token", token.clone())], "")
        .await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "member 9"));
    let r = app
        .send("POST", "/logout", &[("x-auth-token", token.clone())], "")
        .await;
    assert_eq!(r.headers["x-auth-token"], "");
    assert!(r.set_cookies().is_empty(), "header clients get no cookies");
    let r = app
        .send("GET", "/mypage", &[("x-auth-token", token)], "")
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn destroy_then_insert_starts_a_new_session() {
    async fn relogin(session: Session) -> Result<&'static str, SessionError> {
        session.destroy().await?;
        session.insert("loginMember", 8u64).await?;
        Ok("ok")
    }
    let store = Arc::new(MemoryStore::new());
    let router = Router::new()
        .route("/relogin", post(relogin))
        .layer(SessionLayer::from_arc(store.clone()));
    let id = SessionId::random();
    let mut old = tether::Record::new(id, Timestamp::now(), tether::Expiry::default());
    old.attributes.insert(
        "loginMember".into(),
        serde_json::value::to_raw_value(&7).unwrap(),
    );
    store.create(&old).await.unwrap();
    let res = router
        .oneshot(
            Request::post("/relogin")
                .header("cookie", format!("SESSION={id}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let cookie = res.headers()[header::SET_COOKIE].to_str().unwrap();
    let new: SessionId = cookie[8..30].parse().unwrap();
    assert_ne!(new, id);
    assert!(store
        .load(&id, Load::at(Timestamp::now()))
        .await
        .unwrap()
        .is_none());
    let rec = store
        .load(&new, Load::at(Timestamp::now()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.attributes["loginMember"].get(), "8");
}

#[tokio::test]
async fn the_extractor_without_the_layer_is_a_clear_500() {
    let router = Router::new().route("/", get(mypage));
    let res = router
        .oneshot(Request::get("/").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("without SessionLayer"));
}

/// Regression: the refresh threshold came from the configured timeout
/// (1800 s × 0.25), so a session given 300 s died while read every minute.
#[tokio::test]
async fn a_shorter_per_session_timeout_is_kept_alive_by_reads() {
    let app = app();
    let id = app.send("POST", "/short", &[], "").await.issued().unwrap();
    for minute in 1..=10 {
        app.advance(Duration::from_secs(60));
        let r = app.with_cookie("GET", "/mypage", id, "").await;
        assert_eq!(r.status, StatusCode::OK, "logged out at minute {minute}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_modifies_of_one_attribute_all_land() {
    let app = Arc::new(app());
    let id = app.login().await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for i in 0..10 {
                let r = app
                    .with_cookie("POST", "/cart", id, &format!("{t}{i}"))
                    .await;
                assert_eq!(r.status, StatusCode::OK, "{}", r.body);
                seen.push(r.body.parse::<usize>().unwrap());
            }
            seen
        }));
    }
    let mut lengths = Vec::new();
    for t in tasks {
        lengths.extend(t.await.unwrap());
    }
    let rec = app.stored(&id).await.unwrap();
    let cart: Vec<String> = serde_json::from_str(rec.attributes["cart"].get()).unwrap();
    assert_eq!(cart.len(), 80, "updates lost: {cart:?}");
    for t in 0..8 {
        for i in 0..10 {
            assert!(cart.contains(&format!("{t}{i}")), "{t}{i} lost");
        }
    }
    // Each answer is the cart as stored by that request: every length once.
    lengths.sort_unstable();
    assert_eq!(lengths, (1..=80).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_modify_costs_one_load_and_one_conditional_write() {
    let app = app();
    let id = app.login().await;
    let before = app.store.calls();
    let r = app.with_cookie("POST", "/cart", id, "book").await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "1"));
    assert_eq!(
        app.store.calls(),
        before + 2,
        "load + conditional apply, nothing at save"
    );
}

/// What another request does to the session meanwhile.
type Meanwhile = Arc<dyn Fn(&MemoryStore, &SessionId) + Send + Sync>;

/// A store that, before each conditional write, lets `meanwhile` change the
/// session as another request would.
#[derive(Clone)]
struct Racing {
    inner: Arc<MemoryStore>,
    meanwhile: Meanwhile,
}

#[async_trait::async_trait]
impl SessionStore for Racing {
    async fn create(&self, r: &tether::Record) -> Result<(), tether::StoreError> {
        self.inner.create(r).await
    }
    async fn load(
        &self,
        id: &SessionId,
        load: Load,
    ) -> Result<Option<tether::Record>, tether::StoreError> {
        self.inner.load(id, load).await
    }
    async fn apply(
        &self,
        id: &SessionId,
        d: &tether::Delta,
        now: Timestamp,
    ) -> Result<Option<u64>, tether::StoreError> {
        if !d.expect.is_empty() {
            (self.meanwhile)(&self.inner, id);
        }
        self.inner.apply(id, d, now).await
    }
    async fn delete(&self, id: &SessionId) -> Result<bool, tether::StoreError> {
        self.inner.delete(id).await
    }
    async fn rotate(
        &self,
        old: &SessionId,
        new: &SessionId,
        d: &tether::Delta,
        now: Timestamp,
    ) -> Result<Option<u64>, tether::StoreError> {
        self.inner.rotate(old, new, d, now).await
    }
}

fn racing_app(meanwhile: impl Fn(&MemoryStore, &SessionId) + Send + Sync + 'static) -> Router {
    let store = Racing {
        inner: Arc::new(MemoryStore::new()),
        meanwhile: Arc::new(meanwhile),
    };
    Router::new()
        .route("/login", post(login))
        .route("/cart", post(cart))
        .layer(SessionLayer::new(store))
}

async fn call(router: &Router, path: &str, cookie: Option<SessionId>, body: &str) -> Reply {
    let mut req = Request::builder().method("POST").uri(path);
    if let Some(id) = cookie {
        req = req.header("cookie", format!("SESSION={id}"));
    }
    let res = router
        .clone()
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let (status, headers) = (res.status(), res.headers().clone());
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8(bytes.to_vec()).unwrap(),
    }
}

/// Another request appends before every one of this request's writes: the
/// attribute never holds still, so after 16 tries the answer is 409, and
/// nothing of this request is saved.
#[tokio::test]
async fn endless_contention_is_409_and_saves_nothing() {
    let router = racing_app(|store, id| {
        let now = Timestamp::now();
        let mut rec = futures_now(store.load(id, Load::at(now))).unwrap().unwrap();
        let mut cart: Vec<String> = rec
            .attributes
            .get("cart")
            .map(|v| serde_json::from_str(v.get()).unwrap())
            .unwrap_or_default();
        cart.push("other".into());
        let mut d = tether::Delta::default();
        d.set("cart", serde_json::value::to_raw_value(&cart).unwrap());
        futures_now(store.apply(id, &d, now)).unwrap().unwrap();
        rec.version += 1;
    });
    let login = call(&router, "/login", None, "7").await;
    let id = login.issued().unwrap();
    let r = call(&router, "/cart", Some(id), "mine").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(r.body.contains("changed concurrently"), "{}", r.body);
}

/// The session is logged out elsewhere between this request's read and its
/// write: 409, and no new session is made for it.
#[tokio::test]
async fn a_session_ended_during_modify_is_409_and_not_recreated() {
    let router = racing_app(|store, id| {
        futures_now(store.delete(id)).unwrap();
    });
    let login = call(&router, "/login", None, "7").await;
    let id = login.issued().unwrap();
    let r = call(&router, "/cart", Some(id), "mine").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(
        r.issued().is_none(),
        "a new session was issued: {:?}",
        r.set_cookies()
    );
}

/// MemoryStore's futures complete at once: run one from a sync hook.
fn futures_now<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let waker = std::task::Waker::noop();
    match f.as_mut().poll(&mut std::task::Context::from_waker(waker)) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("MemoryStore never waits"),
    }
}
