//! Measures how long the simulator needs to render and encode a 97-frame 512×320 H.264 clip.
//!
//! `cargo run -p tdcomfy-sim --example encode_bench [--release]`

use std::time::Instant;

fn main() -> std::io::Result<()> {
    let dir = std::env::temp_dir().join(format!("tdcomfy-sim-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("bench.mp4");
    for (w, h) in [(512, 320), (768, 512)] {
        let start = Instant::now();
        tdcomfy_sim::write_test_clip(&path, w, h, 97, 25.0)?;
        let elapsed = start.elapsed();
        let info = tdcomfy_sim::video_info(&path)?;
        let size = std::fs::metadata(&path)?.len();
        println!(
            "{w}x{h}: {} frames at {} fps in {:.3} s ({} bytes)",
            info.frames,
            info.fps,
            elapsed.as_secs_f64(),
            size
        );
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
