//! Output collection from every key shape ComfyUI and popular node packs use.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use tdcomfy_comfy::{FolderType, MediaKind, NodeOutput, OutputFile, collect_outputs, pick_primary};

fn outputs(value: Value) -> BTreeMap<String, NodeOutput> {
    serde_json::from_value(value).expect("outputs map")
}

fn collect(map: &BTreeMap<String, NodeOutput>) -> Vec<OutputFile> {
    collect_outputs(map.iter().map(|(k, v)| (k.as_str(), v)))
}

#[test]
fn vhs_gifs_key_with_format_is_a_video() {
    // VHS_VideoCombine's UI output (protocol §5): the mp4 lives under `gifs`.
    let map = outputs(json!({
        "12": {"gifs": [{"filename": "AnimateDiff_00001.mp4", "subfolder": "", "type": "output",
                          "format": "video/h264-mp4", "frame_rate": 8.0,
                          "workflow": "AnimateDiff_00001.png", "fullpath": "/abs/ComfyUI/output/AnimateDiff_00001.mp4"}]}
    }));
    let files = collect(&map);
    assert_eq!(files.len(), 1);
    let file = &files[0];
    assert_eq!(file.key, "gifs");
    assert_eq!((file.media, file.format.as_str()), (MediaKind::Video, "mp4"));
    assert_eq!(file.filename, "AnimateDiff_00001.mp4");
    assert_eq!(file.content_type_guess(), "video/mp4");
}

#[test]
fn vhs_gif_and_preview_outputs_are_kept_apart() {
    let map = outputs(json!({
        "3": {"gifs": [{"filename": "AnimateDiff_00002.gif", "subfolder": "", "type": "temp", "format": "image/gif"}]},
        "4": {"gifs": [{"filename": "clip_00001", "subfolder": "vhs", "type": "output", "format": "video/webm"}]}
    }));
    let files = collect(&map);
    assert_eq!((files[0].media, files[0].kind.clone()), (MediaKind::AnimatedImage, FolderType::Temp));
    // No extension: the VHS format decides.
    assert_eq!((files[1].media, files[1].format.as_str()), (MediaKind::Video, "webm"));
    assert_eq!(pick_primary(&files, None).expect("primary").node_id, "4");
}

#[test]
fn videos_audio_and_unknown_keys_are_all_collected() {
    let map = outputs(json!({
        "20": {"videos": [{"filename": "clip_00001_.mov", "subfolder": "out", "type": "output"}]},
        "21": {"audio": [{"filename": "track_00001_.flac", "subfolder": "", "type": "output"}]},
        "22": {"my_pack_results": [{"filename": "mesh_00001_.glb", "subfolder": "", "type": "output"}],
               "text": ["not a file"], "animated": [false]},
        "23": {"images": [{"filename": "", "subfolder": "", "type": "output"}, {"no": "filename"}]}
    }));
    let files = collect(&map);
    let summary: Vec<(&str, &str, MediaKind, &str)> =
        files.iter().map(|f| (f.node_id.as_str(), f.key.as_str(), f.media, f.format.as_str())).collect();
    assert_eq!(
        summary,
        vec![
            ("20", "videos", MediaKind::Video, "mov"),
            ("21", "audio", MediaKind::Audio, "flac"),
            ("22", "my_pack_results", MediaKind::Other, "glb"),
        ],
        "malformed items are skipped, unknown keys are kept"
    );
}

#[test]
fn pick_primary_prefers_mp4_then_other_video_then_animation_then_stills() {
    let map = outputs(json!({
        "1": {"images": [{"filename": "still_00001_.png", "subfolder": "", "type": "output"}]},
        "2": {"images": [{"filename": "anim_00001_.webp", "subfolder": "", "type": "output"}], "animated": [true]},
        "3": {"gifs": [{"filename": "loop_00001.gif", "subfolder": "", "type": "output", "format": "image/gif"}]},
        "4": {"images": [{"filename": "webm_00001_.webm", "subfolder": "", "type": "output"}], "animated": [true]},
        "5": {"images": [{"filename": "video_00001_.mp4", "subfolder": "td", "type": "output"}], "animated": [true]}
    }));
    let mut files = collect(&map);
    let order: Vec<String> = std::iter::from_fn(|| {
        let pick = pick_primary(&files, None)?.filename.clone();
        files.retain(|f| f.filename != pick);
        Some(pick)
    })
    .collect();
    assert_eq!(
        order,
        ["video_00001_.mp4", "webm_00001_.webm", "anim_00001_.webp", "loop_00001.gif", "still_00001_.png"]
    );
    assert_eq!(pick_primary(&[], None), None);
}

#[test]
fn saved_files_beat_temp_previews_of_the_same_media() {
    let map = outputs(json!({
        "1": {"images": [{"filename": "ComfyUI_temp_abcde_00001_.png", "subfolder": "", "type": "temp"}]},
        "2": {"images": [{"filename": "final_00001_.png", "subfolder": "td", "type": "output"}]}
    }));
    let files = collect(&map);
    assert_eq!(pick_primary(&files, None).expect("primary").filename, "final_00001_.png");
}

#[test]
fn per_image_animated_flags_and_duplicates() {
    let map = outputs(json!({
        "9":  {"images": [{"filename": "a.webp", "subfolder": "", "type": "output"},
                          {"filename": "b.webp", "subfolder": "", "type": "output"}],
               "animated": [false, true]},
        "10": {"images": [{"filename": "a.webp", "subfolder": "", "type": "output"}]}
    }));
    let files = collect(&map);
    assert_eq!(files.len(), 2, "the same file listed twice is collected once");
    assert_eq!(files[0].media, MediaKind::Image);
    assert_eq!(files[1].media, MediaKind::AnimatedImage);
}

#[test]
fn formats_a_custom_node_names_are_sanitized_before_they_become_extensions() {
    // A format becomes the worker's spool file extension and a media type at the broker.
    let map = outputs(json!({
        "1": {"files": [{"filename": "x.b/../../../etc/passwd", "subfolder": "", "type": "output"}]},
        "2": {"gifs": [{"filename": "clip", "subfolder": "", "type": "output", "format": "image/../../evil"}]},
        "3": {"files": [{"filename": "clip.averyverylongextension", "subfolder": "", "type": "output"}]},
        "4": {"files": [{"filename": "clip.R3D", "subfolder": "", "type": "output"}]},
    }));
    let formats: Vec<String> = collect(&map).into_iter().map(|f| f.format).collect();
    assert_eq!(formats, ["bin", "bin", "bin", "r3d"]);
}

/// Newer ComfyUI with assets (C13) adds `id`/`preview_id` to entries, and a file can live in a
/// folder other than `output`: every entry with a file name is collected, its folder kept.
#[test]
fn entries_with_asset_ids_and_other_folders_are_collected() {
    let map = outputs(json!({
        "9": {"images": [
            {"filename": "ltxv_00001_.mp4", "subfolder": "td", "type": "output", "id": "8c1f", "preview_id": "8c20",
             "asset_hash": "blake3:ab12"},
            {"filename": "ltxv_00001_.png", "subfolder": "", "type": "temp", "id": "8c21"}
        ], "animated": [true, false]},
        "10": {"3d": [{"filename": "mesh.glb", "subfolder": "", "type": "cloud"}]},
        "11": {"text": ["not a file"], "meta": {"node": 11}}
    }));
    let files = collect(&map);
    assert_eq!(files.len(), 3, "{files:?}");
    assert_eq!((files[0].kind.clone(), files[0].format.as_str()), (FolderType::Output, "mp4"));
    assert_eq!(files[1].kind, FolderType::Temp);
    assert_eq!((files[2].key.as_str(), files[2].kind.clone()), ("3d", FolderType::Other("cloud".into())));
    assert_eq!(pick_primary(&files, None).map(|f| f.filename.as_str()), Some("ltxv_00001_.mp4"));
}
