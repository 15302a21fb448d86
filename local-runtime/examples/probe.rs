use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for (n, k) in [(1536usize, 576usize), (576, 1536), (49152, 576)] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let q = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0)?)?;
        for m in [1usize, 2, 4, 8] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            q.forward(&x)?;
            let t = Instant::now();
            for _ in 0..50 {
                q.forward(&x)?;
            }
            println!(
                "n={n} k={k} m={m}: {:.1} us",
                t.elapsed().as_secs_f64() * 1e6 / 50.0
            );
        }
    }
    Ok(())
}
