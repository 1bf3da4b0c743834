//! The `jwt` strategy with real node processes sharing one key file.

use std::path::{Path, PathBuf};

use serde_json::json;
use tether_testkit::{node_args, Client, Process, RedisServer};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tether"))
}

/// A key file made by `tether jwt-keygen`, in a temp dir kept by the caller.
async fn keygen(dir: &tempfile::TempDir) -> PathBuf {
    let out = tokio::process::Command::new(bin())
        .arg("jwt-keygen")
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let path = dir.path().join("keys.toml");
    std::fs::write(&path, &out.stdout).unwrap();
    path
}

async fn jwt_node(id: &str, keys: &Path, extra: &[&str]) -> Process {
    let mut args = node_args(id, "jwt");
    args.extend(["--jwt-key-file".to_string(), keys.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    Process::spawn(bin(), &args).await.unwrap()
}

/// The end of the brief: no store at all, and every server knows the user.
#[tokio::test]
async fn three_nodes_sharing_a_key_need_no_store_and_survive_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let keys = keygen(&dir).await;
    let (mut a, b, c) = tokio::join!(
        jwt_node("A", &keys, &[]),
        jwt_node("B", &keys, &[]),
        jwt_node("C", &keys, &[])
    );
    let user = Client::new();
    let login = user
        .post_json(&a.url("/login"), &json!({"member": 7}))
        .await
        .unwrap();
    assert_eq!(login.json().unwrap(), json!({"member": 7, "node": "A"}));
    assert!(
        user.cookie("SESSION").unwrap().matches('.').count() == 2,
        "the cookie holds a JWT"
    );
    for node in [&b, &c] {
        let r = user.get(&node.url("/mypage")).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let cart = user
        .post_json(&b.url("/cart"), &json!({"item": "book"}))
        .await
        .unwrap();
    assert_eq!(cart.json().unwrap()["cart"], json!(["book"]));
    a.kill().await;
    let r = user.get(&c.url("/mypage")).await.unwrap();
    assert_eq!(r.json().unwrap(), json!({"member": 7, "node": "C"}));
    // API clients can send the token as a bearer token.
    let token = user.cookie("SESSION").unwrap();
    let bearer = format!("Bearer {token}");
    let r = Client::new()
        .send(
            http::Method::GET,
            &b.url("/mypage"),
            &[("authorization", bearer.as_str())],
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn logout_on_one_node_revokes_the_token_on_every_node() {
    let redis = RedisServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keys = keygen(&dir).await;
    let url = redis.url();
    let extra = ["--jwt-revocation", url.as_str()];
    let (a, b) = tokio::join!(jwt_node("A", &keys, &extra), jwt_node("B", &keys, &extra));
    let user = Client::new();
    user.post_json(&a.url("/login"), &json!({"member": 7}))
        .await
        .unwrap();
    let stolen = user.fork();
    let logout = user.post_json(&b.url("/logout"), &json!({})).await.unwrap();
    assert_eq!(logout.status, 200);
    assert_eq!(user.get(&a.url("/mypage")).await.unwrap().status, 401);
    assert_eq!(
        stolen.get(&a.url("/mypage")).await.unwrap().status,
        401,
        "a copied token survived logout"
    );

    // Log out everywhere: both devices of member 9 lose their session.
    let phone = Client::new();
    let laptop = Client::new();
    phone
        .post_json(&a.url("/login"), &json!({"member": 9}))
        .await
        .unwrap();
    laptop
        .post_json(&b.url("/login"), &json!({"member": 9}))
        .await
        .unwrap();
    let r = phone
        .post_json(&a.url("/logout-everywhere"), &json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(laptop.get(&b.url("/mypage")).await.unwrap().status, 401);
}

#[tokio::test]
async fn an_eddsa_node_publishes_its_jwks_and_a_missing_key_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("ed.toml");
    std::fs::write(
        &keys,
        "algorithm = \"EdDSA\"\nsigning_kid = \"ed1\"\n[[key]]\nkid = \"ed1\"\n\
         private_pem = \"\"\"\n-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIEPu663hQG58no+sQ4pp2yymheXLS7S1D6nRTzBT8i4A\n-----END PRIVATE KEY-----\n\"\"\"\n\
         public_pem = \"\"\"\n-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAFRrblQUPcz8guNU0V1zBNTPobYGvxQadBT8Onn+BeTg=\n-----END PUBLIC KEY-----\n\"\"\"\n",
    )
    .unwrap();
    let a = jwt_node("A", &keys, &[]).await;
    let jwks = Client::new()
        .get(&a.url("/.well-known/jwks.json"))
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(jwks["keys"][0]["kid"], "ed1");
    assert_eq!(jwks["keys"][0]["crv"], "Ed25519");
    assert!(jwks["keys"][0].get("d").is_none(), "the private key leaked");

    let out = tokio::process::Command::new(bin())
        .args([
            "node",
            "--id",
            "A",
            "--listen",
            "127.0.0.1:0",
            "--store",
            "jwt",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--jwt-key-file"));
}
