//! The command line as an operator meets it: the real binary, its exit codes
//! and its one-line errors.

use std::process::{Command, Output};

fn keyrouter(args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyrouter"));
    cmd.args(args).current_dir(dir.path()).env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn fernet_key() -> String {
    let out = keyrouter(&["gen-fernet-key"], &[]);
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes `text` to a config file in a fresh directory.
fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyrouter.toml");
    std::fs::write(&path, text).unwrap();
    let p = path.to_str().unwrap().to_owned();
    (dir, p)
}

#[test]
fn gen_fernet_key_prints_a_usable_key() {
    let a = fernet_key();
    let b = fernet_key();
    assert_eq!(a.len(), 44, "url-safe base64 of 32 bytes");
    assert_ne!(a, b);
    let out = keyrouter(&["check-config"], &[("KEYROUTER_FERNET_KEYS", &a)]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn version_and_usage_errors() {
    let out = keyrouter(&["--version"], &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("keyrouter "));
    let out = keyrouter(&["no-such-command"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn check_config_masks_every_secret() {
    let key = fernet_key();
    let admin = "admin-key-for-the-cli-test-0123456789";
    let jwt = "jwt-secret-for-the-cli-test-0123456789";
    let out = keyrouter(
        &["check-config"],
        &[
            ("KEYROUTER_FERNET_KEYS", &key),
            ("KEYROUTER_ADMIN_API_KEY", admin),
            ("KEYROUTER_ADMIN_JWT_SECRET", jwt),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    for secret in [key.as_str(), admin, jwt] {
        assert!(!text.contains(secret), "secret printed:\n{text}");
    }
    assert!(
        text.contains("KEYROUTER_ADMIN_API_KEY = \"[set]\""),
        "{text}"
    );
    assert!(text.contains("admin_listen = \"127.0.0.1:8081\""), "{text}");
}

/// One line on stderr naming the setting, exit code 1, for each way the
/// configuration can be wrong; `serve` refuses to start on the same errors.
#[test]
fn config_errors_name_the_setting_and_exit_1() {
    let key = fernet_key();
    let (_d1, bad_id) = config_file(
        "[[providers]]\nid = \"Bad-Id\"\nkind = \"openai\"\nbase_url = \"https://x\"\nroute_prefix = \"/x\"\n",
    );
    let (_d2, bad_tls) = config_file(
        "[tls]\ncert_path = \"/nonexistent/tls.crt\"\nkey_path = \"/nonexistent/tls.key\"\n",
    );
    let (_d3, same_socket) = config_file(
        "[server]\nlisten = \"127.0.0.1:18080\"\nadmin_listen = \"127.0.0.1:18080\"\nops_listen = \"127.0.0.1:0\"\n",
    );
    let pasted = "sk-pasted-into-the-wrong-variable";
    /// Extra arguments, environment, expected message, a value never to echo.
    type Case<'a> = (
        Vec<&'a str>,
        Vec<(&'a str, &'a str)>,
        &'a str,
        Option<&'a str>,
    );
    let cases: Vec<Case> = vec![
        (vec![], vec![], "KEYROUTER_FERNET_KEYS is required", None),
        (
            vec![],
            vec![("KEYROUTER_FERNET_KEYS", "not-a-fernet-key-at-all")],
            "KEYROUTER_FERNET_KEYS entry 1",
            Some("not-a-fernet-key-at-all"),
        ),
        (
            vec![],
            vec![
                ("KEYROUTER_FERNET_KEYS", &key),
                ("KEYROUTER_ADMIN_API_KEY", "too-short-admin"),
            ],
            "KEYROUTER_ADMIN_API_KEY must be at least 32 characters",
            Some("too-short-admin"),
        ),
        (
            vec!["--config", &bad_id],
            vec![("KEYROUTER_FERNET_KEYS", &key)],
            "providers[0].id must match",
            None,
        ),
        (
            vec!["--config", &bad_tls],
            vec![("KEYROUTER_FERNET_KEYS", &key)],
            "tls.cert_path: /nonexistent/tls.crt cannot be read",
            None,
        ),
        (
            vec!["--config", &same_socket],
            vec![("KEYROUTER_FERNET_KEYS", &key)],
            "server.listen and server.admin_listen must not use the same port on the same address",
            None,
        ),
        (
            vec![],
            vec![
                ("KEYROUTER_FERNET_KEYS", &key),
                ("KEYROUTER_SERVER__ADMIN_LISTEN", "0.0.0.0:9090"),
            ],
            "KEYROUTER_SERVER__ADMIN_LISTEN: server.admin_listen and server.ops_listen must not use",
            None,
        ),
        (
            vec![],
            vec![
                ("KEYROUTER_FERNET_KEYS", &key),
                ("KEYROUTER_SERVER__MAX_BODY_BYTES", pasted),
            ],
            "KEYROUTER_SERVER__MAX_BODY_BYTES: setting `server.max_body_bytes` has a value of the wrong type",
            Some(pasted),
        ),
        (
            vec![],
            vec![("KEYROUTER_FERNET_KEYS", &key), ("KEYROUTER_FOO__BAR", "1")],
            "KEYROUTER_FOO__BAR: unknown setting `foo`",
            None,
        ),
        (
            vec!["--config", "/nonexistent/keyrouter.toml"],
            vec![("KEYROUTER_FERNET_KEYS", &key)],
            "config file /nonexistent/keyrouter.toml: cannot be read",
            None,
        ),
    ];
    for (extra, env, expected, secret) in cases {
        for command in ["check-config", "serve"] {
            let mut args = vec![command];
            args.extend(&extra);
            let out = keyrouter(&args, &env);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(1), "{command} {extra:?}: {err}");
            assert_eq!(err.lines().count(), 1, "one line expected: {err}");
            assert!(
                err.contains(expected),
                "{command}: expected {expected:?} in {err:?}"
            );
            if let Some(s) = secret {
                assert!(!err.contains(s), "secret echoed: {err}");
            }
        }
    }
}
