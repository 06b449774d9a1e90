//! The client CLI (`twinhost twin|query|model|ingest ...`) against a running server: output
//! as JSON, exit status on rejected items, and a closed output pipe.

use serde_json::{json, Value};

use crate::common::{cli_json, cli_ok, ids, machine_model, twinhost_command, Server};

#[tokio::test]
async fn cli_ingest_file_prints_applied_count() {
    let s = Server::start();
    let a = s.create_twin_id(&json!({"entity_type": "machine"})).await;
    let b = s.create_twin_id(&json!({"entity_type": "machine"})).await;
    let file = s.tmp_dir().join("updates.ndjson");
    let mut text = String::new();
    for i in 0..25 {
        let id = if i % 2 == 0 { &a } else { &b };
        text.push_str(&format!(
            "{{\"twin_id\":\"{id}\",\"properties\":{{\"temperature\":{i}}}}}\n"
        ));
    }
    text.push_str(&format!(
        "{{\"twin_id\":\"{}\",\"properties\":{{\"temperature\":1}}}}\n",
        uuid::Uuid::new_v4()
    ));
    std::fs::write(&file, text).unwrap();

    let out = s.cli(&["ingest", file.to_str().unwrap(), "--batch", "10"]);
    // A rejected item makes the exit status 1 (the rest is applied), with the summary printed.
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 of 26 items were rejected"),
        "{out:?}"
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("the summary on stdout");
    assert_eq!(v["applied"], 25, "{v}");
    assert_eq!(v["rejected"], 1, "{v}");
    assert_eq!(
        s.get(&format!("/v1/twins/{a}")).await.body["properties"]["temperature"],
        24
    );
    assert_eq!(
        s.get(&format!("/v1/twins/{b}")).await.body["properties"]["temperature"],
        23
    );
    let r = s.get(&format!("/v1/twins/{a}/history/temperature")).await;
    assert_eq!(r.body["points"].as_array().unwrap().len(), 13);
}

/// A client command whose output pipe closes early ends quietly (no panic message).
#[tokio::test]
async fn cli_output_into_a_closed_pipe_ends_quietly() {
    let s = Server::start();
    for _ in 0..50 {
        s.create_twin_id(
            &json!({"entity_type": "machine", "properties": {"pad": "x".repeat(2000)}}),
        )
        .await;
    }
    let mut child = s.cli_spawn(&["query", r#"{"entity_type": "machine", "limit": 100}"#]);
    // Read one byte, then close the pipe.
    {
        use std::io::Read;
        let mut out = child.stdout.take().unwrap();
        let mut one = [0u8; 1];
        out.read_exact(&mut one).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
}

// ---- client CLI ------------------------------------------------------------------------

#[tokio::test]
async fn cli_twin_query_and_model_commands() {
    let s = Server::start();

    let model_file = s.tmp_dir().join("machine.json");
    std::fs::write(&model_file, serde_json::to_vec(&machine_model()).unwrap()).unwrap();
    let out = s.cli(&["model", "put", "machine", model_file.to_str().unwrap()]);
    let m = cli_json(&out);
    assert_eq!(m["required"], json!(["status"]));
    assert_eq!(
        s.get("/v1/models/machine").await.body["required"],
        json!(["status"])
    );
    let m = cli_json(&s.cli(&["model", "get", "machine"]));
    assert_eq!(m["properties"]["temperature"]["unit"], "degF");

    let parent = cli_json(&s.cli(&["twin", "create", "--entity-type", "building"]));
    let pid = parent["id"].as_str().expect("id").to_owned();
    let t = cli_json(&s.cli(&[
        "twin",
        "create",
        "--entity-type",
        "machine",
        "--properties",
        r#"{"status": "operational", "temperature": 70}"#,
        "--parent",
        &pid,
    ]));
    let id = t["id"].as_str().expect("id").to_owned();
    assert_eq!(t["version"], 1);
    assert_eq!(t["parent_id"], pid.as_str());
    assert_eq!(t["properties"]["temperature"], 70);

    // A model violation: non-zero exit naming the property.
    let out = s.cli(&[
        "twin",
        "create",
        "--entity-type",
        "machine",
        "--properties",
        r#"{"temperature": 900}"#,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("422") && err.contains("temperature"),
        "stderr: {err}"
    );

    let g = cli_json(&s.cli(&["twin", "get", &id]));
    assert_eq!(g["id"], id.as_str());
    assert!(g.get("meta").is_none(), "{g}");
    let g = cli_json(&s.cli(&["twin", "get", &id, "--meta"]));
    assert_eq!(
        g["meta"]["properties"]["temperature"]["origin"],
        crate::common::NODE_ID,
        "{g}"
    );
    let p = cli_json(&s.cli(&["twin", "patch", &id, r#"{"temperature": 75.5}"#]));
    assert_eq!(p["version"], 2);
    assert_eq!(p["properties"]["temperature"], 75.5);
    let out = s.cli(&[
        "twin",
        "patch",
        &id,
        r#"{"temperature": 1}"#,
        "--if-match",
        "1",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("412"),
        "{out:?}"
    );
    let p = cli_json(&s.cli(&[
        "twin",
        "patch",
        &id,
        r#"{"temperature": 76}"#,
        "--if-match",
        "2",
    ]));
    assert_eq!(p["version"], 3);

    let qr = cli_json(&s.cli(&[
        "query",
        r#"{"entity_type": "machine", "properties": {"status": "operational"}}"#,
    ]));
    assert_eq!(ids(&qr["items"]), vec![id.clone()]);
    let qfile = s.tmp_dir().join("q.json");
    std::fs::write(&qfile, format!(r#"{{"parent_id": "{pid}"}}"#)).unwrap();
    let qr = cli_json(&s.cli(&["query", &format!("@{}", qfile.display())]));
    assert_eq!(ids(&qr["items"]), vec![id.clone()]);

    // Deleting the parent without --cascade fails; with it, both are gone.
    let out = s.cli(&["twin", "delete", &pid]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("409"),
        "{out:?}"
    );
    let out = s.cli(&["twin", "delete", &pid, "--cascade"]);
    assert_eq!(cli_ok(&out).trim(), "");
    let out = s.cli(&["twin", "get", &id]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "{out:?}"
    );
    assert_eq!(s.twin_count().await, 0);

    // A wrong token is refused.
    let out = twinhost_command()
        .args(["twin", "get", &id, "--url", &s.url, "--token", "th_wrong"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{out:?}"
    );
}
