//! Prints the verify-cost curve of a model: `cargo run --release --example probe -- MODEL.gguf`.
fn main() -> anyhow::Result<()> {
    let path = std::path::PathBuf::from(std::env::args().nth(1).expect("MODEL.gguf"));
    let loaded = tollgate_runtime::load_model(&path, &candle_core::Device::Cpu)?;
    for _ in 0..2 {
        let curve = tollgate_runtime::engine::measure_cost_curve(&loaded.model, 9)?;
        println!(
            "{:?}",
            curve
                .relative
                .iter()
                .map(|c| (c * 100.0).round() / 100.0)
                .collect::<Vec<_>>()
        );
    }
    let mut cache = loaded.model.new_cache()?;
    loaded
        .model
        .forward(&(0..64).collect::<Vec<u32>>(), &mut cache)?;
    let t = std::time::Instant::now();
    for i in 0..50 {
        loaded.model.forward(&[100 + i], &mut cache)?;
    }
    println!(
        "one-token pass: {:.2} ms",
        t.elapsed().as_secs_f64() * 1e3 / 50.0
    );
    Ok(())
}
