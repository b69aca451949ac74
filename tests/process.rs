//! The real binary as operators run it: restarts keep keys and audit, the
//! SQLite file never holds material in plaintext, and nothing secret reaches
//! the logs.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ADMIN_KEY: &str = "process-test-admin-key-0123456789abcdef";
const MATERIAL: &str = "sk-proc-MATERIAL-must-never-leak-4242";

/// A keyrouter process with its captured log output.
struct Gateway {
    child: Child,
    admin: String,
    ops: String,
    logs: Arc<Mutex<String>>,
}

impl Gateway {
    fn start(dir: &Path, fernet: &str, level: &str) -> Gateway {
        Self::start_draining(dir, fernet, level, "2s")
    }

    /// With `shutdown_drain = drain`.
    fn start_draining(dir: &Path, fernet: &str, level: &str, drain: &str) -> Gateway {
        let config = dir.join("keyrouter.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nops_listen = \"127.0.0.1:0\"\nshutdown_drain = \"{drain}\"\n\
                 [store]\npath = \"{}\"\n[log]\nlevel = \"{level}\"\nformat = \"json\"\n",
                dir.join("keyrouter.db").display()
            ),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_keyrouter"))
            .args(["serve", "--config", config.to_str().unwrap()])
            .env_clear()
            .env("KEYROUTER_FERNET_KEYS", fernet)
            .env("KEYROUTER_ADMIN_API_KEY", ADMIN_KEY)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        for pipe in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let logs = logs.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<Value>(&line)
                        && v["message"] == "keyrouter started"
                    {
                        let _ = tx.send((v["admin_addr"].clone(), v["ops_addr"].clone()));
                    }
                    logs.lock().unwrap().push_str(&line);
                    logs.lock().unwrap().push('\n');
                }
            });
        }
        let (admin, ops) = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no start line; logs:\n{}", logs.lock().unwrap()));
        Gateway {
            child,
            admin: format!("http://{}/admin/v1", admin.as_str().unwrap()),
            ops: format!("http://{}", ops.as_str().unwrap()),
            logs,
        }
    }

    /// SIGTERM, then wait for a clean exit.
    fn stop(self) -> String {
        self.stop_timed().0
    }

    /// SIGTERM, then wait for a clean exit; the logs, and how long the exit
    /// took.
    fn stop_timed(mut self) -> (String, Duration) {
        let signalled = Instant::now();
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "exit status {status}");
                break;
            }
            assert!(Instant::now() < deadline, "did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
        let took = signalled.elapsed();
        std::thread::sleep(Duration::from_millis(100));
        (self.logs.lock().unwrap().clone(), took)
    }
}

#[tokio::test]
async fn a_store_that_does_not_answer_does_not_hold_up_the_exit() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start_draining(dir.path(), &fernet_key(), "info", "500ms");
    // Another process holds the database's write lock (5 s of waiting
    // before SQLite gives up), and a registration waits for it.
    let other = rusqlite::Connection::open(dir.path().join("keyrouter.db")).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let url = format!("{}/keys", gw.admin);
    let waiting = tokio::spawn(async move {
        let body = json!({"key_material": MATERIAL, "provider_id": "openai"});
        let _ = client()
            .post(url)
            .header("x-api-key", ADMIN_KEY)
            .json(&body)
            .send()
            .await;
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, took) = tokio::task::spawn_blocking(move || gw.stop_timed())
        .await
        .unwrap();
    // The drain time, then a moment for what was given up; not SQLite's
    // 5 s.
    assert!(took < Duration::from_millis(3000), "the exit took {took:?}");
    waiting.abort();
    drop(other);
}

fn fernet_key() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_keyrouter"))
        .arg("gen-fernet-key")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn client() -> reqwest::Client {
    // reqwest needs a process-wide rustls provider even for plain HTTP.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

async fn call(method: reqwest::Method, url: &str, body: Option<Value>) -> (u16, String) {
    let mut req = client().request(method, url).header("x-api-key", ADMIN_KEY);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

#[tokio::test]
async fn restart_keeps_keys_and_audit_and_the_file_has_no_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let fernet = fernet_key();
    let gw = Gateway::start(dir.path(), &fernet, "info");
    let (status, body) = call(
        reqwest::Method::POST,
        &format!("{}/keys", gw.admin),
        Some(json!({"key_material": MATERIAL, "provider_id": "openai", "label": "restart"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = call(
        reqwest::Method::POST,
        &format!("{}/keys/{id}/revoke", gw.admin),
        Some(json!({"reason": "test"})),
    )
    .await;
    assert_eq!(status, 200);
    // A failed login goes through the audit queue; a graceful stop flushes it.
    let resp = client()
        .get(format!("{}/keys", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    gw.stop();

    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().contains("keyrouter.db") {
            bytes.extend(std::fs::read(&path).unwrap());
        }
    }
    assert!(!bytes.is_empty());
    let needle = MATERIAL.as_bytes();
    assert!(
        !bytes.windows(needle.len()).any(|w| w == needle),
        "plaintext material found in the SQLite files"
    );

    let gw = Gateway::start(dir.path(), &fernet, "info");
    let (status, body) = call(
        reqwest::Method::GET,
        &format!("{}/keys/{id}", gw.admin),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let key: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(key["state"], "revoked");
    assert_eq!(key["label"], "restart");
    let (_, body) = call(reqwest::Method::GET, &format!("{}/audit", gw.admin), None).await;
    let events: Value = serde_json::from_str(&body).unwrap();
    let kinds: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["auth_failed", "key_revoked", "key_registered"],
        "{body}"
    );
    let health = client()
        .get(format!("{}/readyz", gw.ops))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    gw.stop();
}

#[tokio::test]
async fn logs_never_hold_material_or_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let fernet = fernet_key();
    let gw = Gateway::start(dir.path(), &fernet, "trace");
    let keys = format!("{}/keys", gw.admin);
    let (status, body) = call(
        reqwest::Method::POST,
        &keys,
        Some(json!({"key_material": MATERIAL, "provider_id": "openai"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // A duplicate and an invalid registration carry the material too.
    let (status, _) = call(
        reqwest::Method::POST,
        &keys,
        Some(json!({"key_material": MATERIAL, "provider_id": "openai"})),
    )
    .await;
    assert_eq!(status, 409);
    let (status, _) = call(
        reqwest::Method::POST,
        &keys,
        Some(json!({"key_material": MATERIAL, "provider_id": "nope"})),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = call(reqwest::Method::GET, &keys, None).await;
    assert_eq!(status, 200);
    let (status, _) = call(
        reqwest::Method::POST,
        &format!("{}/keys/{id}/revoke", gw.admin),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let wrong = "wrong-admin-key-presented-by-an-attacker-000";
    let resp = client()
        .get(&keys)
        .header("x-api-key", wrong)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let logs = gw.stop();

    assert!(logs.contains(&id), "key ids may and should appear in logs");
    for secret in [MATERIAL, ADMIN_KEY, wrong, fernet.as_str()] {
        assert!(!logs.contains(secret), "secret found in logs");
    }
    // Not even the Fernet token of the material.
    assert!(
        !logs.contains("gAAAAA"),
        "a Fernet token appeared in the logs"
    );
}
