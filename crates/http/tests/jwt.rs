//! The stateless strategy: tokens, attacks, rotation, revocation, size.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http_body_util::BodyExt;
use tether::{
    JwtSessions, MemoryStore, Session, SessionConfig, SessionError, SessionLayer, Timestamp,
};
use tether_jwt::{JwtCodec, Revocation};
use tower::ServiceExt;

mod common;
use common::{login, mypage};

const SECRET_1: &str = "c2VjcmV0LW9uZS1zZWNyZXQtb25lLXNlY3JldC1vbmUtMzI=";
const SECRET_2: &str = "c2VjcmV0LXR3by1zZWNyZXQtdHdvLXNlY3JldC10d28tMzI=";
const ED_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIEPu663hQG58no+sQ4pp2yymheXLS7S1D6nRTzBT8i4A\n-----END PRIVATE KEY-----\n";
const ED_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAFRrblQUPcz8guNU0V1zBNTPobYGvxQadBT8Onn+BeTg=\n-----END PUBLIC KEY-----\n";
const EC_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgJ3aGOOLKITskJ7hd\nQXaDJnBFSa/VDe42b5Xq2BIwrVmhRANCAARcWkABxQluAbLakSxnRs+fJGRp/lVF\nbcwfCEVRwFVb44/XtZl0gQiYw+fBBNUp2kvgiQ3j2Yw+napbwYFvLJA3\n-----END PRIVATE KEY-----\n";
const EC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEXFpAAcUJbgGy2pEsZ0bPnyRkaf5V\nRW3MHwhFUcBVW+OP17WZdIEImMPnwQTVKdpL4IkN49mMPp2qW8GBbyyQNw==\n-----END PUBLIC KEY-----\n";

fn hs_keys(signing: &str, keys: &[(&str, &str, bool)]) -> String {
    let mut t = format!("algorithm = \"HS256\"\nsigning_kid = \"{signing}\"\n");
    for (kid, secret, retired) in keys {
        t.push_str(&format!(
            "[[key]]\nkid = \"{kid}\"\nsecret_base64 = \"{secret}\"\nretired = {retired}\n"
        ));
    }
    t
}

fn pem_keys(alg: &str, private: &str, public: &str) -> String {
    format!(
        "algorithm = \"{alg}\"\nsigning_kid = \"k\"\n[[key]]\nkid = \"k\"\nprivate_pem = \"\"\"\n{private}\"\"\"\npublic_pem = \"\"\"\n{public}\"\"\"\n"
    )
}

async fn set(session: Session, body: String) -> Result<&'static str, SessionError> {
    session.insert("blob", body).await?;
    Ok("ok")
}

async fn logout(session: Session) -> Result<&'static str, SessionError> {
    session.destroy().await?;
    Ok("bye")
}

async fn cart(session: Session, item: String) -> Result<String, SessionError> {
    let cart = session
        .modify("cart", |c: &mut Option<Vec<String>>| {
            let c = c.get_or_insert_with(Vec::new);
            c.push(item.clone());
            c.clone()
        })
        .await?;
    Ok(cart.join(","))
}

struct App {
    router: Router,
    clock: Arc<AtomicU64>,
    revocation: Option<Revocation>,
}

struct Reply {
    status: StatusCode,
    token: Option<String>,
    set_cookie: Option<String>,
    body: String,
}

fn app(keys: &str, revoke: bool) -> App {
    let clock = Arc::new(AtomicU64::new(Timestamp::now().0));
    let c = clock.clone();
    let codec = JwtCodec::from_toml(keys)
        .unwrap()
        .with_subject_attribute("loginMember");
    let mut sessions = JwtSessions::new(codec);
    let revocation =
        revoke.then(|| Revocation::new(Arc::new(MemoryStore::new()), Duration::from_secs(43_200)));
    if let Some(r) = &revocation {
        sessions = sessions.with_revocation(r.clone());
    }
    let config = SessionConfig::default()
        .with_idle_timeout(Duration::from_secs(600))
        .with_clock(move || Timestamp(c.load(Ordering::SeqCst)));
    let router = Router::new()
        .route("/login", post(login))
        .route("/mypage", get(mypage))
        .route("/set", post(set))
        .route("/logout", post(logout))
        .route("/cart", post(cart))
        .layer(SessionLayer::jwt(sessions).with_config(config));
    App {
        router,
        clock,
        revocation,
    }
}

impl App {
    async fn send(&self, method: &str, path: &str, token: Option<&str>, body: &str) -> Reply {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header(header::COOKIE, format!("SESSION={t}"));
        }
        let res = self
            .router
            .clone()
            .oneshot(req.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let set_cookie = res
            .headers()
            .get(header::SET_COOKIE)
            .map(|v| v.to_str().unwrap().to_string());
        let token = set_cookie
            .as_ref()
            .and_then(|c| c.strip_prefix("SESSION="))
            .map(|c| c.split(';').next().unwrap().to_string())
            .filter(|t| !t.is_empty());
        let body = String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec())
            .unwrap();
        Reply {
            status,
            token,
            set_cookie,
            body,
        }
    }

    async fn login(&self, member: u64) -> String {
        let r = self.send("POST", "/login", None, &member.to_string()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        r.token.expect("login issues a token")
    }

    fn advance(&self, d: Duration) {
        self.clock.fetch_add(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Asserts `token` is refused and nothing is issued in its place.
    async fn refused(&self, token: &str, what: &str) {
        let r = self.send("GET", "/mypage", Some(token), "").await;
        assert_eq!(
            r.status,
            StatusCode::UNAUTHORIZED,
            "{what} accepted: {}",
            r.body
        );
        assert!(
            r.set_cookie.is_none(),
            "{what}: the response changed the cookie"
        );
    }
}

fn parts(token: &str) -> (String, String, String) {
    let mut it = token.split('.');
    (
        it.next().unwrap().into(),
        it.next().unwrap().into(),
        it.next().unwrap().into(),
    )
}

fn b64(json: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(json).unwrap())
}

fn payload(token: &str) -> serde_json::Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts(token).1).unwrap()).unwrap()
}

#[tokio::test]
async fn a_token_carries_the_session_and_a_read_reissues_nothing() {
    let app = app(&hs_keys("k1", &[("k1", SECRET_1, false)]), false);
    let token = app.login(7).await;
    let claims = payload(&token);
    assert_eq!(claims["attrs"]["loginMember"], 7);
    assert_eq!(claims["sub"], "7");
    for c in ["jti", "iat", "nbf", "exp"] {
        assert!(claims.get(c).is_some(), "claim {c} missing");
    }
    let r = app.send("GET", "/mypage", Some(&token), "").await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "7"));
    assert!(r.set_cookie.is_none());
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts(&token).0).unwrap()).unwrap();
    assert_eq!(header["alg"], "HS256");
    assert_eq!(header["kid"], "k1");
}

#[tokio::test]
async fn forged_tampered_and_stale_tokens_are_refused() {
    let app = app(&hs_keys("k1", &[("k1", SECRET_1, false)]), false);
    let token = app.login(7).await;
    let (h, p, sig) = parts(&token);

    // alg: none.
    let none = b64(&serde_json::json!({"alg": "none", "typ": "JWT", "kid": "k1"}));
    app.refused(&format!("{none}.{p}."), "alg none").await;
    app.refused(&format!("{none}.{p}.{sig}"), "alg none with a signature")
        .await;
    // Tampered payload: member 7 becomes 1.
    let mut claims = payload(&token);
    claims["attrs"]["loginMember"] = 1.into();
    claims["sub"] = "1".into();
    app.refused(&format!("{h}.{}.{sig}", b64(&claims)), "tampered payload")
        .await;
    // Truncated.
    app.refused(&token[..token.len() - 5], "truncated").await;
    app.refused(&format!("{h}.{p}"), "no signature part").await;
    app.refused("garbage", "garbage").await;
    // Unknown key id.
    let other = app_token(&hs_keys("zz", &[("zz", SECRET_2, false)])).await;
    app.refused(&other, "unknown kid").await;
    // Oversized.
    app.refused(&format!("{token}{}", "A".repeat(4000)), "oversized")
        .await;
    // Expired: idle timeout 600 s, leeway 30 s.
    app.advance(Duration::from_secs(631));
    app.refused(&token, "expired").await;
}

/// A token minted by another deployment's key file.
async fn app_token(keys: &str) -> String {
    app(keys, false).login(7).await
}

#[tokio::test]
async fn a_token_from_before_its_nbf_is_refused() {
    let app = app(&hs_keys("k1", &[("k1", SECRET_1, false)]), false);
    // Minted by a node whose clock is 10 minutes ahead.
    let ahead = crate_app_at(
        &hs_keys("k1", &[("k1", SECRET_1, false)]),
        Duration::from_secs(600),
    )
    .await;
    app.refused(&ahead, "not yet valid").await;
}

async fn crate_app_at(keys: &str, ahead: Duration) -> String {
    let other = app(keys, false);
    other.advance(ahead);
    other.login(7).await
}

#[tokio::test]
async fn algorithm_confusion_is_refused() {
    // An EdDSA deployment: its public key is public. An attacker signs an
    // HS256 token using the public key's bytes as the HMAC secret.
    let app = app(&pem_keys("EdDSA", ED_PRIVATE, ED_PUBLIC), false);
    let genuine = app.login(7).await;
    let r = app.send("GET", "/mypage", Some(&genuine), "").await;
    assert_eq!(r.status, StatusCode::OK);
    let mut claims = payload(&genuine);
    claims["attrs"]["loginMember"] = 1.into();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("k".into());
    let forged = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(ED_PUBLIC.as_bytes()),
    )
    .unwrap();
    app.refused(&forged, "HS256 signed with the EdDSA public key")
        .await;
}

#[tokio::test]
async fn eddsa_and_es256_deployments_work_and_publish_jwks() {
    for (alg, private, public, kty) in [
        ("EdDSA", ED_PRIVATE, ED_PUBLIC, "OKP"),
        ("ES256", EC_PRIVATE, EC_PUBLIC, "EC"),
    ] {
        let keys = pem_keys(alg, private, public);
        let app = app(&keys, false);
        let token = app.login(3).await;
        let r = app.send("GET", "/mypage", Some(&token), "").await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "3"), "{alg}");
        let jwks = JwtCodec::from_toml(&keys).unwrap().jwks().clone();
        assert_eq!(jwks["keys"][0]["kty"], kty);
        assert_eq!(jwks["keys"][0]["kid"], "k");
        // The published key verifies the token: a verifier needs nothing else.
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwks["keys"][0].clone()).unwrap();
        let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
        let mut v = jsonwebtoken::Validation::new(if alg == "EdDSA" {
            jsonwebtoken::Algorithm::EdDSA
        } else {
            jsonwebtoken::Algorithm::ES256
        });
        v.validate_exp = false;
        jsonwebtoken::decode::<serde_json::Value>(&token, &key, &v).unwrap();
    }
    let hs = JwtCodec::from_toml(&hs_keys("k1", &[("k1", SECRET_1, false)])).unwrap();
    assert_eq!(
        hs.jwks()["keys"].as_array().unwrap().len(),
        0,
        "secrets are never published"
    );
}

#[tokio::test]
async fn key_rotation_logs_nobody_out_until_the_old_key_is_retired() {
    let v1 = app(&hs_keys("k1", &[("k1", SECRET_1, false)]), false);
    let old = v1.login(7).await;
    // New signing key; k1 still verifies.
    let v2 = app(
        &hs_keys("k2", &[("k2", SECRET_2, false), ("k1", SECRET_1, false)]),
        false,
    );
    let r = v2.send("GET", "/mypage", Some(&old), "").await;
    assert_eq!(r.status, StatusCode::OK, "rotation logged a user out");
    let new = v2.login(8).await;
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts(&new).0).unwrap()).unwrap();
    assert_eq!(header["kid"], "k2");
    // k1 retired: its tokens are refused, k2's still work.
    let v3 = app(
        &hs_keys("k2", &[("k2", SECRET_2, false), ("k1", SECRET_1, true)]),
        false,
    );
    v3.refused(&old, "token of a retired key").await;
    assert_eq!(
        v3.send("GET", "/mypage", Some(&new), "").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn logout_revokes_the_token_everywhere_it_is_checked() {
    let app = app(&hs_keys("k1", &[("k1", SECRET_1, false)]), true);
    let token = app.login(7).await;
    let copy = token.clone();
    let r = app.send("POST", "/logout", Some(&token), "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.set_cookie.unwrap().contains("Max-Age=0"));
    app.refused(&copy, "token after logout").await;
    // Another login of the same member is unaffected.
    let again = app.login(7).await;
    assert_eq!(
        app.send("GET", "/mypage", Some(&again), "").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn log_out_everywhere_revokes_every_session_of_the_user() {
    let app = app(&hs_keys("k1", &[("k1", SECRET_1, false)]), true);
    let phone = app.login(7).await;
    let laptop = app.login(7).await;
    let other_user = app.login(8).await;
    app.advance(Duration::from_millis(5));
    app.revocation
        .as_ref()
        .unwrap()
        .revoke_subject("7", Timestamp(app.clock.load(Ordering::SeqCst)))
        .await
        .unwrap();
    app.refused(&phone, "phone after log-out-everywhere").await;
    app.refused(&laptop, "laptop after log-out-everywhere")
        .await;
    assert_eq!(
        app.send("GET", "/mypage", Some(&other_user), "")
            .await
            .status,
        StatusCode::OK
    );
    app.advance(Duration::from_millis(5));
    let fresh = app.login(7).await;
    assert_eq!(
        app.send("GET", "/mypage", Some(&fresh), "").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn an_oversized_session_is_refused_at_insert() {
    let app = app(&hs_keys("k1", &[("k1", SECRET_1, false)]), false);
    let token = app.login(7).await;
    let r = app
        .send("POST", "/set", Some(&token), &"x".repeat(5000))
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.body);
    assert!(r.body.contains("limit of 3900"), "{}", r.body);
    assert!(r.set_cookie.is_none());
    // The user's token is untouched and a modest value still fits.
    assert_eq!(
        app.send("GET", "/mypage", Some(&token), "").await.status,
        StatusCode::OK
    );
    let r = app
        .send("POST", "/set", Some(&token), &"x".repeat(1000))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.token.unwrap().len() <= 3900);
}

#[tokio::test]
async fn tokens_slide_on_use_and_stop_at_the_absolute_lifetime() {
    let app = app(&hs_keys("k1", &[("k1", SECRET_1, false)]), false);
    let mut token = app.login(7).await;
    let first_exp = payload(&token)["exp"].as_u64().unwrap();
    // A quarter of the 600 s window later, a read reissues a later token.
    app.advance(Duration::from_secs(200));
    let r = app.send("GET", "/mypage", Some(&token), "").await;
    assert_eq!(r.status, StatusCode::OK);
    token = r.token.expect("sliding refresh");
    assert!(payload(&token)["exp"].as_u64().unwrap() >= first_exp + 199);
    // Keep using it every 500 s: alive well past one idle window.
    for _ in 0..3 {
        app.advance(Duration::from_secs(500));
        let r = app.send("GET", "/mypage", Some(&token), "").await;
        assert_eq!(r.status, StatusCode::OK);
        token = r.token.expect("refresh");
    }
    // The absolute lifetime (12 h) is a hard cap.
    let dl = payload(&token)["dl"].as_u64().unwrap();
    assert!(payload(&token)["exp"].as_u64().unwrap() * 1000 <= dl + 999);
}

impl App {
    async fn send_bearer(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: &str,
    ) -> (StatusCode, Option<String>) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::from(body.to_string()))
            .unwrap();
        let res = self.router.clone().oneshot(req).await.unwrap();
        let token = res
            .headers()
            .get("x-auth-token")
            .map(|v| v.to_str().unwrap().to_string());
        (res.status(), token)
    }
}

/// Regression (found in review): with bearer tokens and no response header
/// configured, a reissued token was dropped.
#[tokio::test]
async fn a_bearer_client_gets_its_reissued_token_back() {
    let app = app(&hs_keys("k1", &[("k1", SECRET_1, false)]), false);
    let token = app.login(7).await;
    let (status, reissued) = app.send_bearer("POST", "/set", &token, "dark").await;
    assert_eq!(status, StatusCode::OK);
    let reissued = reissued.expect("the new token in X-Auth-Token");
    assert_eq!(payload(&reissued)["attrs"]["blob"], "dark");
    assert_eq!(
        app.send_bearer("GET", "/mypage", &reissued, "").await.0,
        StatusCode::OK
    );
}

/// Regression (found in review): a login from an anonymous token older than
/// a "log out everywhere" inherited the old creation time and was revoked.
#[tokio::test]
async fn a_login_after_log_out_everywhere_is_not_revoked() {
    let app = app(&hs_keys("k1", &[("k1", SECRET_1, false)]), true);
    let anonymous = app.send("POST", "/set", None, "x").await.token.unwrap();
    app.advance(Duration::from_secs(5));
    let now = Timestamp(app.clock.load(Ordering::SeqCst));
    app.revocation
        .as_ref()
        .unwrap()
        .revoke_subject("7", now)
        .await
        .unwrap();
    app.advance(Duration::from_secs(5));
    let logged_in = app
        .send("POST", "/login", Some(&anonymous), "7")
        .await
        .token
        .unwrap();
    let r = app.send("GET", "/mypage", Some(&logged_in), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

/// A token cannot merge two concurrent changes: each request issues a whole
/// token of its own, the client keeps one of them. Never a corrupt token,
/// never a mix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_modifies_leave_one_writers_whole_token() {
    let app = Arc::new(app(&hs_keys("k1", &[("k1", SECRET_1, false)]), false));
    let token = app.login(7).await;
    let base = app
        .send("POST", "/cart", Some(&token), "first")
        .await
        .token
        .unwrap();
    let (a, b) = tokio::join!(
        app.send("POST", "/cart", Some(&base), "left"),
        app.send("POST", "/cart", Some(&base), "right")
    );
    for (r, item) in [(&a, "left"), (&b, "right")] {
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.body, format!("first,{item}"));
        // Whichever token the client keeps verifies and holds that one
        // writer's cart, whole.
        let t = r.token.as_deref().unwrap();
        let seen = app.send("POST", "/cart", Some(t), "check").await;
        assert_eq!(seen.status, StatusCode::OK);
        assert_eq!(seen.body, format!("first,{item},check"));
    }
}

/// The outside probe's finding: `s` replaced by `n - s` is a second valid
/// ECDSA encoding of the same token. Only the low-`s` form is accepted, and
/// every token tether signs is in it.
#[tokio::test]
async fn a_high_s_es256_signature_is_refused_and_never_issued() {
    const N: [u8; 32] = [
        0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63,
        0x25, 0x51,
    ];
    let keys = pem_keys("ES256", EC_PRIVATE, EC_PUBLIC);
    let app = app(&keys, false);
    // Signing is randomised: enough logins that an unnormalised signer
    // would have produced a high `s` (half of them) many times over.
    for member in 0..40 {
        let token = app.login(member).await;
        let (signed, sig) = token.rsplit_once('.').unwrap();
        let raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
        assert_eq!(raw.len(), 64);
        assert!(raw[32] < 0x80, "tether issued a high-S signature");
        let r = app.send("GET", "/mypage", Some(&token), "").await;
        assert_eq!(r.status, StatusCode::OK);
        // n - s: still a valid signature for a library that does not care.
        let mut high = raw.clone();
        let mut borrow = 0i16;
        for i in (0..32).rev() {
            let d = i16::from(N[i]) - i16::from(raw[32 + i]) - borrow;
            borrow = i16::from(d < 0);
            high[32 + i] = d.rem_euclid(256) as u8;
        }
        let forged = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(&high));
        let jwk: jsonwebtoken::jwk::Jwk =
            serde_json::from_value(JwtCodec::from_toml(&keys).unwrap().jwks()["keys"][0].clone())
                .unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        v.validate_exp = false;
        jsonwebtoken::decode::<serde_json::Value>(
            &forged,
            &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
            &v,
        )
        .expect("n - s verifies as ECDSA");
        app.refused(&forged, "high-S twin of a valid token").await;
    }
    let codec = JwtCodec::from_toml(&keys).unwrap();
    let token = app.login(1).await;
    let (signed, sig) = token.rsplit_once('.').unwrap();
    let mut raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
    raw[32] = 0xff;
    let high = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(&raw));
    assert_eq!(
        codec.decode(&high, Timestamp::now()).unwrap_err(),
        tether_jwt::JwtError::HighS
    );
}

/// RFC 7515 §4.1.11: a token naming critical header extensions the verifier
/// does not implement must be refused, even when correctly signed.
#[tokio::test]
async fn a_token_with_critical_header_extensions_is_refused() {
    let keys = hs_keys("k1", &[("k1", SECRET_1, false)]);
    let app = app(&keys, false);
    let token = app.login(7).await;
    let (header, rest) = token.split_once('.').unwrap();
    let payload = rest.split('.').next().unwrap();
    let mut h: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    for crit in [serde_json::json!(["exp"]), serde_json::json!(["b64"])] {
        h["crit"] = crit.clone();
        if crit == serde_json::json!(["exp"]) {
            h["exp"] = serde_json::json!(9_999_999_999u64);
        }
        let header = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&h).unwrap());
        // Signed with the real key: only `crit` is wrong.
        let key = jsonwebtoken::EncodingKey::from_base64_secret(SECRET_1).unwrap();
        let sig = jsonwebtoken::crypto::sign(
            format!("{header}.{payload}").as_bytes(),
            &key,
            jsonwebtoken::Algorithm::HS256,
        )
        .unwrap();
        let forged = format!("{header}.{payload}.{sig}");
        app.refused(&forged, "crit header").await;
        assert_eq!(
            JwtCodec::from_toml(&keys)
                .unwrap()
                .decode(&forged, Timestamp::now())
                .unwrap_err(),
            tether_jwt::JwtError::CriticalExtension,
            "{crit}"
        );
    }
}
