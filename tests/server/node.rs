//! The node part of the admin API: the configuration at the seed's paths, and a reload from the
//! config file that applies operational keys at once.

use serde_json::json;

use crate::common::spawn_server;

#[tokio::test]
async fn a_reload_applies_the_files_operational_keys_and_reports_the_rest() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_path_buf();
    let s = spawn_server(move |c| c.data_dir = dir);
    let file = data.path().join("paddock.yaml");

    let (status, body) = s.post("/api/admin/config/reload", json!({})).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("INVALID_CONFIG")), "no file yet: {body}");

    std::fs::write(&file, "max_running_instances: 3\nport: 1\nmodel_dirs: [/srv/models]\n").unwrap();
    let (status, body) = s.post("/api/admin/config/reload", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["applied"], json!(["max_running_instances", "model_dirs"]));
    assert_eq!(body["restart_required"], json!(["port"]));
    let (_, config) = s.get("/api/admin/config").await;
    assert_eq!(config["max_running_instances"], 3);
    assert_eq!(config["model_dirs"], json!(["/srv/models"]));
    assert_ne!(config["port"], 1, "the port changes with a restart only");
    let (_, same) = s.get("/api/config").await;
    assert_eq!(same, config, "the seed's path and paddock's answer alike");

    // A file that does not validate changes nothing, and says why.
    std::fs::write(&file, "max_running_instances: 0\n").unwrap();
    let (status, body) = s.post("/api/admin/config/reload", json!({})).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["details"].as_str().unwrap().contains("max_running_instances"), "{body}");
    let (_, config) = s.get("/api/admin/config").await;
    assert_eq!(config["max_running_instances"], 3);

    // PUT at the seed's path saves the file like PUT /api/config.
    let (status, body) = s.put("/api/admin/config", json!({ "on_demand_start_timeout": 30 })).await;
    assert_eq!(status, 200, "{body}");
    assert!(std::fs::read_to_string(&file).unwrap().contains("on_demand_start_timeout: 30"));
}
