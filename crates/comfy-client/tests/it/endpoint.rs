//! Server addresses from configuration, and the ids sent on the wire.

use std::collections::HashMap;

use tdcomfy_comfy::{ClientId, ComfyEndpoint, ComfyEndpoints, EndpointError, PromptId};

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    move |name| map.get(name).cloned()
}

fn urls(endpoints: &ComfyEndpoints) -> Vec<String> {
    endpoints.iter().map(ToString::to_string).collect()
}

#[test]
fn urls_list_wins_over_host_and_port() {
    let endpoints = ComfyEndpoints::from_lookup(env(&[
        ("COMFYUI_URLS", " http://gpu-a:8188 , gpu-b:8189/comfy ,"),
        ("COMFYUI_HOST", "ignored"),
        ("COMFYUI_PORT", "1"),
    ]))
    .expect("valid list");
    assert_eq!(urls(&endpoints), ["http://gpu-a:8188/", "http://gpu-b:8189/comfy/"]);
}

#[test]
fn host_and_port_are_the_one_server_shorthand() {
    let default = ComfyEndpoints::from_lookup(env(&[])).expect("defaults");
    assert_eq!(urls(&default), ["http://127.0.0.1:8188/"]);
    let custom =
        ComfyEndpoints::from_lookup(env(&[("COMFYUI_HOST", "10.0.0.5"), ("COMFYUI_PORT", "8999")])).expect("custom");
    assert_eq!(urls(&custom), ["http://10.0.0.5:8999/"]);
    let ipv6 = ComfyEndpoints::from_lookup(env(&[("COMFYUI_HOST", "::1"), ("COMFYUI_URLS", "  ")])).expect("ipv6");
    assert_eq!(urls(&ipv6), ["http://[::1]:8188/"]);
    let with_scheme =
        ComfyEndpoints::from_lookup(env(&[("COMFYUI_HOST", "http://gpu"), ("COMFYUI_PORT", "9000")])).expect("scheme");
    assert_eq!(urls(&with_scheme), ["http://gpu:9000/"]);
}

#[test]
fn bad_configuration_is_rejected_with_a_reason() {
    assert!(matches!(
        ComfyEndpoints::from_lookup(env(&[("COMFYUI_PORT", "http")])),
        Err(EndpointError::InvalidPort(_))
    ));
    assert!(matches!(ComfyEndpoints::from_lookup(env(&[("COMFYUI_PORT", "0")])), Err(EndpointError::InvalidPort(_))));
    assert!(matches!(ComfyEndpoints::parse_list("http://a:1, http://a:1/"), Err(EndpointError::Duplicate(_))));
    assert!(matches!(ComfyEndpoints::parse_list(" , "), Err(EndpointError::Empty)));
    for bad in [
        "https://gpu:8188",
        "ftp://gpu",
        "http://user:pw@gpu:8188",
        "http://gpu:8188/?x=1",
        "http://",
        "http://gpu:99999",
    ] {
        let error = ComfyEndpoint::parse(bad).expect_err(bad);
        assert!(matches!(error, EndpointError::Invalid { .. }), "{bad}: {error}");
    }
}

#[test]
fn routes_and_websocket_url_are_derived_from_the_base() {
    let endpoint = ComfyEndpoint::parse("http://gpu:8188/comfy").expect("valid");
    assert_eq!(endpoint.http_url("history/abc").as_str(), "http://gpu:8188/comfy/history/abc");
    assert_eq!(endpoint.http_url("/prompt").as_str(), "http://gpu:8188/comfy/prompt");
    let client = ClientId::parse("td-worker-1").expect("client id");
    assert_eq!(endpoint.ws_url(&client).as_str(), "ws://gpu:8188/comfy/ws?clientId=td-worker-1");
    assert_eq!(endpoint.authority(), "gpu:8188");
}

#[test]
fn prompt_ids_are_lowercase_uuids_and_client_ids_are_url_safe() {
    let id = PromptId::new();
    assert_eq!(id.as_str().len(), 36);
    assert_eq!(id.as_str(), id.as_str().to_lowercase());
    let upper = PromptId::parse("ED1B3726-29DB-4308-A3E7-1B26E127D1F4").expect("uuid");
    assert_eq!(upper.as_str(), "ed1b3726-29db-4308-a3e7-1b26e127d1f4");
    assert!(upper.matches("ed1b3726-29db-4308-a3e7-1b26e127d1f4"));
    assert!(PromptId::parse("my-own-id-123").is_err());
    assert_ne!(PromptId::new(), PromptId::new());

    assert!(ClientId::new().as_str().starts_with("tdcomfy-"));
    for bad in ["", "has space", "a&b=c", &"x".repeat(129)] {
        assert!(ClientId::parse(bad).is_err(), "{bad:?}");
    }
}
