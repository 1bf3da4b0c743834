//! `tether node`: the reference app server, built with the library exactly as
//! a user would build theirs.
//!
//! | route | does |
//! |---|---|
//! | `GET /login` | an HTML login form |
//! | `POST /login` | JSON `{"member":7}` or form `member=7`: rotates the ID, stores `loginMember` |
//! | `GET /mypage` | read-only: the logged-in member, or 401 |
//! | `POST /cart` | JSON `{"item":"book"}` or form `item=book`: appends to the `cart` list |
//! | `POST /logout` | destroys the session |
//! | `GET /health` | 200 when ready, 503 when not (starting or shutting down) |
//! | `GET /stats` | sessions and bytes held by this node's store, requests served |
//!
//! Every response carries `X-Tether-Node: <id>` so a person or a test can see
//! which server answered. With `Accept: text/html` the pages are HTML.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tether::{MemoryStore, Session, SessionConfig, SessionError, SessionLayer};

/// Where a node keeps sessions, from `--store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// This process's memory (the `local` strategy).
    Memory,
    /// Redis: `redis://`, `rediss://`, `redis+sentinel://` or `redis+cluster://`.
    Redis(String),
    /// No server state: signed tokens (`--jwt-key-file`).
    Jwt,
    /// Replicated among the nodes (`--cluster-listen`, `--peer`, …).
    Cluster,
}

impl std::str::FromStr for StoreSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "memory" => Ok(Self::Memory),
            "jwt" => Ok(Self::Jwt),
            "cluster" => Ok(Self::Cluster),
            url if url.starts_with("redis") => {
                // Check the URL now so a typo fails at startup.
                tether_redis::RedisStore::open(url).map_err(|e| e.to_string())?;
                Ok(Self::Redis(url.to_string()))
            }
            other => Err(format!(
                "unknown store {other:?}: use memory, redis://HOST:PORT, \
                 redis+sentinel://HOST:PORT[,…]/MASTER, redis+cluster://HOST:PORT[,…] \
                 cluster or jwt"
            )),
        }
    }
}

/// Settings of one node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The node's name, shown in every response.
    pub id: String,
    /// The session store.
    pub store: StoreSpec,
    /// Whether the session cookie carries `Secure`.
    pub cookie_secure: bool,
    /// Inactivity timeout of sessions.
    pub idle_timeout: Duration,
    /// The largest session accepted, in bytes.
    pub max_session_bytes: usize,
    /// Redis only: `WAIT` for this many replicas (and this long) after every
    /// write; a write not replicated in time is answered 503.
    pub redis_wait: Option<(u32, Duration)>,
    /// Redis only: keep up to this many recently used sessions in the node,
    /// kept coherent by Redis (client-side caching); `None`: off.
    pub redis_near_cache: Option<usize>,
    /// JWT only: the key file shared by the nodes.
    pub jwt_key_file: Option<std::path::PathBuf>,
    /// JWT only: where revocations are kept (`memory` or a Redis URL); none
    /// means tokens stay valid until they expire.
    pub jwt_revocation: Option<StoreSpec>,
    /// Cluster only: this node's replication settings.
    pub cluster: Option<tether_cluster::ClusterConfig>,
    /// At most this many sessions per user (`--max-sessions-per-user`).
    pub max_sessions: Option<tether::SessionLimit>,
    /// Enables the operator endpoints (`/admin/sessions…`) for requests
    /// bearing this token.
    pub admin_token: Option<String>,
}

impl NodeConfig {
    /// A node named `id` with a memory store and library defaults.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            store: StoreSpec::Memory,
            cookie_secure: true,
            idle_timeout: Duration::from_secs(1800),
            max_session_bytes: tether_core::DEFAULT_MAX_SIZE,
            redis_wait: None,
            redis_near_cache: None,
            jwt_key_file: None,
            jwt_revocation: None,
            cluster: None,
            max_sessions: None,
            admin_token: None,
        }
    }
}

/// A node's shared state.
#[derive(Clone)]
pub struct Node {
    id: Arc<str>,
    /// `id` as the `x-tether-node` header every answer carries (made once).
    id_header: Option<HeaderValue>,
    ready: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    /// When the last request arrived, in ms since `started`.
    last_request: Arc<AtomicU64>,
    started: std::time::Instant,
    memory: Option<Arc<MemoryStore>>,
    redis: Option<Arc<tether_redis::RedisStore>>,
    cluster: Option<Arc<tether_cluster::ClusterStore>>,
    /// Where sessions live, for the pages.
    store_kind: &'static str,
    /// Every user's sessions (none for tokens without a revocation store).
    principals: Option<tether::Principals>,
    /// Session events seen, by kind (`/metrics`).
    events: Arc<EventCounts>,
    admin_token: Option<Arc<str>>,
}

/// Session lifecycle events this node saw.
#[derive(Default)]
struct EventCounts {
    created: AtomicU64,
    rotated: AtomicU64,
    logout: AtomicU64,
    revoked: AtomicU64,
    evicted: AtomicU64,
    expired: AtomicU64,
}

impl EventCounts {
    fn record(&self, e: &tether::SessionEvent) {
        use tether::{EndReason, EventKind};
        let counter = match &e.kind {
            EventKind::Created => &self.created,
            EventKind::Rotated { .. } => &self.rotated,
            EventKind::Destroyed {
                reason: EndReason::Logout,
            } => &self.logout,
            EventKind::Destroyed {
                reason: EndReason::Revoked,
            } => &self.revoked,
            EventKind::Destroyed {
                reason: EndReason::Evicted,
            } => &self.evicted,
            EventKind::Expired => &self.expired,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        // The audit log: one line per event, the session named by its
        // reference (never its ID).
        tracing::info!(target: "tether::audit", event = %serde_json::to_string(e).unwrap_or_default());
    }
}

impl Node {
    /// Marks the node ready (`/health` 200) or not (503).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}

/// Why a node could not be built.
pub type AppError = Box<dyn std::error::Error + Send + Sync>;

/// A server-side store, and the same store as a `MemoryStore` or a
/// `RedisStore` when it is one (their statistics are served on `/stats` and
/// `/metrics`).
type ServerStore = (
    Arc<dyn tether::SessionStore>,
    Option<Arc<MemoryStore>>,
    Option<Arc<tether_redis::RedisStore>>,
);

/// How often the node looks for sessions that expired (to report them).
const REAP_EVERY: Duration = Duration::from_secs(5);

/// The near cache's memory bound (attribute bytes), beside its entry count.
const NEAR_CACHE_BYTES: usize = 256 << 20;

fn server_store(spec: &StoreSpec, config: &NodeConfig) -> Result<ServerStore, AppError> {
    Ok(match spec {
        StoreSpec::Memory => {
            let store = Arc::new(MemoryStore::new().with_max_size(config.max_session_bytes));
            (store.clone(), Some(store), None)
        }
        StoreSpec::Redis(url) => {
            let mut store =
                tether_redis::RedisStore::open(url)?.with_max_size(config.max_session_bytes);
            if let Some((replicas, timeout)) = config.redis_wait {
                store = store.with_wait(replicas, timeout);
            }
            if let Some(entries) = config.redis_near_cache {
                store = store.with_near_cache(entries, NEAR_CACHE_BYTES);
            }
            let store = Arc::new(store);
            (store.clone(), None, Some(store))
        }
        StoreSpec::Jwt | StoreSpec::Cluster => {
            return Err("jwt and cluster are not usable as a revocation store".into())
        }
    })
}

/// Builds the node's router and its state handle.
///
/// # Errors
/// If the store cannot be set up (a Redis URL the driver rejects, a
/// missing or invalid JWT key file).
pub async fn app(config: &NodeConfig) -> Result<(Router, Node), AppError> {
    let events = Arc::new(EventCounts::default());
    let listener = events.clone();
    let mut sessions = SessionConfig::default()
        .with_secure(config.cookie_secure)
        .with_idle_timeout(config.idle_timeout)
        .with_header("X-Auth-Token")
        .with_principal_attribute("loginMember")
        .with_node_name(config.id.clone())
        .with_listener(move |e| listener.record(&e));
    if let Some(limit) = config.max_sessions {
        sessions = sessions.with_session_limit(limit);
    }
    let mut jwks = None;
    let mut cluster = None;
    let mut redis = None;
    let (layer, memory) = match &config.store {
        StoreSpec::Cluster => {
            let mut settings = config
                .cluster
                .clone()
                .ok_or("--store cluster needs --cluster-listen")?;
            settings.max_size = config.max_session_bytes;
            let store = Arc::new(tether_cluster::ClusterStore::start(settings).await?);
            cluster = Some(store.clone());
            (SessionLayer::from_arc(store), None)
        }
        StoreSpec::Jwt => {
            let path = config
                .jwt_key_file
                .as_ref()
                .ok_or("--store jwt needs --jwt-key-file")?;
            let codec =
                tether_jwt::JwtCodec::from_key_file(path)?.with_subject_attribute("loginMember");
            jwks = Some(codec.jwks().clone());
            let mut jwt = tether::JwtSessions::new(codec);
            if let Some(spec) = &config.jwt_revocation {
                let (store, _, _) = server_store(spec, config)?;
                let lifetime = sessions.expiry().absolute.unwrap_or(config.idle_timeout);
                jwt = jwt.with_revocation(tether_jwt::Revocation::new(store, lifetime));
            }
            (SessionLayer::jwt(jwt), None)
        }
        spec => {
            let (store, memory, r) = server_store(spec, config)?;
            redis = r;
            (SessionLayer::from_arc(store), memory)
        }
    };
    let layer = layer.with_config(sessions);
    let principals = layer.principals();
    // Every node reaps: a lease keeps two from reporting one expiry.
    let _reaper = layer.spawn_reaper(REAP_EVERY);
    let node = Node {
        id: config.id.as_str().into(),
        id_header: HeaderValue::from_str(&config.id).ok(),
        ready: Arc::new(AtomicBool::new(true)),
        requests: Arc::new(AtomicU64::new(0)),
        last_request: Arc::new(AtomicU64::new(0)),
        started: std::time::Instant::now(),
        memory,
        redis,
        cluster,
        store_kind: match &config.store {
            StoreSpec::Redis(_) => "in Redis, shared by every node",
            StoreSpec::Jwt => "in your browser's signed token: no server holds it",
            _ => "on this node",
        },
        principals,
        events,
        admin_token: config.admin_token.as_deref().map(Arc::from),
    };
    let mut router = Router::new()
        .route("/", get(mypage))
        .route("/login", get(login_page).post(login))
        .route("/mypage", get(mypage))
        .route("/cart", post(cart))
        .route("/logout", post(logout))
        .route("/logout-everywhere", post(logout_everywhere))
        .route("/sessions", get(user_sessions))
        .route("/sessions/{reference}/revoke", post(revoke_session))
        .layer(layer)
        // Operators act on any user's sessions, by token, without a session.
        .route("/admin/principals/{principal}/sessions", get(admin_list))
        .route("/admin/principals/{principal}/revoke", post(admin_revoke))
        // Health and stats sit outside the session layer: probes carry no session.
        .route("/health", get(health))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(node.clone(), tag))
        .with_state(node.clone());
    if let Some(jwks) = jwks {
        // Verifiers that must not be able to sign fetch the public keys here.
        router = router.route(
            "/.well-known/jwks.json",
            get(move || async move { Json(jwks) }),
        );
    }
    Ok((router, node))
}

/// Serves the node on `listen` until `shutdown` resolves, then drains.
///
/// Prints `tether node ID listening on http://ADDR` on stdout once bound
/// (the test kit and the demo read it; port 0 picks a free port).
///
/// # Errors
/// If binding or serving fails.
pub async fn serve(
    config: NodeConfig,
    listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (router, node) = app(&config).await.map_err(std::io::Error::other)?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let store = match &config.store {
        StoreSpec::Memory => "memory".to_string(),
        StoreSpec::Redis(url) => redact(url),
        StoreSpec::Jwt => "jwt".to_string(),
        StoreSpec::Cluster => "cluster".to_string(),
    };
    tracing::info!(node = %config.id, %addr, %store, "node started");
    println!("tether node {} listening on http://{addr}", config.id);
    if let Some(cluster) = &node.cluster {
        println!(
            "tether node {} replication listening on tcp://{}",
            config.id,
            cluster.addr()
        );
    }
    let draining = node.clone();
    let leave_timeout = config
        .cluster
        .as_ref()
        .map_or(Duration::ZERO, |c| c.leave_timeout);
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown.await;
            // Tell the balancer to stop sending new work while in-flight requests finish.
            draining.set_ready(false);
            if let Some(cluster) = &draining.cluster {
                // Hand every session to the nodes that hold it next, while
                // still serving (requests are forwarded to their owners), so
                // no session is ever down to fewer copies during a deploy.
                let started = std::time::Instant::now();
                tracing::info!("leaving the cluster: handing sessions off");
                if cluster.leave(leave_timeout).await {
                    tracing::info!(ms = started.elapsed().as_millis() as u64, "sessions handed off");
                } else {
                    tracing::warn!(
                        timeout_s = leave_timeout.as_secs(),
                        "sessions not all handed off in time; exiting anyway (their other copies remain)"
                    );
                }
            }
            // A balancer stops sending once its health checks see the 503;
            // closing kept-alive connections before that races requests it
            // is sending on them (a POST cannot be retried). Wait for a quiet
            // moment, bounded.
            let quiet = Duration::from_millis(300);
            let give_up = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let last = Duration::from_millis(draining.last_request.load(Ordering::Relaxed));
                let idle = draining.started.elapsed().saturating_sub(last);
                if idle >= quiet || std::time::Instant::now() >= give_up {
                    break;
                }
                tokio::time::sleep(quiet - idle).await;
            }
            tracing::info!("shutting down: draining in-flight requests");
        })
        .await?;
    tracing::info!(node = %config.id, "node stopped");
    Ok(())
}

/// A store URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

async fn tag(State(node): State<Node>, req: Request, next: Next) -> Response {
    node.requests.fetch_add(1, Ordering::Relaxed);
    // Probes and scrapes do not count as traffic to drain.
    if !matches!(req.uri().path(), "/health" | "/stats" | "/metrics") {
        node.last_request
            .store(node.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    let mut res = next.run(req).await;
    if let Some(v) = &node.id_header {
        res.headers_mut().insert("x-tether-node", v.clone());
    }
    res
}

fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"))
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"))
}

/// Parses a JSON or urlencoded form body by its content type; a body that
/// does not parse is a 400 naming the `expected` shape.
fn parse_body<T: serde::de::DeserializeOwned>(
    node: &Node,
    headers: &HeaderMap,
    body: &[u8],
    expected: &str,
) -> Result<T, BadBody> {
    let parsed = if is_form(headers) {
        serde_urlencoded::from_bytes(body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(body).map_err(|e| e.to_string())
    };
    parsed.map_err(|e| BadBody {
        node: node.id.clone(),
        message: format!("expected {expected}: {e}"),
    })
}

/// A request body that did not parse: 400 with the reason.
struct BadBody {
    node: Arc<str>,
    message: String,
}

impl IntoResponse for BadBody {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.message, "node": &*self.node });
        (StatusCode::BAD_REQUEST, Json(body)).into_response()
    }
}

/// The cart as an HTML list; items are user input, so they are escaped.
fn cart_list(cart: &[String]) -> String {
    let items: String = cart
        .iter()
        .map(|i| format!("<li>{}</li>", escape(i)))
        .collect();
    format!("<ul id=\"cart\">{items}</ul>")
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(node: &str, title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title} · node {node}</title>\
         <style>body{{font-family:sans-serif;max-width:36em;margin:2em auto}}\
         .node{{color:#fff;background:#246;padding:.1em .5em;border-radius:.3em}}</style></head>\
         <body><p>served by node <span class=\"node\" id=\"node\">{node}</span></p>\
         <h1>{title}</h1>{body}</body></html>",
        node = escape(node),
    ))
}

const LOGIN_FORM: &str = "<form method=\"post\" action=\"/login\">\
    <label>member <input name=\"member\" type=\"number\" min=\"0\" value=\"7\"></label> \
    <button>log in</button></form>";

async fn login_page(State(node): State<Node>) -> Html<String> {
    page(&node.id, "log in", LOGIN_FORM)
}

#[derive(Deserialize)]
struct Login {
    member: u64,
}

async fn login(
    State(node): State<Node>,
    session: Session,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, SessionError> {
    let login: Login = match parse_body(&node, &headers, &body, "{\"member\": <number>}") {
        Ok(l) => l,
        Err(bad) => return Ok(bad.into_response()),
    };
    session.cycle_id().await?;
    session.insert("loginMember", login.member).await?;
    tracing::debug!(member = login.member, "login");
    if wants_html(&headers) {
        let body = format!(
            "<p>logged in as member <b id=\"member\">{}</b>.</p><p><a href=\"/mypage\">my page</a></p>",
            login.member
        );
        return Ok(page(&node.id, "welcome", &body).into_response());
    }
    Ok(Json(json!({ "member": login.member, "node": &*node.id })).into_response())
}

async fn mypage(
    State(node): State<Node>,
    session: Session,
    headers: HeaderMap,
) -> Result<Response, SessionError> {
    let member = session.get::<u64>("loginMember").await?;
    let html = wants_html(&headers);
    Ok(match member {
        Some(member) if html => {
            let cart: Vec<String> = session.get("cart").await?.unwrap_or_default();
            let id = session.id().await?;
            let lives = match (&node.cluster, id, &node.memory) {
                (Some(c), Some(id), _) => {
                    format!("replicated on {} (owner first)", c.holders(&id).join(", "))
                }
                (None, _, Some(_)) => format!("in the memory of node {} only", node.id),
                _ => node.store_kind.to_string(),
            };
            let body = format!(
                "<p>logged in as member <b id=\"member\">{member}</b></p>\
                 <p>session stored <span id=\"where\">{}</span></p>\
                 <h2>cart</h2>{}\
                 <form method=\"post\" action=\"/cart\"><input name=\"item\" value=\"book\"> <button>add</button></form>\
                 <form method=\"post\" action=\"/logout\"><button>log out</button></form>",
                escape(&lives),
                cart_list(&cart)
            );
            page(&node.id, "my page", &body).into_response()
        }
        Some(member) => Json(json!({ "member": member, "node": &*node.id })).into_response(),
        None => not_logged_in(&node, &headers),
    })
}

#[derive(Deserialize)]
struct Item {
    item: String,
}

async fn cart(
    State(node): State<Node>,
    session: Session,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, SessionError> {
    let item: Item = match parse_body(&node, &headers, &body, "{\"item\": <text>}") {
        Ok(i) => i,
        Err(bad) => return Ok(bad.into_response()),
    };
    let cart = session
        .modify("cart", |cart: &mut Option<Vec<String>>| {
            // Runs again if another request changed the cart meanwhile.
            let cart = cart.get_or_insert_with(Vec::new);
            cart.push(item.item.clone());
            cart.clone()
        })
        .await?;
    if wants_html(&headers) {
        let body = format!("{}<p><a href=\"/mypage\">my page</a></p>", cart_list(&cart));
        return Ok(page(&node.id, "cart", &body).into_response());
    }
    Ok(Json(json!({ "cart": cart, "node": &*node.id })).into_response())
}

async fn logout(
    State(node): State<Node>,
    session: Session,
    headers: HeaderMap,
) -> Result<Response, SessionError> {
    session.destroy().await?;
    if wants_html(&headers) {
        return Ok(page(&node.id, "logged out", LOGIN_FORM).into_response());
    }
    Ok(Json(json!({ "logged_out": true, "node": &*node.id })).into_response())
}

/// Ends every session of the logged-in member, this one included.
async fn logout_everywhere(
    State(node): State<Node>,
    session: Session,
    headers: HeaderMap,
) -> Result<Response, SessionError> {
    let Some(member) = session.get::<u64>("loginMember").await? else {
        return Ok(not_logged_in(&node, &headers));
    };
    let ended = session.end_all_sessions(false).await?;
    if wants_html(&headers) {
        let body = format!("<p>{ended} sessions ended.</p>{LOGIN_FORM}");
        return Ok(page(&node.id, "logged out everywhere", &body).into_response());
    }
    Ok(
        Json(json!({ "logged_out_everywhere": member, "ended": ended, "node": &*node.id }))
            .into_response(),
    )
}

fn not_logged_in(node: &Node, headers: &HeaderMap) -> Response {
    if wants_html(headers) {
        return (
            StatusCode::UNAUTHORIZED,
            page(&node.id, "not logged in", LOGIN_FORM),
        )
            .into_response();
    }
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({ "error": "not logged in", "node": &*node.id })),
    )
        .into_response()
}

/// The logged-in user's sessions: JSON `{"sessions": [...]}`, or a device
/// list with a revoke button per session.
async fn user_sessions(
    State(node): State<Node>,
    session: Session,
    headers: HeaderMap,
) -> Result<Response, SessionError> {
    if session.get::<u64>("loginMember").await?.is_none() {
        return Ok(not_logged_in(&node, &headers));
    }
    let list = session.sessions().await?;
    if !wants_html(&headers) {
        return Ok(Json(json!({ "sessions": list })).into_response());
    }
    let when = |ms: u64| {
        let ago = tether::Timestamp::now().0.saturating_sub(ms) / 1000;
        format!("{ago} s ago")
    };
    let rows: String = list
        .iter()
        .map(|s| {
            format!(
                "<tr><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td><form method=\"post\" action=\"/sessions/{}/revoke\"><button>{}</button></form></td></tr>",
                escape(s.user_agent.as_deref().unwrap_or("unknown device")),
                if s.current { " <b>(this one)</b>" } else { "" },
                escape(s.address.as_deref().unwrap_or("")),
                escape(s.node.as_deref().unwrap_or("")),
                when(s.logged_in),
                s.last_access.map(when).unwrap_or_default(),
                escape(&s.reference),
                if s.current { "log out" } else { "revoke" },
            )
        })
        .collect();
    let body = format!(
        "<table id=\"sessions\"><tr><th>device</th><th>address</th><th>node</th>\
         <th>logged in</th><th>last used</th><th></th></tr>{rows}</table>\
         <form method=\"post\" action=\"/logout-everywhere\"><button>log out everywhere</button></form>"
    );
    Ok(page(&node.id, "your sessions", &body).into_response())
}

/// Ends one of the logged-in user's sessions by its reference.
async fn revoke_session(
    State(node): State<Node>,
    session: Session,
    headers: HeaderMap,
    axum::extract::Path(reference): axum::extract::Path<String>,
) -> Result<Response, SessionError> {
    if session.get::<u64>("loginMember").await?.is_none() {
        return Ok(not_logged_in(&node, &headers));
    }
    let ended = session.end_session(&reference).await?;
    let status = if ended {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    };
    if wants_html(&headers) {
        let body = if ended {
            "<p>ended.</p><p><a href=\"/sessions\">your sessions</a></p>"
        } else {
            "<p>no such session of yours.</p><p><a href=\"/sessions\">your sessions</a></p>"
        };
        return Ok((status, page(&node.id, "sessions", body)).into_response());
    }
    Ok((status, Json(json!({ "ended": ended, "node": &*node.id }))).into_response())
}

/// Checks the operator token (constant time); `Err` is the refusal.
fn admin(node: &Node, headers: &HeaderMap) -> Result<tether::Principals, Box<Response>> {
    let Some(token) = &node.admin_token else {
        return Err(Box::new(
            (
                StatusCode::NOT_FOUND,
                "operator endpoints are off: start the node with --admin-token\n",
            )
                .into_response(),
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !tether_lb::constant_time_eq(given.as_bytes(), token.as_bytes()) {
        return Err(Box::new(
            (StatusCode::UNAUTHORIZED, "operator token required\n").into_response(),
        ));
    }
    node.principals.clone().ok_or_else(|| {
        Box::new(
            (
                StatusCode::NOT_IMPLEMENTED,
                "this strategy keeps no index of users' sessions (tokens need --jwt-revocation)\n",
            )
                .into_response(),
        )
    })
}

/// An operator lists a user's sessions.
async fn admin_list(
    State(node): State<Node>,
    headers: HeaderMap,
    axum::extract::Path(principal): axum::extract::Path<String>,
) -> Response {
    operator(&node, &headers, crate::sessions::Action::List, &principal).await
}

/// An operator ends every session of a user.
async fn admin_revoke(
    State(node): State<Node>,
    headers: HeaderMap,
    axum::extract::Path(principal): axum::extract::Path<String>,
) -> Response {
    operator(&node, &headers, crate::sessions::Action::Revoke, &principal).await
}

async fn operator(
    node: &Node,
    headers: &HeaderMap,
    action: crate::sessions::Action,
    principal: &str,
) -> Response {
    let principals = match admin(node, headers) {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    match crate::sessions::act(&principals, action, principal).await {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => SessionError::Store(e).into_response(),
    }
}

async fn health(State(node): State<Node>) -> Response {
    // A node that joins a cluster takes no traffic until it holds its share.
    let cluster_ready = node.cluster.as_ref().is_none_or(|c| c.is_serving());
    if node.ready.load(Ordering::SeqCst) && cluster_ready {
        Json(json!({ "status": "ready", "node": &*node.id })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "node": &*node.id })),
        )
            .into_response()
    }
}

/// Prometheus text: requests, and for the cluster store its replication.
async fn metrics(State(node): State<Node>) -> Response {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut line = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{node=\"{}\"}} {value}",
            node.id
        );
    };
    line(
        "tether_node_requests_total",
        "counter",
        "Requests served.",
        node.requests.load(Ordering::Relaxed) as f64,
    );
    if let Some(s) = node.redis.as_ref().and_then(|r| r.near_cache_stats()) {
        let n = |v: u64| v as f64;
        let rows: [(&str, &str, &str, f64); 7] = [
            (
                "tether_redis_near_cache_hits_total",
                "counter",
                "Session reads answered by the near cache.",
                n(s.hits),
            ),
            (
                "tether_redis_near_cache_misses_total",
                "counter",
                "Session reads that went to Redis.",
                n(s.misses),
            ),
            (
                "tether_redis_near_cache_invalidations_total",
                "counter",
                "Sessions dropped because Redis said another client changed them.",
                n(s.invalidations),
            ),
            (
                "tether_redis_near_cache_flushes_total",
                "counter",
                "Times the whole cache was dropped (a connection broke or changed).",
                n(s.flushes),
            ),
            (
                "tether_redis_near_cache_evictions_total",
                "counter",
                "Sessions dropped to stay within the bounds.",
                n(s.evictions),
            ),
            (
                "tether_redis_near_cache_entries",
                "gauge",
                "Sessions held.",
                n(s.entries),
            ),
            (
                "tether_redis_near_cache_bytes",
                "gauge",
                "Attribute bytes held.",
                n(s.bytes),
            ),
        ];
        for (name, kind, help, value) in rows {
            line(name, kind, help, value);
        }
    }
    if let Some(c) = &node.cluster {
        let m = c.metrics();
        let status = c.status();
        let (owned, backups, bytes) = c.holdings();
        let n = |v: u64| v as f64;
        let yes = |b: bool| if b { 1.0 } else { 0.0 };
        let rows: [(&str, &str, &str, f64); 21] = [
            ("tether_cluster_writes_total", "counter", "Writes applied by this node as owner.", n(m.writes)),
            ("tether_cluster_replication_messages_total", "counter", "Replication messages sent (owner to holders).", n(m.messages)),
            ("tether_cluster_replication_bytes_total", "counter", "Replication bytes sent (owner to holders).", n(m.bytes)),
            ("tether_cluster_ack_seconds_sum", "counter", "Time writes took until acknowledged by the holders.", n(m.ack_us) / 1e6),
            ("tether_cluster_ack_seconds_count", "counter", "Writes acknowledged.", n(m.acks)),
            ("tether_cluster_ack_failures_total", "counter", "Writes refused for want of acknowledgements.", n(m.ack_failures)),
            ("tether_cluster_forwarded_total", "counter", "Operations sent to the session's owner on another node.", n(m.forwarded)),
            ("tether_cluster_transferred_out_total", "counter", "Sessions sent by transfer rounds (membership changes, repair).", n(m.transferred_out)),
            ("tether_cluster_transferred_in_total", "counter", "Sessions received by transfer rounds.", n(m.transferred_in)),
            ("tether_cluster_transfer_bytes_total", "counter", "Bytes sent by transfer rounds.", n(m.transfer_bytes)),
            ("tether_cluster_read_throughs_total", "counter", "Operations that asked peers first while a transfer was under way.", n(m.read_throughs)),
            ("tether_cluster_segments_handed_off_total", "counter", "Segments handed to their new holders and dropped here.", n(m.handed_off)),
            ("tether_cluster_views_total", "counter", "Membership views installed.", n(m.views)),
            ("tether_cluster_live_nodes", "gauge", "Members of this node's view.", status.live.len() as f64),
            ("tether_cluster_ready", "gauge", "1 when membership converged and this node holds its share (0 after a view change until synced).", yes(status.ready)),
            ("tether_cluster_serving", "gauge", "1 when the node joined and got its share once and is not leaving (its /health).", yes(status.serving)),
            ("tether_cluster_fully_replicated", "gauge", "1 when every session this node holds has all its copies: the next node may be stopped.", yes(status.fully_replicated)),
            ("tether_cluster_sessions_owned", "gauge", "Sessions this node owns.", owned as f64),
            ("tether_cluster_sessions_backup", "gauge", "Sessions this node holds as a backup.", backups as f64),
            ("tether_cluster_session_bytes", "gauge", "Attribute bytes held.", bytes as f64),
            ("tether_cluster_leaving", "gauge", "1 while the node hands its sessions off before exiting.", yes(status.leaving)),
        ];
        for (name, kind, help, value) in rows {
            line(name, kind, help, value);
        }
    }
    {
        let e = &node.events;
        let _ = writeln!(
            out,
            "# HELP tether_session_events_total Session lifecycle events this node saw.\n\
             # TYPE tether_session_events_total counter"
        );
        for (kind, counter) in [
            ("created", &e.created),
            ("rotated", &e.rotated),
            ("logout", &e.logout),
            ("revoked", &e.revoked),
            ("evicted", &e.evicted),
            ("expired", &e.expired),
        ] {
            let _ = writeln!(
                out,
                "tether_session_events_total{{node=\"{}\",kind=\"{kind}\"}} {}",
                node.id,
                counter.load(Ordering::Relaxed)
            );
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}

async fn stats(State(node): State<Node>) -> Json<serde_json::Value> {
    let (sessions, bytes) = match (&node.memory, &node.cluster) {
        (Some(m), _) => {
            let s = m.stats();
            (Some(s.sessions), s.bytes)
        }
        (None, Some(c)) => {
            let (owned, backups, bytes) = c.holdings();
            (Some(owned + backups), bytes)
        }
        _ => (None, 0),
    };
    Json(json!({
        "node": &*node.id,
        "requests": node.requests.load(Ordering::Relaxed),
        // Known for memory and cluster stores; a shared store's count is not this node's.
        "sessions": sessions,
        "session_bytes": bytes,
        "cluster_live": node.cluster.as_ref().map(|c| c.live_nodes()),
        "near_cache": node.redis.as_ref().and_then(|r| r.near_cache_stats()).map(|s| json!({
            "hits": s.hits,
            "misses": s.misses,
            "invalidations": s.invalidations,
            "flushes": s.flushes,
            "evictions": s.evictions,
            "entries": s.entries,
            "bytes": s.bytes,
        })),
        "cluster": node.cluster.as_ref().map(|c| {
            let s = c.status();
            json!({
                "live": s.live,
                "generation": s.me.generation,
                "members": s.members.iter().map(|m| format!("{}@{}", m.name, m.generation)).collect::<Vec<_>>(),
                "ready": s.ready,
                "serving": s.serving,
                "fully_replicated": s.fully_replicated,
                "synced_from": s.synced_from,
                "peers": s.peers,
                "leaving": s.leaving,
            })
        }),
    }))
}
