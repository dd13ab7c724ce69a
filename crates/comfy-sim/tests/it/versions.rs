//! One contract test per change C1–C19 of `comfyui-newer-versions.md`: each runs the 0.38 profile
//! over real HTTP / WebSocket and checks the 0.3.64 profile's absence or difference.

use serde_json::{Value, json};

use crate::support::{Sim, invert_graph, keys, png, sim_038};

#[tokio::test]
async fn profiles_report_their_version_in_system_stats() {
    for (sim, version) in [(Sim::start(|_| {}).await, "0.3.64"), (sim_038(|_| {}).await, "0.38.1")] {
        let stats = sim.get_json("/system_stats").await;
        assert_eq!(stats["system"]["comfyui_version"], version);
        sim.stop().await;
    }
}

#[tokio::test]
async fn c4_prompt_id_must_be_a_canonical_uuid_on_0_38_and_any_string_on_0_3_64() {
    let bad_ids = [json!("my-own-id-123"), json!("ED1B3726-29DB-4308-A3E7-1B26E127D1F4"), json!(42)];
    let newer = sim_038(|_| {}).await;
    assert_eq!(newer.upload("frame.png", png(8, 8, 1), &[]).await.0, 200);
    for bad in &bad_ids {
        let (status, body) = newer.post("/prompt", &json!({"prompt": invert_graph("x"), "prompt_id": bad})).await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(body["error"]["type"], "invalid_prompt_id");
        assert_eq!(body["node_errors"], json!({}));
        assert_eq!(keys(&body["error"]), keys(&json!({"type":1,"message":1,"details":1,"extra_info":1})));
    }
    let id = "0b8f3c1e-6d2a-4f5b-9c7e-1a2b3c4d5e6f";
    let (status, body) = newer.post("/prompt", &json!({"prompt": invert_graph("x"), "prompt_id": id})).await;
    assert_eq!((status, body["prompt_id"].clone()), (200, json!(id)));
    newer.wait_history(id).await;
    newer.stop().await;

    let old = Sim::start(|_| {}).await;
    assert_eq!(old.upload("frame.png", png(8, 8, 1), &[]).await.0, 200);
    for (bad, echoed) in bad_ids.iter().zip(["my-own-id-123", "ED1B3726-29DB-4308-A3E7-1B26E127D1F4", "42"]) {
        let (status, body) = old.post("/prompt", &json!({"prompt": invert_graph("x"), "prompt_id": bad})).await;
        assert_eq!((status, body["prompt_id"].clone()), (200, Value::from(echoed)), "{bad}");
        old.wait_history(echoed).await;
    }
    old.stop().await;
}
