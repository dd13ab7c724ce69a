//! ComfyUI's asset system as newer servers with assets turned on show it (C13 in
//! `shared/reference/comfyui-newer-versions.md`: `asset_enrichment.py`, `server.py`): every file
//! entry of a node's `ui` output gains an asset `id` and a `preview_id`, and `/upload/image`
//! answers with an `asset` block besides `name`/`subfolder`/`type`. Clients must ignore the
//! extra keys; the simulator adds them so the worker's tolerance is tested, not assumed.

use crate::json::{OMap, OValue};

/// Adds `id` and `preview_id` to every file entry (`{"filename", …}`) under any key of a node's
/// `ui` output, as asset enrichment does. The preview of a file is the file itself here.
pub fn enrich_outputs(ui: &mut OValue) {
    let Some(map) = ui.as_object_mut() else { return };
    let keys: Vec<String> = map.keys().cloned().collect();
    for key in keys {
        let Some(OValue::Array(entries)) = map.get_mut(&key) else { continue };
        for entry in entries.iter_mut() {
            let Some(file) = entry.as_object_mut().filter(|e| e.contains_key("filename")) else { continue };
            let id = uuid::Uuid::new_v4().to_string();
            file.insert("id", OValue::str(id.clone()));
            file.insert("preview_id", OValue::str(id));
        }
    }
}

/// The `asset` block of an `/upload/image` answer for a stored file.
pub fn upload_asset(name: &str, bytes: &[u8], dir_type: &str) -> OValue {
    let mut asset = OMap::new();
    asset.insert("id", OValue::str(uuid::Uuid::new_v4().to_string()));
    asset.insert("name", OValue::str(name));
    asset.insert("asset_hash", OValue::str(format!("blake3:{}", blake3::hash(bytes).to_hex())));
    asset.insert("size", OValue::Number(bytes.len().into()));
    asset.insert("mime_type", OValue::str(mime_type(name)));
    asset.insert("tags", OValue::Array(vec![OValue::str(dir_type), OValue::str("uploaded")]));
    OValue::Object(asset)
}

fn mime_type(name: &str) -> &'static str {
    let lower = name.to_ascii_lowercase();
    match lower.rsplit('.').next() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        Some("mp4") => "video/mp4",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_entry_gets_ids_and_other_keys_are_left_alone() {
        let mut ui = OValue::parse(
            br#"{"images": [{"filename": "a.mp4", "subfolder": "", "type": "output"}], "animated": [true]}"#,
        )
        .unwrap();
        enrich_outputs(&mut ui);
        let entry = &ui.get("images").unwrap().as_array().unwrap()[0];
        assert_eq!(entry.get("id").unwrap().as_str().unwrap().len(), 36);
        assert_eq!(entry.get("id"), entry.get("preview_id"));
        assert_eq!(ui.get("animated").unwrap().as_array().unwrap(), &vec![OValue::Bool(true)]);
    }

    #[test]
    fn an_upload_asset_names_its_blake3_hash_and_size() {
        let asset = upload_asset("frame.png", b"abc", "input");
        // BLAKE3 of "abc", from the BLAKE3 reference test vectors.
        assert_eq!(
            asset.get("asset_hash").unwrap().as_str().unwrap(),
            "blake3:6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
        assert_eq!(asset.get("size").unwrap().to_value(), serde_json::json!(3));
        assert_eq!(asset.get("mime_type").unwrap().as_str(), Some("image/png"));
    }
}
