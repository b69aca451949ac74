//! The management API through its front door: a real gateway on loopback
//! ports, plain HTTP. Every answer is checked by the harness for admin
//! credentials, tokens and every key material sent (see `common`).

mod common;

use common::{ANTHROPIC_BASE_URL, Auth, OPENAI_BASE_URL, TestGateway, sign_jwt, token};
use keyrouter::audit::EventKind;
use keyrouter::keys::{KeyId, KeyStatus, Vault};
use keyrouter::secret::Secret;
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::net::{IpAddr, Ipv4Addr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `YYYY-MM-DDTHH:MM:SSZ`.
fn is_seconds_timestamp(v: &Value) -> bool {
    let s = v.as_str().unwrap_or_default();
    s.len() == 20
        && s.ends_with('Z')
        && chrono::DateTime::parse_from_rfc3339(s).is_ok()
        && s.as_bytes()[10] == b'T'
}

fn id_of(key: &Value) -> String {
    key["id"].as_str().unwrap().to_owned()
}

/// Audit events as the API lists them (one request).
async fn audit(gw: &TestGateway, query: &str) -> Vec<Value> {
    let reply = gw.get(&format!("/audit{query}")).send().await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    reply.json()["events"].as_array().unwrap().clone()
}

#[tokio::test]
async fn registration_returns_the_contract_key_object() {
    let gw = TestGateway::start().await;
    let material = "sk-REGISTER-shape-0123456789abcdef";
    let reply = gw
        .post(
            "/keys",
            json!({
                "key_material": material,
                "provider_id": "openai",
                "label": "team-a production",
                "limits": {"rpm": 500, "tpm": 200000, "max_concurrent": 50},
                "weight": 3,
                "metadata": {"owner": "team-a"}
            }),
        )
        .send()
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text);
    assert!(reply.header("x-request-id").is_some());
    assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let key = reply.json();
    let mut fields: Vec<&str> = key
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    let mut expected = [
        "id",
        "provider_id",
        "label",
        "state",
        "state_reason",
        "cooldown_until",
        "limits",
        "weight",
        "fingerprint",
        "metadata",
        "created_at",
        "updated_at",
        "state_changed_at",
    ];
    expected.sort_unstable();
    assert_eq!(fields, expected);
    assert!(KeyId::parse(key["id"].as_str().unwrap()).is_some(), "{key}");
    assert_eq!(key["provider_id"], "openai");
    assert_eq!(key["label"], "team-a production");
    assert_eq!(key["state"], "active");
    assert_eq!(key["state_reason"], Value::Null);
    assert_eq!(key["cooldown_until"], Value::Null);
    assert_eq!(
        key["limits"],
        json!({"rpm": 500, "tpm": 200000, "max_concurrent": 50})
    );
    assert_eq!(key["weight"], 3);
    assert_eq!(key["metadata"], json!({"owner": "team-a"}));
    let digest = hex::encode(Sha256::digest(material.as_bytes()));
    assert_eq!(key["fingerprint"], format!("sha256:{}", &digest[..8]));
    for t in ["created_at", "updated_at", "state_changed_at"] {
        assert!(is_seconds_timestamp(&key[t]), "{t}: {}", key[t]);
    }
    for forbidden in ["material", "token", "material_hash", "sealed", "revision"] {
        assert!(!reply.text.contains(forbidden), "{}", reply.text);
    }

    // GET adds usage; otherwise the same object.
    let id = id_of(&key);
    let reply = gw.get(&format!("/keys/{id}")).send().await;
    assert_eq!(reply.status, 200);
    let mut read = reply.json();
    assert_eq!(
        read["usage"],
        json!({"requests_last_minute": 0, "tokens_last_minute": 0, "in_flight": 0})
    );
    read.as_object_mut().unwrap().remove("usage");
    assert_eq!(read, key);

    // Defaults of a minimal registration.
    let minimal = gw
        .register_key("anthropic", "sk-ant-MINIMAL-0123456789")
        .await;
    assert_eq!(minimal["label"], Value::Null);
    assert_eq!(minimal["weight"], 1);
    assert_eq!(minimal["metadata"], json!({}));
    assert_eq!(
        minimal["limits"],
        json!({"rpm": null, "tpm": null, "max_concurrent": null})
    );

    let events = audit(&gw, &format!("?resource={id}")).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["event"], "key_registered");
    assert_eq!(e["actor"], "admin:api_key");
    assert_eq!(e["action"], "register");
    assert_eq!(e["to"], "active");
    assert_eq!(e["result"], "success");
    gw.stop().await;
}

#[tokio::test]
async fn same_material_twice_for_one_provider_is_a_conflict() {
    let gw = TestGateway::start().await;
    let material = "sk-DUPLICATE-material-0123456789";
    gw.register_key("openai", material).await;
    let reply = gw
        .post(
            "/keys",
            json!({"key_material": material, "provider_id": "openai"}),
        )
        .send()
        .await;
    reply.error(409, "conflict");
    // Another provider may hold the same string.
    gw.register_key("anthropic", material).await;
    gw.stop().await;
}

#[tokio::test]
async fn keys_list_filters_and_pages_without_gaps_or_overlap() {
    let gw = TestGateway::start().await;
    let mut registered = vec![];
    for i in 0..5 {
        registered.push(id_of(
            &gw.register_key("openai", &format!("sk-LIST-openai-{i:04}-abcdef"))
                .await,
        ));
    }
    for i in 0..2 {
        registered.push(id_of(
            &gw.register_key("anthropic", &format!("sk-LIST-anthropic-{i:04}-abc"))
                .await,
        ));
    }

    let mut seen = vec![];
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let query = match &cursor {
            Some(c) => format!("/keys?limit=3&cursor={c}"),
            None => "/keys?limit=3".to_owned(),
        };
        let page = gw.get(&query).send().await.json();
        let keys = page["keys"].as_array().unwrap();
        assert!(keys.len() <= 3);
        seen.extend(keys.iter().map(id_of));
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, registered, "oldest first, each key exactly once");

    let all = gw.get("/keys").send().await.json();
    assert_eq!(all["keys"].as_array().unwrap().len(), 7);
    assert_eq!(all["next_cursor"], Value::Null);

    let anthropic = gw.get("/keys?provider_id=anthropic").send().await.json();
    let ids: Vec<String> = anthropic["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(ids, registered[5..]);

    let reply = gw
        .post(&format!("/keys/{}/revoke", registered[1]), json!({}))
        .send()
        .await;
    assert_eq!(reply.status, 200);
    let revoked = gw.get("/keys?state=revoked").send().await.json();
    let ids: Vec<String> = revoked["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(ids, [registered[1].clone()]);
    let active_openai = gw
        .get("/keys?provider_id=openai&state=active")
        .send()
        .await
        .json();
    assert_eq!(active_openai["keys"].as_array().unwrap().len(), 4);

    for (query, field, value) in [
        ("/keys?state=sleeping_beauty", "state", "sleeping_beauty"),
        ("/keys?limit=0", "limit", "limit=0"),
        ("/keys?limit=201", "limit", "201"),
        (
            "/keys?cursor=Zm9vYmFyX2JvZ3Vz",
            "cursor",
            "Zm9vYmFyX2JvZ3Vz",
        ),
        ("/keys?provider_id=Not%20Valid!", "provider_id", "Not"),
        (
            "/keys?order=newest",
            "unknown query parameter `order`",
            "newest",
        ),
    ] {
        let msg = gw.get(query).send().await.error(400, "invalid_request");
        assert!(msg.contains(field), "{query}: {msg}");
        assert!(!msg.contains(value), "{query}: {msg}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn patch_changes_fields_and_is_audited() {
    let gw = TestGateway::start().await;
    let key = gw
        .post(
            "/keys",
            json!({"key_material": "sk-PATCH-me-0123456789", "provider_id": "openai",
                   "label": "old", "limits": {"rpm": 10, "tpm": 20}, "metadata": {"a": "1"}}),
        )
        .send()
        .await
        .json();
    let id = id_of(&key);
    let reply = gw
        .patch(
            &format!("/keys/{id}"),
            json!({"label": "new label", "limits": {"max_concurrent": 5}, "weight": 9, "metadata": {"owner": "b"}}),
        )
        .send()
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let updated = reply.json();
    assert_eq!(updated["label"], "new label");
    assert_eq!(
        updated["limits"],
        json!({"rpm": null, "tpm": null, "max_concurrent": 5}),
        "limits are replaced as a whole"
    );
    assert_eq!(updated["weight"], 9);
    assert_eq!(updated["metadata"], json!({"owner": "b"}));
    assert_eq!(updated["state"], "active");
    assert_eq!(updated["created_at"], key["created_at"]);

    let cleared = gw
        .patch(&format!("/keys/{id}"), json!({"label": null}))
        .send()
        .await
        .json();
    assert_eq!(cleared["label"], Value::Null);
    assert_eq!(cleared["weight"], 9);

    gw.patch(&format!("/keys/{id}"), json!({}))
        .send()
        .await
        .error(400, "invalid_request");

    let events = audit(&gw, &format!("?resource={id}&event=key_updated")).await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["actor"], "admin:api_key");
    assert_eq!(events[0]["action"], "update");
    assert_eq!(
        events[1]["reason"],
        "changed label, limits, weight, metadata"
    );
    gw.stop().await;
}

#[tokio::test]
async fn revoke_and_delete_follow_the_state_table() {
    let gw = TestGateway::start().await;
    let material = "sk-REVOKE-then-DELETE-0123456789";
    let id = id_of(&gw.register_key("openai", material).await);

    let revoked = gw
        .post(
            &format!("/keys/{id}/revoke"),
            json!({"reason": "leaked in a ticket"}),
        )
        .send()
        .await;
    assert_eq!(revoked.status, 200, "{}", revoked.text);
    let revoked = revoked.json();
    assert_eq!(revoked["state"], "revoked");
    assert_eq!(revoked["state_reason"], "leaked in a ticket");
    assert!(is_seconds_timestamp(&revoked["state_changed_at"]));

    let msg = gw
        .post(&format!("/keys/{id}/revoke"), json!({}))
        .send()
        .await
        .error(409, "conflict");
    assert!(!msg.contains(&id), "messages never carry key ids: {msg}");
    gw.request(Method::POST, &format!("/keys/{id}/reactivate"))
        .send()
        .await
        .error(409, "conflict");

    let deleted = gw.delete(&format!("/keys/{id}")).send().await;
    assert_eq!(deleted.status, 200, "{}", deleted.text);
    let deleted = deleted.json();
    assert_eq!(deleted["state"], "revoked");
    assert_eq!(deleted["state_reason"], "leaked in a ticket");
    gw.delete(&format!("/keys/{id}"))
        .send()
        .await
        .error(409, "conflict");

    // The record stays, without material; the same material may come back.
    let stored = gw
        .app()
        .store
        .get_key(&KeyId::parse(&id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(stored.sealed.is_none() && stored.material_hash.is_none());
    assert_eq!(gw.get(&format!("/keys/{id}")).send().await.status, 200);
    gw.register_key("openai", material).await;

    // Deleting an active key revokes it on the way.
    let other = id_of(
        &gw.register_key("openai", "sk-DELETE-active-0123456789")
            .await,
    );
    let gone = gw.delete(&format!("/keys/{other}")).send().await.json();
    assert_eq!(
        (gone["state"].as_str(), gone["state_reason"].as_str()),
        (Some("revoked"), Some("operator_deleted"))
    );

    let events = audit(&gw, &format!("?resource={id}")).await;
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["key_deleted", "key_revoked", "key_registered"],
        "newest first"
    );
    let (del, rev) = (&events[0], &events[1]);
    assert_eq!(
        (&rev["from"], &rev["to"]),
        (&json!("active"), &json!("revoked"))
    );
    assert_eq!(rev["reason"], "leaked in a ticket");
    assert_eq!(rev["actor"], "admin:api_key");
    assert_eq!(
        (&del["from"], &del["to"]),
        (&json!("revoked"), &json!("revoked"))
    );
    assert_eq!(del["actor"], "admin:api_key");
    let other_events = audit(&gw, &format!("?resource={other}&event=key_deleted")).await;
    assert_eq!(other_events[0]["from"], "active");
    gw.stop().await;
}

#[tokio::test]
async fn reactivate_brings_back_exhausted_and_invalid_keys_only() {
    let gw = TestGateway::start().await;
    let id = id_of(&gw.register_key("openai", "sk-REACTIVATE-0123456789").await);
    let path = format!("/keys/{id}/reactivate");

    gw.request(Method::POST, &path)
        .send()
        .await
        .error(409, "conflict");

    for (forced, name) in [
        (KeyStatus::Exhausted, "exhausted"),
        (KeyStatus::Invalid, "invalid"),
    ] {
        gw.set_state(&id, forced).await;
        let reply = gw.request(Method::POST, &path).send().await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        let key = reply.json();
        assert_eq!(key["state"], "active");
        assert_eq!(key["state_reason"], "operator_reactivated");
        let events = audit(
            &gw,
            &format!("?resource={id}&event=key_reactivated&limit=1"),
        )
        .await;
        let e = &events[0];
        assert_eq!(
            (e["from"].as_str(), e["to"].as_str()),
            (Some(name), Some("active"))
        );
        assert_eq!(e["actor"], "admin:api_key");
        assert_eq!(e["action"], "reactivate");
    }

    let until = chrono::Utc::now() + chrono::Duration::seconds(300);
    gw.set_state(&id, KeyStatus::CoolingDown { until }).await;
    let cooling = gw.get(&format!("/keys/{id}")).send().await.json();
    assert_eq!(cooling["state"], "cooling_down");
    assert!(
        is_seconds_timestamp(&cooling["cooldown_until"]),
        "{cooling}"
    );
    gw.request(Method::POST, &path)
        .send()
        .await
        .error(409, "conflict");

    gw.post(&format!("/keys/{id}/revoke"), json!({}))
        .send()
        .await;
    gw.request(Method::POST, &path)
        .send()
        .await
        .error(409, "conflict");
    // A body with fields is refused on a route that takes none.
    gw.set_state(&id, KeyStatus::Revoked).await;
    let msg = gw
        .post(&path, json!({"force": true}))
        .send()
        .await
        .error(400, "invalid_request");
    assert!(msg.contains("`force`"), "{msg}");
    gw.stop().await;
}

/// Operator moves are state transitions like the router's, and are
/// counted as such; a DELETE of a key already revoked changes nothing.
#[tokio::test]
async fn operator_state_changes_are_counted_as_transitions() {
    let gw = TestGateway::start().await;
    let count = |from: &'static str, to: &'static str| {
        let gw = &gw;
        async move {
            gw.metric(
                "keyrouter_key_transitions_total",
                &[("provider", "openai"), ("from", from), ("to", to)],
            )
            .await
        }
    };
    let a = id_of(&gw.register_key("openai", "sk-COUNTED-a-0123456789").await);
    let b = id_of(&gw.register_key("openai", "sk-COUNTED-b-0123456789").await);

    let revoked = gw
        .post(&format!("/keys/{a}/revoke"), json!({}))
        .send()
        .await;
    assert_eq!(revoked.status, 200, "{}", revoked.text);
    assert_eq!(count("active", "revoked").await, Some(1.0));

    for (forced, from) in [
        (KeyStatus::Exhausted, "exhausted"),
        (KeyStatus::Invalid, "invalid"),
    ] {
        // Forced through the store, as the router would: not counted here.
        gw.set_state(&b, forced).await;
        let reply = gw
            .request(Method::POST, &format!("/keys/{b}/reactivate"))
            .send()
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(count(from, "active").await, Some(1.0), "{from}");
    }

    assert_eq!(gw.delete(&format!("/keys/{b}")).send().await.status, 200);
    assert_eq!(count("active", "revoked").await, Some(2.0));
    assert_eq!(gw.delete(&format!("/keys/{a}")).send().await.status, 200);
    assert_eq!(count("active", "revoked").await, Some(2.0));
    assert_eq!(count("revoked", "revoked").await, None);
    assert_eq!(
        gw.metric(
            "keyrouter_key_transitions_total",
            &[
                ("provider", "anthropic"),
                ("from", "active"),
                ("to", "revoked")
            ],
        )
        .await,
        Some(0.0)
    );
    gw.stop().await;
}

#[tokio::test]
async fn ids_are_checked_before_lookup() {
    let gw = TestGateway::start().await;
    for path in [
        "/keys/NOT_AN_ID",
        "/keys/key_short",
        "/keys/key_UPPERCASE123",
    ] {
        let msg = gw.get(path).send().await.error(400, "invalid_request");
        assert!(msg.starts_with("id:"), "{msg}");
    }
    gw.get("/keys/key_doesnotexist0")
        .send()
        .await
        .error(404, "not_found");
    gw.post("/keys/key_doesnotexist0/revoke", json!({}))
        .send()
        .await
        .error(404, "not_found");
    gw.delete("/keys/key_doesnotexist0")
        .send()
        .await
        .error(404, "not_found");
    gw.stop().await;
}

#[tokio::test]
async fn routing_happens_after_authentication() {
    let gw = TestGateway::start().await;
    gw.get("/nothing/here").send().await.error(404, "not_found");
    let reply = gw.request(Method::PUT, "/keys").send().await;
    reply.error(405, "invalid_request");
    assert_eq!(reply.header("allow"), Some("GET, POST"));
    // Without credentials neither tells anything about the routes.
    gw.get("/nothing/here")
        .no_auth()
        .send()
        .await
        .error(401, "unauthorized");
    gw.request(Method::PUT, "/keys")
        .no_auth()
        .send()
        .await
        .error(401, "unauthorized");
    gw.stop().await;
}

#[tokio::test]
async fn every_auth_failure_is_refused_audited_and_counted() {
    let gw = TestGateway::start().await;
    let now = chrono::Utc::now().timestamp();
    let expired = sign_jwt(
        common::JWT_SECRET,
        &json!({"sub": "ops", "scope": "keys:read", "exp": now - 3600}),
    );
    let forged = sign_jwt(
        "some-other-secret-of-sufficient-length-42",
        &json!({"sub": "ops", "scope": "keys:read keys:write audit:read", "exp": now + 600}),
    );
    let reader = token("reader-bot", "keys:read");
    let wrong_key = "wrong-admin-key-0123456789abcdef-QQQ";

    let cases = [
        (Auth::None, "missing_credentials"),
        (Auth::ApiKey(wrong_key.to_owned()), "invalid_api_key"),
        (Auth::Bearer(expired), "expired_token"),
        (Auth::Bearer(forged), "invalid_token"),
        (Auth::Bearer("not-a-jwt".to_owned()), "invalid_token"),
    ];
    for (auth, _) in &cases {
        gw.get("/keys")
            .auth(auth.clone())
            .send()
            .await
            .error(401, "unauthorized");
    }
    // A valid token without the route's scope.
    gw.post(
        "/keys",
        json!({"key_material": "sk-SCOPE-denied-0123456789", "provider_id": "openai"}),
    )
    .bearer(&reader)
    .send()
    .await
    .error(403, "forbidden");
    gw.get("/audit")
        .bearer(&reader)
        .send()
        .await
        .error(403, "forbidden");
    // The same token is fine where its scope suffices.
    assert_eq!(gw.get("/keys").bearer(&reader).send().await.status, 200);
    assert_eq!(
        gw.get("/providers").bearer(&reader).send().await.status,
        200
    );

    let events = gw
        .wait_for_events(EventKind::AuthFailed, cases.len() + 2)
        .await;
    assert_eq!(events.len(), cases.len() + 2);
    let mut reasons: Vec<String> = events.iter().map(|e| e.reason.clone().unwrap()).collect();
    reasons.sort();
    let mut expected: Vec<String> = cases.iter().map(|(_, r)| (*r).to_owned()).collect();
    expected.extend([
        "insufficient_scope".to_owned(),
        "insufficient_scope".to_owned(),
    ]);
    expected.sort();
    assert_eq!(reasons, expected);

    // The same events through the API: anonymous, with the caller's address,
    // without any presented credential (the harness checks the body for them).
    let listed = audit(&gw, "?event=auth_failed").await;
    assert_eq!(listed.len(), cases.len() + 2);
    for e in &listed {
        assert_eq!(e["actor"], "anonymous");
        assert_eq!(e["action"], "authenticate");
        assert_eq!(e["result"], "failure");
        assert_eq!(e["client_addr"], "127.0.0.1");
    }
    assert!(listed.iter().any(|e| e["resource"] == "/admin/v1/audit"));
    assert!(
        listed
            .iter()
            .all(|e| e["resource"] == "/admin/v1/keys" || e["resource"] == "/admin/v1/audit")
    );

    let failures = gw.metric("keyrouter_admin_auth_failures_total", &[]).await;
    assert_eq!(failures, Some((cases.len() + 2) as f64));
    let unauthorized = gw
        .metric(
            "keyrouter_admin_requests_total",
            &[("route", "/admin/v1/keys"), ("code", "401")],
        )
        .await;
    assert_eq!(unauthorized, Some(cases.len() as f64));
    gw.stop().await;
}

#[tokio::test]
async fn jwt_subject_is_the_audit_actor() {
    let gw = TestGateway::start().await;
    let writer = token("deploy-bot", "keys:write keys:read");
    let reply = gw
        .post(
            "/keys",
            json!({"key_material": "sk-JWT-actor-0123456789", "provider_id": "openai"}),
        )
        .bearer(&writer)
        .send()
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text);
    let id = id_of(&reply.json());
    let events = audit(&gw, &format!("?resource={id}")).await;
    assert_eq!(events[0]["actor"], "admin:deploy-bot");
    gw.stop().await;
}

#[tokio::test]
async fn identity_provider_tokens_with_an_audience_are_accepted() {
    let gw = TestGateway::start().await;
    let exp = chrono::Utc::now().timestamp() + 600;
    for aud in [
        json!("https://keyrouter.example.com"),
        json!(["keyrouter", "grafana"]),
    ] {
        let t = sign_jwt(
            common::JWT_SECRET,
            &json!({"sub": "idp-user", "scope": "keys:read", "exp": exp, "aud": aud,
                    "iss": "https://idp.example.com"}),
        );
        let reply = gw.get("/keys").bearer(&t).send().await;
        assert_eq!(reply.status, 200, "{aud}: {}", reply.text);
    }
    gw.stop().await;
}

#[tokio::test]
async fn without_admin_secrets_everything_is_refused() {
    let gw = TestGateway::builder()
        .without_api_key()
        .without_jwt_secret()
        .start()
        .await;
    gw.get("/keys")
        .auth(Auth::ApiKey(common::API_KEY.to_owned()))
        .send()
        .await
        .error(401, "unauthorized");
    let forged = sign_jwt(
        common::JWT_SECRET,
        &json!({"sub": "x", "scope": "keys:read", "exp": chrono::Utc::now().timestamp() + 600}),
    );
    gw.get("/providers")
        .bearer(&forged)
        .send()
        .await
        .error(401, "unauthorized");
    let events = gw.wait_for_events(EventKind::AuthFailed, 2).await;
    assert!(
        events
            .iter()
            .all(|e| e.reason.as_deref() == Some("auth_not_configured"))
    );
    assert!(
        events
            .iter()
            .all(|e| e.client_addr == Some(IpAddr::V4(Ipv4Addr::LOCALHOST)))
    );
    assert_eq!(
        gw.metric("keyrouter_admin_auth_failures_total", &[]).await,
        Some(2.0)
    );
    gw.stop().await;
}

#[tokio::test]
async fn the_101st_request_in_a_minute_is_rate_limited() {
    let gw = TestGateway::start().await;
    let noisy = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    // Counted before authentication: guessing is throttled like using.
    for _ in 0..100 {
        let reply = gw.get("/keys").no_auth().from(noisy).send().await;
        assert_eq!(reply.status, 401);
    }
    let reply = gw.get("/keys").from(noisy).send().await;
    reply.error(429, "rate_limit_exceeded");
    let retry: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // Another address is not affected.
    assert_eq!(gw.get("/keys").send().await.status, 200);
    let limited = gw
        .metric(
            "keyrouter_admin_requests_total",
            &[("route", "/admin/v1/keys"), ("code", "429")],
        )
        .await;
    assert_eq!(limited, Some(1.0));
    gw.stop().await;
}

#[tokio::test]
async fn a_body_trickling_past_the_read_timeout_gets_408_and_a_closed_connection() {
    let gw = TestGateway::builder()
        .toml("[server]\nbody_read_timeout = \"300ms\"")
        .start()
        .await;
    let addr = gw.running.admin_addr;
    let head = format!(
        "POST /admin/v1/keys HTTP/1.1\r\nHost: {addr}\r\nX-API-Key: {}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{",
        common::API_KEY
    );
    // The answer, then the end of the connection: the rest of the body is
    // not waited for.
    let (answer, took) = common::trickle_body(addr, &head).await;
    assert!(took >= std::time::Duration::from_millis(250));
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""type":"invalid_request""#), "{answer}");
    // Said, so that a client does not send its next request on it.
    assert!(answer.contains("connection: close\r\n"), "{answer}");

    // Nothing was registered, and the listener still serves.
    let keys = gw.get("/keys").send().await;
    assert_eq!(keys.status, 200, "{}", keys.text);
    assert_eq!(keys.json()["keys"], json!([]));
    gw.stop().await;
}

#[tokio::test]
async fn a_body_announced_over_64_kib_is_refused_at_once_and_never_invited() {
    let gw = TestGateway::start().await;
    let addr = gw.running.admin_addr;
    for expect in ["", "Expect: 100-continue\r\n"] {
        let head = format!(
            "POST /admin/v1/keys HTTP/1.1\r\nHost: {addr}\r\nX-API-Key: {}\r\n\
             Content-Type: application/json\r\nContent-Length: 65537\r\n{expect}\r\n",
            common::API_KEY
        );
        // Only the head is sent: the answer must not wait for the body
        // (server.body_read_timeout is 60 s), and the connection ends.
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            conn.read_to_end(&mut answer),
        )
        .await
        .expect("the announced body was waited for")
        .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        // A client that asked is not invited to send the body.
        assert!(answer.starts_with("HTTP/1.1 400 "), "{expect}{answer}");
        assert!(!answer.contains("100 Continue"), "{answer}");
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        // The same answer as a body that is sent and turns out too large.
        assert!(answer.contains(r#""type":"invalid_request""#), "{answer}");
        assert!(
            answer.contains("request body: must be at most 65536 bytes"),
            "{answer}"
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn every_validation_rule_names_its_field_and_never_echoes_the_value() {
    let gw = TestGateway::start().await;
    let ok = "sk-VALID-material-0123456789";
    let with = |extra: Value| {
        let mut body = json!({"key_material": ok, "provider_id": "openai"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let cases: Vec<(Value, &str, String)> = vec![
        (
            json!({"key_material": "sk-SHORT9", "provider_id": "openai"}),
            "key_material",
            "sk-SHORT9".into(),
        ),
        (
            json!({"key_material": "sk-HAS WHITESPACE-0123456789", "provider_id": "openai"}),
            "key_material",
            "WHITESPACE".into(),
        ),
        (
            json!({"key_material": "sk-ÜNICODE-material-0123", "provider_id": "openai"}),
            "key_material",
            "NICODE-material".into(),
        ),
        (
            json!({"key_material": format!("sk-LONG-{}", "Q".repeat(200)), "provider_id": "openai"}),
            "key_material",
            "QQQQQQQQQQ".into(),
        ),
        (
            json!({"key_material": 73737373737_u64, "provider_id": "openai"}),
            "key_material",
            "73737373737".into(),
        ),
        (
            json!({"provider_id": "openai"}),
            "key_material",
            "openai".into(),
        ),
        (
            json!({"key_material": ok, "provider_id": "mistral_unconfigured"}),
            "provider_id",
            "mistral_unconfigured".into(),
        ),
        (
            with(json!({"label": "L".repeat(65)})),
            "label",
            "LLLLLLLLLL".into(),
        ),
        (
            with(json!({"label": "bell\u{7}CTRLCHAR"})),
            "label",
            "CTRLCHAR".into(),
        ),
        (
            with(json!({"limits": {"rpm": 0}})),
            "limits.rpm",
            "\"rpm\":0".into(),
        ),
        (
            with(json!({"limits": {"rpm": "858585"}})),
            "limits.rpm",
            "858585".into(),
        ),
        (
            with(json!({"limits": {"tpm": 9_191_919_191_u64}})),
            "limits.tpm",
            "9191919191".into(),
        ),
        (
            with(json!({"limits": {"max_concurrent": -42}})),
            "limits.max_concurrent",
            "-42".into(),
        ),
        (
            with(json!({"limits": {"burst": 5}})),
            "limits: unknown field `burst`",
            "\"burst\":5".into(),
        ),
        (
            with(json!({"limits": "unlimited"})),
            "limits",
            "unlimited".into(),
        ),
        (with(json!({"weight": 0})), "weight", "\"weight\":0".into()),
        (with(json!({"weight": 1001})), "weight", "1001".into()),
        (with(json!({"weight": 2.5})), "weight", "2.5".into()),
        (
            with(json!({"metadata": {"Owner-Name": "x"}})),
            "metadata",
            "Owner-Name".into(),
        ),
        (
            with(json!({"metadata": {"owner": "V".repeat(257)}})),
            "metadata",
            "VVVVVVVVVV".into(),
        ),
        (
            with(json!({"metadata": {"owner": 6464646464_u64}})),
            "metadata",
            "6464646464".into(),
        ),
        (
            with(
                json!({"metadata": (0..17).map(|i| (format!("k{i}"), json!("v"))).collect::<serde_json::Map<_, _>>()}),
            ),
            "metadata: at most 16 entries",
            "k16".into(),
        ),
        (
            with(json!({"foo": "FOOVALUE"})),
            "unknown field `foo`",
            "FOOVALUE".into(),
        ),
        (
            with(json!({"Sk-Evil Field": 1})),
            "unknown field",
            "Evil".into(),
        ),
    ];
    for (body, field, value) in &cases {
        let msg = gw
            .post("/keys", body.clone())
            .send()
            .await
            .error(400, "invalid_request");
        assert!(msg.contains(field), "{body}: {msg}");
        assert!(!msg.contains(value.as_str()), "{body}: {msg}");
        assert!(!msg.contains(ok), "{msg}");
    }

    // Raw bodies: bad JSON, not an object, trailing data, too large.
    let huge = format!(
        r#"{{"key_material":"{ok}","provider_id":"openai","label":"{}"}}"#,
        "H".repeat(65 * 1024)
    );
    for (raw, value) in [
        (
            format!(r#"{{"key_material":"{ok}","provider_id":"#),
            "provider_id\":".to_owned(),
        ),
        (format!(r#"["{ok}","openai"]"#), "openai".to_owned()),
        (
            format!(r#"{{"key_material":"{ok}","provider_id":"openai"}}{{}}"#),
            "}{".to_owned(),
        ),
        (huge, "HHHHHHHH".to_owned()),
    ] {
        let msg = gw
            .request(Method::POST, "/keys")
            .raw(raw)
            .send()
            .await
            .error(400, "invalid_request");
        assert!(msg.starts_with("request body:"), "{msg}");
        assert!(!msg.contains(&value) && !msg.contains(ok), "{msg}");
    }

    // PATCH and revoke bodies follow the same rules.
    let id = id_of(&gw.register_key("openai", ok).await);
    for (path, body, field, value) in [
        (
            format!("/keys/{id}"),
            json!({"weight": 4242}),
            "weight",
            "4242",
        ),
        (
            format!("/keys/{id}"),
            json!({"key_material": "sk-SNEAKY-patch-0123456"}),
            "unknown field `key_material`",
            "SNEAKY",
        ),
        (
            format!("/keys/{id}/revoke"),
            json!({"reason": "R".repeat(257)}),
            "reason",
            "RRRRRRRRRR",
        ),
        (
            format!("/keys/{id}/revoke"),
            json!({"reason": 98989898}),
            "reason",
            "98989898",
        ),
    ] {
        let method = if path.ends_with("revoke") {
            Method::POST
        } else {
            Method::PATCH
        };
        let msg = gw
            .request(method, &path)
            .json(body.clone())
            .send()
            .await
            .error(400, "invalid_request");
        assert!(msg.contains(field), "{body}: {msg}");
        assert!(!msg.contains(value), "{body}: {msg}");
    }
    // A metadata key given twice is refused like a field given twice, on
    // registration and change alike, naming the key and never a value (17
    // pairs with one repeat are no way past the 16-entry cap).
    let seventeen: Vec<String> = (0..16)
        .map(|i| format!(r#""k{i}":"v""#))
        .chain([r#""k3":"SEVENTEENTH""#.to_owned()])
        .collect();
    for (metadata, expected, value) in [
        (
            r#"{"owner":"team-a","owner":"SECONDVALUE"}"#.to_owned(),
            "metadata.owner: given more than once",
            "SECONDVALUE",
        ),
        (
            format!("{{{}}}", seventeen.join(",")),
            "metadata.k3: given more than once",
            "SEVENTEENTH",
        ),
    ] {
        for (method, path, raw) in [
            (
                Method::POST,
                "/keys".to_owned(),
                format!(
                    r#"{{"key_material":"{ok}","provider_id":"openai","metadata":{metadata}}}"#
                ),
            ),
            (
                Method::PATCH,
                format!("/keys/{id}"),
                format!(r#"{{"metadata":{metadata}}}"#),
            ),
        ] {
            let msg = gw
                .request(method, &path)
                .raw(raw)
                .send()
                .await
                .error(400, "invalid_request");
            assert_eq!(msg, expected, "{path}");
            assert!(!msg.contains(value) && !msg.contains(ok), "{msg}");
        }
    }

    // Nothing was registered or changed by the refused requests.
    let keys = gw.get("/keys").send().await.json();
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1);
    assert_eq!(keys["keys"][0]["state"], "active");
    assert_eq!(keys["keys"][0]["metadata"], json!({}));
    gw.stop().await;
}

#[tokio::test]
async fn operations_without_parameters_refuse_a_query_string() {
    let gw = TestGateway::start().await;
    let id = id_of(
        &gw.register_key("openai", "sk-QUERY-strict-0123456789")
            .await,
    );
    let cases = [
        (Method::GET, format!("/keys/{id}"), None),
        (
            Method::POST,
            "/keys".to_owned(),
            Some(json!({"key_material": "sk-QUERY-new-0123456789", "provider_id": "openai"})),
        ),
        (
            Method::PATCH,
            format!("/keys/{id}"),
            Some(json!({"weight": 9})),
        ),
        (Method::POST, format!("/keys/{id}/revoke"), Some(json!({}))),
        (
            Method::POST,
            format!("/keys/{id}/reactivate"),
            Some(json!({})),
        ),
        (Method::DELETE, format!("/keys/{id}"), None),
        (
            Method::POST,
            "/encryption/rotate".to_owned(),
            Some(json!({})),
        ),
    ];
    for (method, path, body) in cases {
        for (query, expected) in [
            ("?force=QVALUE", "unknown query parameter `force`"),
            ("?dry_run=", "unknown query parameter `dry_run`"),
            // A name that is no parameter name is not repeated either.
            ("?Sk-QNAME%20x=1", "unknown query parameter"),
        ] {
            let mut request = gw.request(method.clone(), &format!("{path}{query}"));
            if let Some(body) = &body {
                request = request.json(body.clone());
            }
            let msg = request.send().await.error(400, "invalid_request");
            assert_eq!(msg, expected, "{method} {path}{query}");
        }
    }
    // None of them ran: one key, untouched, and only its registration audited.
    let keys = gw.get("/keys").send().await.json()["keys"].clone();
    assert_eq!(keys.as_array().unwrap().len(), 1);
    assert_eq!(
        (&keys[0]["state"], &keys[0]["weight"]),
        (&json!("active"), &json!(1))
    );
    assert_eq!(audit(&gw, "").await.len(), 1);

    // An empty query string names no parameter.
    assert_eq!(gw.get(&format!("/keys/{id}?")).send().await.status, 200);
    // GET /providers ignores its query string, as documented.
    assert_eq!(gw.get("/providers?_=1795429800").send().await.status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn providers_show_counts_per_state_and_no_base_url() {
    let gw = TestGateway::start().await;
    let a = id_of(&gw.register_key("openai", "sk-PROV-openai-a-0123456").await);
    gw.register_key("openai", "sk-PROV-openai-b-0123456").await;
    gw.register_key("anthropic", "sk-PROV-anthropic-0123456")
        .await;
    gw.post(&format!("/keys/{a}/revoke"), json!({}))
        .send()
        .await;

    let reply = gw.get("/providers").send().await;
    assert_eq!(reply.status, 200);
    assert!(!reply.text.contains(OPENAI_BASE_URL) && !reply.text.contains(ANTHROPIC_BASE_URL));
    assert!(!reply.text.contains("base_url"));
    let body = reply.json();
    assert_eq!(
        body,
        json!({"providers": [
            {"id": "openai", "kind": "openai", "route_prefix": "/openai", "default": true,
             "keys": {"active": 1, "cooling_down": 0, "exhausted": 0, "invalid": 0, "revoked": 1}},
            {"id": "anthropic", "kind": "anthropic", "route_prefix": "/anthropic", "default": false,
             "keys": {"active": 1, "cooling_down": 0, "exhausted": 0, "invalid": 0, "revoked": 0}}
        ]})
    );
    gw.stop().await;
}

#[tokio::test]
async fn key_gauges_follow_registrations_and_revocations() {
    let gw = TestGateway::start().await;
    let gauge = |state: &'static str| {
        let gw = &gw;
        async move {
            gw.metric(
                "keyrouter_keys",
                &[("provider", "openai"), ("state", state)],
            )
            .await
        }
    };
    assert_eq!(gauge("active").await, Some(0.0));
    let a = id_of(&gw.register_key("openai", "sk-GAUGE-a-0123456789").await);
    gw.register_key("openai", "sk-GAUGE-b-0123456789").await;
    assert_eq!(gauge("active").await, Some(2.0));
    gw.post(&format!("/keys/{a}/revoke"), json!({}))
        .send()
        .await;
    assert_eq!(gauge("active").await, Some(1.0));
    assert_eq!(gauge("revoked").await, Some(1.0));
    gw.stop().await;
}

#[tokio::test]
async fn audit_lists_newest_first_with_filters_and_pages() {
    let gw = TestGateway::start().await;
    let a = id_of(&gw.register_key("openai", "sk-AUDIT-a-0123456789").await);
    let b = id_of(&gw.register_key("openai", "sk-AUDIT-b-0123456789").await);
    gw.register_key("anthropic", "sk-AUDIT-c-0123456789").await;
    gw.post(&format!("/keys/{a}/revoke"), json!({}))
        .send()
        .await;
    gw.patch(&format!("/keys/{b}"), json!({"weight": 2}))
        .send()
        .await;

    let everything = audit(&gw, "").await;
    assert_eq!(everything.len(), 5);
    let stamps: Vec<&str> = everything
        .iter()
        .map(|e| e["timestamp"].as_str().unwrap())
        .collect();
    let mut sorted = stamps.clone();
    sorted.sort_unstable_by(|x, y| y.cmp(x));
    assert_eq!(stamps, sorted, "newest first");
    assert_eq!(everything[0]["event"], "key_updated");
    for e in &everything {
        assert!(e["id"].as_str().unwrap().starts_with("evt_"));
        assert_eq!(
            e["timestamp"].as_str().unwrap().len(),
            "2026-11-23T10:30:00.123Z".len()
        );
    }

    let mut paged = vec![];
    let mut query = "?limit=2".to_owned();
    loop {
        let reply = gw.get(&format!("/audit{query}")).send().await.json();
        paged.extend(
            reply["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].clone()),
        );
        match reply["next_cursor"].as_str() {
            Some(c) => query = format!("?limit=2&cursor={c}"),
            None => break,
        }
    }
    let all_ids: Vec<Value> = everything.iter().map(|e| e["id"].clone()).collect();
    assert_eq!(paged, all_ids, "pages cover every event once, in order");

    assert_eq!(audit(&gw, "?event=key_revoked").await.len(), 1);
    assert_eq!(audit(&gw, &format!("?resource={a}")).await.len(), 2);
    assert_eq!(audit(&gw, "?since=2999-01-01T00:00:00Z").await.len(), 0);
    assert_eq!(
        audit(&gw, "?until=2000-01-01T00:00:00%2B02:00").await.len(),
        0
    );
    assert_eq!(
        audit(&gw, "?since=2000-01-01T00:00:00+02:00").await.len(),
        5
    );

    for (query, field, value) in [
        ("?event=key_exploded", "event", "key_exploded"),
        ("?since=last-tuesday", "since", "last-tuesday"),
        ("?until=13:00", "until", "13:00"),
        (
            "?since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z",
            "until",
            "2026-01-01",
        ),
        ("?limit=9999", "limit", "9999"),
        ("?cursor=%25%25%25", "cursor", "%%%"),
        (
            &format!("?resource={}", "r".repeat(65)),
            "resource",
            "rrrrrrrrrr",
        ),
        ("?actor=admin", "unknown query parameter `actor`", "admin:"),
    ] {
        let msg = gw
            .get(&format!("/audit{query}"))
            .send()
            .await
            .error(400, "invalid_request");
        assert!(msg.starts_with(field), "{query}: {msg}");
        assert!(!msg.contains(value), "{query}: {msg}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn audit_bounds_take_in_the_whole_millisecond_shown() {
    let gw = TestGateway::start().await;
    gw.register_key("openai", "sk-AUDIT-bounds-0123456789")
        .await;
    let events = audit(&gw, "").await;
    let (id, shown) = (&events[0]["id"], events[0]["timestamp"].as_str().unwrap());
    // The store keeps microseconds the API does not show: the shown
    // timestamp, and any instant within its millisecond, names it whole.
    let within = shown.replace('Z', "999Z");
    for query in [
        format!("?until={shown}"),
        format!("?since={shown}&until={shown}"),
        format!("?since={within}"),
        format!("?since={within}&until={shown}"),
    ] {
        let listed = audit(&gw, &query).await;
        assert!(listed.iter().any(|e| e["id"] == *id), "{query}: {listed:?}");
    }
    gw.stop().await;
}

async fn readyz(gw: &TestGateway) -> u16 {
    let url = format!("{}/readyz", gw.ops);
    gw.client().get(url).send().await.unwrap().status().as_u16()
}

/// A replica started with Fernet keys that open none of the stored keys
/// would answer every request with 503: it reports not ready, so it gets
/// no traffic. With a key ring that opens them, it is ready again.
#[tokio::test]
async fn a_replica_that_cannot_open_any_stored_key_is_not_ready() {
    let right = Vault::generate_key();
    let wrong = Vault::generate_key();
    let dir = tempfile::tempdir().unwrap();

    let first = TestGateway::builder()
        .fernet_keys(&[&right])
        .state_dir(dir.path())
        .start()
        .await;
    assert_eq!(readyz(&first).await, 200, "no keys yet: ready");
    first
        .register_key("openai", "sk-READY-0123456789abcdef")
        .await;
    first.stop().await;

    let wrong_ring = TestGateway::builder()
        .fernet_keys(&[&wrong])
        .state_dir(dir.path())
        .start()
        .await;
    assert_eq!(readyz(&wrong_ring).await, 503);
    assert_eq!(
        wrong_ring.metric("keyrouter_keys_unopened", &[]).await,
        Some(1.0)
    );
    wrong_ring.stop().await;

    let both = TestGateway::builder()
        .fernet_keys(&[&wrong, &right])
        .state_dir(dir.path())
        .start()
        .await;
    assert_eq!(readyz(&both).await, 200);
    assert_eq!(both.metric("keyrouter_keys_unopened", &[]).await, Some(0.0));
}

#[tokio::test]
async fn rotation_reencrypts_every_stored_key_with_the_primary() {
    let old = Vault::generate_key();
    let new = Vault::generate_key();
    let dir = tempfile::tempdir().unwrap();
    let material = "sk-ROTATE-me-0123456789";

    let first = TestGateway::builder()
        .fernet_keys(&[&old])
        .state_dir(dir.path())
        .start()
        .await;
    let kept = id_of(&first.register_key("openai", material).await);
    let erased = id_of(
        &first
            .register_key("openai", "sk-ROTATE-erased-0123456789")
            .await,
    );
    first.delete(&format!("/keys/{erased}")).send().await;
    first.stop().await;

    let second = TestGateway::builder()
        .fernet_keys(&[&new, &old])
        .state_dir(dir.path())
        .start()
        .await;
    second.never_show(material);
    let reply = second
        .request(Method::POST, "/encryption/rotate")
        .send()
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json(), json!({"reencrypted": 1}));

    let stored = second
        .app()
        .store
        .get_key(&KeyId::parse(&kept).unwrap())
        .await
        .unwrap()
        .unwrap();
    let only_new = Vault::new(&[Secret::new(new.clone())]).unwrap();
    let opened = only_new.open(stored.sealed.as_ref().unwrap()).unwrap();
    assert_eq!(opened.expose(), material);

    // Duplicate detection still sees the rotated material.
    second
        .post(
            "/keys",
            json!({"key_material": material, "provider_id": "openai"}),
        )
        .send()
        .await
        .error(409, "conflict");
    let events = audit(&second, "?event=encryption_rotated").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["actor"], "admin:api_key");
    assert_eq!(events[0]["resource"], "encryption");
    second.stop().await;
}

#[tokio::test]
async fn admin_metrics_use_route_templates() {
    let gw = TestGateway::start().await;
    let id = id_of(&gw.register_key("openai", "sk-METRICS-0123456789").await);
    gw.get(&format!("/keys/{id}")).send().await;
    gw.get("/no/such/route").send().await;
    let text = gw.metrics().await;
    assert!(!text.contains(&id), "no raw ids in labels");
    let by_template = gw
        .metric(
            "keyrouter_admin_requests_total",
            &[("route", "/admin/v1/keys/{id}"), ("code", "200")],
        )
        .await;
    assert_eq!(by_template, Some(1.0));
    let created = gw
        .metric(
            "keyrouter_admin_requests_total",
            &[("route", "/admin/v1/keys"), ("code", "201")],
        )
        .await;
    assert_eq!(created, Some(1.0));
    let unmatched = gw
        .metric(
            "keyrouter_admin_requests_total",
            &[("route", "unmatched"), ("code", "404")],
        )
        .await;
    assert_eq!(unmatched, Some(1.0));
    gw.stop().await;
}
